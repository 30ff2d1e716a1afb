"""The native libraries share the system C++ runtime, and loading them works whatever was imported
first (issue #18: a CUDA build with a private libstdc++ segfaulted once numpy, PIL or torch had
mapped the system one). CI checks the CPU build; the same tests run on the GPU machine's CUDA build.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(sys.platform != "linux" or not shutil.which("nm"), reason="ELF + binutils only")


def _abi(*paths) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "edge" / "native_abi.py"), *map(str, paths)],
                          capture_output=True, text=True, timeout=300)


def test_the_installed_libraries_share_the_system_libstdcxx(native_tools):
    result = _abi(Path(native_tools) / "lib")
    assert result.returncode == 0, result.stderr
    assert "share the system libstdc++" in result.stdout


@pytest.mark.skipif(not shutil.which("g++"), reason="needs g++")
def test_a_private_static_libstdcxx_fails_the_check(tmp_path):
    src = tmp_path / "a.cpp"
    src.write_text('#include <sstream>\nextern "C" int f(long x) { std::ostringstream s; s << x; return (int)s.str().size(); }\n')
    subprocess.run(["g++", "-shared", "-fPIC", "-O1", str(src), "-o", str(tmp_path / "libgood.so")], check=True)
    subprocess.run(["g++", "-shared", "-fPIC", "-O1", "-static-libstdc++", str(src), "-o", str(tmp_path / "libbad.so")],
                   check=True)
    assert _abi(tmp_path / "libgood.so").returncode == 0
    bad = _abi(tmp_path / "libbad.so")
    assert bad.returncode == 1
    assert "libbad.so: uses C++ but does not link libstdc++.so.6 dynamically" in bad.stderr
    assert "libbad.so: defines" in bad.stderr and "private static copy" in bad.stderr
    assert "set CC, CXX and, for CUDA, CUDAHOSTCXX" in bad.stderr


FIRST_IMPORTS = {
    "numpy": "import numpy",
    "PIL": "import PIL.Image",
    "libstdc++": "import ctypes; ctypes.CDLL('libstdc++.so.6')",
    "torch": "import torch",
}


@pytest.mark.parametrize("first", sorted(FIRST_IMPORTS))
def test_a_model_and_an_mmproj_load_whatever_was_imported_first(make_bundle, tiny_llava_rlhf, first):
    """A fresh process imports `first`, then loads the LM and the mmproj through factedge, encodes an
    image and decodes (the crash was in the first formatted integer of the model load's log)."""
    if first == "torch":
        pytest.importorskip("torch")
    bundle = make_bundle(tiny_llava_rlhf, name="tiny-rlhf", quants=[], mmproj_types=["f16"])
    code = (f"{FIRST_IMPORTS[first]}\n"
            "import sys, numpy as np\n"
            "from factedge.edge.runtime import Model, Context, ContextOptions\n"
            "from factedge.edge.image_encoder import ImageEncoder\n"
            "m = Model(sys.argv[1]); e = ImageEncoder(sys.argv[2], m)\n"
            "emb = e.encode(np.full((224, 224, 3), 120, np.uint8))\n"
            "c = Context(m, ContextOptions(n_ctx=512)); logits = c.feed([[1, 2, 3], emb])\n"
            "assert emb.shape == (256, m.n_embd) and np.isfinite(logits).all()\n"
            "print('ok', emb.shape)\n")
    result = subprocess.run([sys.executable, "-c", code, str(bundle / "model-f16.gguf"), str(bundle / "mmproj-f16.gguf")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "ok (256," in result.stdout, (result.returncode, result.stderr[-2000:])
