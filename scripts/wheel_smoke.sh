#!/usr/bin/env bash
# Build factedge as a wheel (reusing build/native: no recompilation) and check it in a clean venv
# with the base (edge) dependencies only: the packages are where they belong (factedge.edge,
# factedge.convert, factedge.train, factedge/_native; nothing bare), the native build loads, torch is
# absent, and `factedge ask` answers about an image from a bundle made by the dev environment.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
dev="$root/.venv/bin/python"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"$dev" -m pip wheel --quiet --no-deps --no-build-isolation -Cbuild-dir=build/native -w "$work/dist" .
wheel="$(ls "$work"/dist/factedge-*.whl)"
python3 - "$wheel" <<'PY'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
tops = {n.split("/")[0] for n in names if not n.startswith("factedge-")}
assert tops == {"factedge"}, f"wheel installs more than factedge/: {sorted(tops)}"
for must in ("factedge/edge/vision_model.py", "factedge/convert/bundle.py", "factedge/train/base/tiny.py",
             "factedge/_native/bin/llama-quantize", "factedge/_native/bin/llama-mtmd-cli",
             "factedge/_native/share/build_info.json"):
    assert must in names, f"wheel lacks {must}"
assert any(n.startswith("factedge/_native/lib/libllama") for n in names)
print(f"wheel ok: {len(names)} files")
PY
python3 -m venv "$work/venv"
pip_w() { "$work/venv/bin/python" -m pip install --quiet --disable-pip-version-check "$@"; }
pip_w "numpy>=1.26" "typing-extensions>=4.5" "diskcache>=5.6.1" "jinja2>=2.11.3"
CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" pip_w --no-deps "$root/.cache/native/llama_cpp_python-0.3.36.tar.gz"
pip_w "$wheel"
bundle="$work/bundle"
"$dev" - "$bundle" "$work/img.png" <<'PY'
import sys
from pathlib import Path
from PIL import Image
from factedge.convert.bundle import ConvertOptions, convert_checkpoint
from factedge.convert.verify import sample_images
from factedge.train.base.tiny_cache import cached_tiny
tiny = cached_tiny("llava-rlhf", image_size=224)
convert_checkpoint(tiny.root, Path(sys.argv[1]), ConvertOptions(quants=["Q8_0"], verify=False))
Image.fromarray(sample_images(224)[0][1]).save(sys.argv[2])
PY
cd "$work"  # away from the source tree: only the installed wheel can be imported
"$work/venv/bin/python" - <<'PY'
import importlib.util, sys
import factedge.edge.native as native
assert "site-packages" in str(native.native_dir()), native.native_dir()
native.load_llama_cpp()
assert importlib.util.find_spec("torch") is None, "the base install must not pull torch"
for bare in ("edge", "convert", "train"):
    assert importlib.util.find_spec(bare) is None, f"a bare `{bare}` package is installed"
print("installed wheel ok:", native.native_dir())
PY
out="$("$work/venv/bin/factedge" ask --model "$bundle" --quant Q8_0 --image "$work/img.png" --max-tokens 8 --json "What is this?")"
"$work/venv/bin/python" -c "import json,sys; d=json.loads(sys.argv[1]); assert len(d['tokens'])==8, d; print('factedge ask from the wheel:', d['tokens'])" "$out"
