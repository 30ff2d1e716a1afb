"""A persistent ggml CPU thread pool for a llama.cpp context, as llama.cpp's own CLIs attach one.

Why: a context without one makes ggml start its worker threads afresh for every graph it computes,
i.e. for every generated token, and the workers sleep between ops instead of polling. llama-mtmd-cli
attaches a pool (hybrid polling, ggml's default level 50) through llama.cpp's `common` code; without
one, factedge decoded 11% slower than the CLI on the same files (BENCHMARKS.md, "factedge vs
llama-mtmd-cli"). llama-cpp-python binds neither the pool nor `llama_attach_threadpool`, so this
module does, on the libraries factedge built.
"""

from __future__ import annotations

import ctypes
from functools import lru_cache

from factedge.edge.errors import ConfigError, NativeError
from factedge.edge.native import lib_dir

_MAX_THREADS = 512  # GGML_MAX_N_THREADS: the size of the cpumask array in the struct


class _PoolParams(ctypes.Structure):
    _fields_ = [("cpumask", ctypes.c_bool * _MAX_THREADS), ("n_threads", ctypes.c_int), ("prio", ctypes.c_int),
                ("poll", ctypes.c_uint32), ("strict_cpu", ctypes.c_bool), ("paused", ctypes.c_bool)]


def _open(stem: str) -> ctypes.CDLL:
    for name in (f"lib{stem}.so", f"lib{stem}.dylib", f"{stem}.dll"):
        path = lib_dir() / name
        if path.is_file():
            return ctypes.CDLL(str(path))
    raise NativeError(f"{stem} not found in the factedge build", lib_dir())


@lru_cache(maxsize=1)
def _libs() -> tuple[ctypes.CDLL, ctypes.CDLL, ctypes.CDLL]:
    base, cpu, llama = _open("ggml-base"), _open("ggml-cpu"), _open("llama")
    base.ggml_threadpool_params_init.argtypes = [ctypes.POINTER(_PoolParams), ctypes.c_int]
    base.ggml_threadpool_params_init.restype = None
    cpu.ggml_threadpool_new.argtypes = [ctypes.POINTER(_PoolParams)]
    cpu.ggml_threadpool_new.restype = ctypes.c_void_p
    cpu.ggml_threadpool_free.argtypes = [ctypes.c_void_p]
    cpu.ggml_threadpool_free.restype = None
    llama.llama_attach_threadpool.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    llama.llama_attach_threadpool.restype = None
    llama.llama_detach_threadpool.argtypes = [ctypes.c_void_p]
    llama.llama_detach_threadpool.restype = None
    return base, cpu, llama


class ThreadPool:
    """`n_threads` ggml CPU workers with ggml's default (hybrid) polling; attach to a context, and
    free only after the context (or detach first)."""

    def __init__(self, n_threads: int):
        if not 1 <= int(n_threads) <= _MAX_THREADS:  # ggml would crash, not fail, on 0
            raise ConfigError(f"a thread pool needs 1 to {_MAX_THREADS} threads, not {n_threads}")
        base, cpu, _ = _libs()
        params = _PoolParams()
        base.ggml_threadpool_params_init(ctypes.byref(params), int(n_threads))
        self.n_threads = int(n_threads)
        self._ptr = cpu.ggml_threadpool_new(ctypes.byref(params))
        if not self._ptr:
            raise NativeError(f"cannot start a ggml thread pool of {n_threads} threads", lib_dir())

    def attach(self, ctx_ptr) -> None:
        """Use this pool for the context's single-token decodes and its prompt batches alike."""
        _libs()[2].llama_attach_threadpool(ctx_ptr, self._ptr, self._ptr)

    @staticmethod
    def detach(ctx_ptr) -> None:
        _libs()[2].llama_detach_threadpool(ctx_ptr)

    def close(self) -> None:
        if self._ptr:
            _libs()[1].ggml_threadpool_free(self._ptr)
            self._ptr = None
