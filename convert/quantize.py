"""Quantization through llama.cpp itself: libllama's quantizer for the LM, ggml's kernels for the mmproj.

We never re-implement a quant format: the language model goes through `llama_model_quantize` of the
libllama built with our patches (in a child process, quantize_worker.py: what `llama-quantize` runs,
without the binary), and the mmproj (a `clip` GGUF that the LM quantizer does not take) through
`ggml_quantize_chunk` of the same libggml, called row-block by row-block.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType

from factedge.edge.errors import ConfigError, NativeError, OutputError
from factedge.edge.file_types import lm_quant
from factedge.edge.native import linked_symbols


def check_lm_quants(names: list[str]) -> list[str]:
    """Normalise and validate quant names (edge.file_types) before any work is done; no repeats."""
    out = []
    for name in names:
        norm = lm_quant(name)
        if norm in out:
            raise ConfigError(f"quant type {norm} is listed twice")
        out.append(norm)
    return out


def quantize_command(src: Path, dst: Path, quant: str, threads: int | None = None) -> list[str]:
    """The child process that quantizes SRC -> DST (what `llama-quantize SRC DST QUANT THREADS` does)."""
    quant = check_lm_quants([quant])[0]
    return [sys.executable, "-m", "factedge.convert.quantize_worker", str(src), str(dst), quant,
            str(threads or os.cpu_count() or 1)]


def quantize_language_model(src: Path, dst: Path, quant: str, *, threads: int | None = None) -> Path:
    """Quantize SRC -> DST in a child process; DST appears only when it succeeded."""
    quant = check_lm_quants([quant])[0]
    tmp = dst.with_name(f".{dst.name}.tmp")
    try:
        returncode, stderr = _run_child(quantize_command(src, tmp, quant, threads))
        if returncode != 0:
            lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
            raise NativeError(f"quantizing to {quant} failed ({' | '.join(lines[-3:])})", src)
        os.replace(tmp, dst)
    except OSError as exc:
        raise OutputError(f"cannot write {quant} model: {exc.strerror or exc}", dst) from exc
    finally:
        tmp.unlink(missing_ok=True)
    return dst


def _run_child(command: list[str]) -> tuple[int, str]:
    """Run the worker; if we are interrupted (Ctrl-C, or SIGTERM turned into SystemExit by the CLI)
    the worker is stopped and reaped before the exception goes on, so no orphan keeps writing."""
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _, stderr = proc.communicate()
    except BaseException:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        raise
    return proc.returncode, stderr


@lru_cache(maxsize=1)
def _ggml() -> ctypes.CDLL:
    """ggml-base's quantizer, from the copy libllama itself uses (edge.native.linked_symbols says why)."""
    lib = linked_symbols()
    lib.ggml_row_size.restype = ctypes.c_size_t
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    return lib


def ggml_quantize(weights: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """Quantize a 2-D float32 matrix (rows x n_per_row) with ggml: uint8 [rows, row_bytes]."""
    src = np.ascontiguousarray(weights, dtype=np.float32)
    if src.ndim != 2:
        raise ValueError(f"ggml_quantize takes 2-D matrices, got shape {src.shape}")
    rows, n_per_row = src.shape
    lib = _ggml()
    row_bytes = lib.ggml_row_size(int(qtype), n_per_row)
    dst = np.empty((rows, row_bytes), dtype=np.uint8)
    written = lib.ggml_quantize_chunk(int(qtype), src.ctypes.data, dst.ctypes.data, 0, rows, n_per_row, None)
    if written != dst.nbytes:
        raise NativeError(f"ggml_quantize_chunk wrote {written} bytes, expected {dst.nbytes}")
    return dst


def can_quantize(shape: tuple[int, ...], qtype: GGMLQuantizationType) -> bool:
    """A matrix quantizes when it is 2-D and its rows are whole blocks of the type."""
    from gguf import GGML_QUANT_SIZES

    block, _ = GGML_QUANT_SIZES[qtype]
    return len(shape) == 2 and shape[-1] % block == 0
