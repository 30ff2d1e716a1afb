#!/usr/bin/env bash
# The GPU machine's run for issue #18 (one device call). Run from the repository root with `.gpukit/`
# (scripts/slim_sdist.py's output) and `.whl/` (gguf and diskcache wheels) carried along:
#   bash bench/speed/gpu_run.sh [TOOLS=ON|OFF]
# Toolchain report; the CUDA build with the system compiler (that machine sets CC/CXX/CUDAHOSTCXX to
# a GCC without a shared libstdc++) and the C++ runtime check; the import-order tests; CPU-vs-GPU
# parity; a 7B-shaped LM + CLIP-L/14 written directly (while the build runs), quantized, and timed.
set -uo pipefail
export PYTHONUNBUFFERED=1
root="$(pwd)"; tools="${1:-OFF}"
work="$root/build/gpuwork"; site="$root/build/site"; pkg="$root/build/fepkg"; prefix="$root/build/cuda-install"
mkdir -p "$work" "$site" "$pkg/factedge"
export PYTHONPATH="$pkg:$site" FACTEDGE_NATIVE_DIR="$prefix/factedge/_native" FACTEDGE_TEST_CACHE="$work/tests"
log() { echo "== $(date +%T) $*"; }

log "toolchain: CC=${CC:-} CXX=${CXX:-} CUDAHOSTCXX=${CUDAHOSTCXX:-}"
for c in ${CXX:-} /usr/bin/g++; do echo "$c $("$c" -dumpfullversion) shared libstdc++: $("$c" -print-file-name=libstdc++.so)"; done
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl || exit 1
CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" python3 -m pip install -q --no-index --no-deps --no-build-isolation \
    --no-compile --target "$site" .gpukit/slim.tar.gz || exit 1
for d in edge convert train; do ln -sfn "$root/$d" "$pkg/factedge/$d"; done

log "configure with the environment's compiler (must be refused: no shared libstdc++)"
cmake -S . -B build/cuda-env -G Ninja -DFACTEDGE_BACKEND=cuda -DCMAKE_CUDA_ARCHITECTURES=90 \
    -DFACTEDGE_SDIST="$root/.gpukit/slim.tar.gz" 2>&1 | grep -A3 "has no shared libstdc" | head -4
log "configure + build with the system compiler (CUDA, sm_90, tools $tools)"
export CC=/usr/bin/gcc CXX=/usr/bin/g++ CUDAHOSTCXX=/usr/bin/g++
cmake -S . -B build/cuda -G Ninja -DFACTEDGE_BACKEND=cuda -DCMAKE_CUDA_ARCHITECTURES=90 -DCMAKE_BUILD_TYPE=Release \
    -DFACTEDGE_TOOLS="$tools" -DFACTEDGE_SDIST="$root/.gpukit/slim.tar.gz" > "$work/configure.log" 2>&1 \
    || { tail -30 "$work/configure.log"; exit 1; }
grep -E "factedge: CUDA|host compiler" "$work/configure.log" | head -3
vocab="$(ls "$root"/build/cuda/llama-src/*/vendor/llama.cpp/models/ggml-vocab-llama-spm.gguf)"
# the 7B-shaped f16 files need no native code: write them while llama.cpp compiles
FACTEDGE_SPM_VOCAB="$vocab" python3 -m bench.speed.gpu --part random7b --work "$work" --quants F16 > "$work/random7b.log" 2>&1 &
writer=$!
start=$(date +%s)
cmake --build build/cuda -j16 > "$work/build.log" 2>&1 || { tail -30 "$work/build.log"; exit 1; }
echo "build: $(( $(date +%s) - start )) s (with the 7B writer running beside it)"
cmake --install build/cuda --prefix "$prefix" 2>&1 | grep -iE "abi check|error"; echo "install rc=${PIPESTATUS[0]}"
lib="$(ls "$prefix"/factedge/_native/lib/libggml-cuda.so.* | head -1)"
echo "libggml-cuda NEEDED: $(readelf -d "$lib" | grep NEEDED | grep -o '\[.*\]' | tr '\n' ' ')"

log "tests on the CUDA build: C++ runtime, import order, preflight"
python3 -m pytest -q -x -p no:cacheprovider tests/edge/test_native_abi.py tests/edge/test_gguf_preflight.py 2>&1 | tail -3
log "import order with everything on the GPU"
python3 - "$work" <<'PY'
import numpy, PIL.Image, torch  # the imports that crashed the old CUDA build when they came first
import sys
from pathlib import Path
from factedge.train.base.tiny_cache import cached_tiny
from factedge.convert.bundle import ConvertOptions, convert_checkpoint
from factedge.edge.vision_model import ModelOptions, VisionModel
from factedge.edge.sampling import SamplingOptions
out = Path(sys.argv[1]) / "tiny-q8"
if not out.exists():
    convert_checkpoint(cached_tiny("llava-rlhf", image_size=224).root, out, ConvertOptions(quants=["Q8_0"], verify=False))
opts = ModelOptions(n_gpu_layers=-1, mmproj_on_gpu=True, sampling=SamplingOptions(max_tokens=8))
with VisionModel.open(out, options=opts) as chat:
    a = chat.ask("What is in the image?", numpy.full((300, 200, 3), 90, numpy.uint8))
print("GPU VisionModel after numpy+PIL+torch:", len(a.tokens), "tokens; torch.cuda", torch.cuda.is_available())
PY
log "parity CPU vs GPU (tiny f32 bundle)"
python3 -m bench.speed.gpu --part tiny --work "$work" > "$work/tiny.log" 2>&1 || tail -5 "$work/tiny.log"
python3 -m bench.speed.gpu --part parity --bundle "$work/tiny" --work "$work" --n-predict 32 2>&1 | grep -v Warning | tail -8
log "7B: quantize Q4_K_M, then speed with all layers + mmproj on the GPU"
wait $writer; tail -2 "$work/random7b.log"
python3 -m bench.speed.gpu --part quantize --bundle "$work/b7/bundle" --quants Q4_K_M --threads 16 2>&1 | tail -1
native_reps=0; [ "$tools" = ON ] && native_reps=1
python3 -m bench.speed.gpu --part speed --bundle "$work/b7/bundle" --work "$work" --quants Q4_K_M,F16 \
    --reps 3 --native-reps $native_reps --n-predict 128 2>&1 | grep -v "^{" | tail -8
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader
cp "$work"/*.log "${OUT:-/tmp}/" 2>/dev/null
