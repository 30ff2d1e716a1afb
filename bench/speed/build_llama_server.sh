#!/usr/bin/env bash
# Build llama.cpp's own llama-server and llama-batched-bench from factedge's patched tree, for
# bench/speed/batch_speed.py and bench/speed/batch_ceiling.py only (factedge never runs them). Same
# source, same CPU flags as the native build (GGML_NATIVE, llamafile sgemm, repack); static libraries,
# no web UI, no curl/openssl. Output: .cache/llama-server/bin/llama-server and llama-batched-bench
#   bash bench/speed/build_llama_server.sh [jobs]
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
src="$(ls -d "$root"/build/native/llama-src/llama_cpp_python-*/vendor/llama.cpp | head -1)"
[ -d "$src" ] || { echo "build the native libraries first (scripts/setup.sh): no patched tree under build/native" >&2; exit 1; }
out="$root/.cache/llama-server"
cmake -S "$src" -B "$out" -G Ninja -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
  -DGGML_NATIVE=ON -DGGML_LLAMAFILE=ON -DGGML_OPENMP=OFF -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
  -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF > "$out.configure.log"
cmake --build "$out" --target llama-server llama-batched-bench -j "${1:-2}"
echo "$out/bin/llama-server"
