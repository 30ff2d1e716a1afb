"""Quantize one language-model GGUF with libllama's `llama_model_quantize`, in a child process.

Why not the `llama-quantize` binary: it is a thin argument parser around this one libllama function,
but it links llama.cpp's `common` library, which is 2.3 of the 5.8 minutes a 2-core machine spends
compiling the native build; nothing else factedge runs needs `common`. The function itself is in
libllama, which the runtime loads anyway, so the binary is only built on request (`FACTEDGE_TOOLS`).

Why a child process and not a call in the converter: a native abort on a bad file ends the child,
not the conversion (the parent turns the exit code and the log tail into a NativeError), and the
child's peak memory is the quantizer's alone, not the converter's with torch and a checkpoint loaded.

    python -m factedge.convert.quantize_worker SRC DST TYPE THREADS

The plain call of the binary (`llama-quantize SRC DST TYPE THREADS`) sets nothing but the type and
the thread count on the default parameters; so does this, and its output is byte-identical
(tests/convert/test_quantize_worker.py).
"""

from __future__ import annotations

import ctypes
import sys


def ftype_of(llama_cpp, name: str) -> int:
    """The `llama_ftype` value of a llama-quantize type name (`Q4_K_M`, `F16`, `F32`, ...)."""
    attr = "LLAMA_FTYPE_ALL_F32" if name == "F32" else f"LLAMA_FTYPE_MOSTLY_{name}"
    if not hasattr(llama_cpp, attr):
        raise ValueError(f"unknown quant type {name!r}")
    return int(getattr(llama_cpp, attr))


def quantize(src: str, dst: str, name: str, threads: int) -> int:
    """0 on success; libllama's own return code (non-zero) otherwise. Its log goes to stderr."""
    from factedge.edge.native import load_llama_cpp

    llama_cpp = load_llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype_of(llama_cpp, name)
    params.nthread = threads
    llama_cpp.llama_backend_init()
    try:
        return int(llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params)))
    finally:
        llama_cpp.llama_backend_free()


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        sys.stderr.write("usage: python -m factedge.convert.quantize_worker SRC DST TYPE THREADS\n")
        return 2
    src, dst, name, threads = argv
    try:
        rc = quantize(src, dst, name, int(threads))
    except (ValueError, OSError) as exc:
        sys.stderr.write(f"quantize_worker: {exc}\n")
        return 2
    if rc != 0:
        sys.stderr.write(f"quantize_worker: llama_model_quantize failed on {src}\n")
    return 1 if rc else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
