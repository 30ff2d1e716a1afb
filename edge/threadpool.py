"""A persistent ggml CPU thread pool for a llama.cpp context, as llama.cpp's own CLIs attach one.

Why: a context without one makes ggml start its worker threads afresh for every graph it computes,
i.e. for every generated token, and the workers sleep between ops instead of polling. llama-mtmd-cli
attaches a pool (hybrid polling, ggml's default level 50) through llama.cpp's `common` code; without
one, factedge decoded 11% slower than the CLI on the same files (BENCHMARKS.md, "factedge vs
llama-mtmd-cli"). llama-cpp-python binds neither the pool nor `llama_attach_threadpool`, so this
module does, through libllama's own handle (`native.linked_symbols`: never a second copy of ggml).
"""

from __future__ import annotations

import ctypes
import os
from functools import lru_cache

from factedge.edge.errors import ConfigError, NativeError
from factedge.edge.native import linked_symbols

_MAX_THREADS = 512  # GGML_MAX_N_THREADS: the size of the cpumask array in the struct


class _PoolParams(ctypes.Structure):
    _fields_ = [("cpumask", ctypes.c_bool * _MAX_THREADS), ("n_threads", ctypes.c_int), ("prio", ctypes.c_int),
                ("poll", ctypes.c_uint32), ("strict_cpu", ctypes.c_bool), ("paused", ctypes.c_bool)]


@lru_cache(maxsize=1)
def _lib() -> ctypes.CDLL:
    lib = linked_symbols()  # the ggml libllama uses, never a second copy (native.linked_symbols)
    lib.ggml_threadpool_params_init.argtypes = [ctypes.POINTER(_PoolParams), ctypes.c_int]
    lib.ggml_threadpool_params_init.restype = None
    lib.ggml_threadpool_new.argtypes = [ctypes.POINTER(_PoolParams)]
    lib.ggml_threadpool_new.restype = ctypes.c_void_p
    lib.ggml_threadpool_free.argtypes = [ctypes.c_void_p]
    lib.ggml_threadpool_free.restype = None
    lib.ggml_threadpool_pause.argtypes = [ctypes.c_void_p]
    lib.ggml_threadpool_pause.restype = None
    lib.llama_attach_threadpool.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    lib.llama_attach_threadpool.restype = None
    lib.llama_detach_threadpool.argtypes = [ctypes.c_void_p]
    lib.llama_detach_threadpool.restype = None
    return lib


def usable_cpus() -> int:
    """The CPUs this process may run on: the cap for every default thread count (more threads than
    CPUs make polling workers and barriers wait out scheduler slices)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


class ThreadPool:
    """`n_threads` ggml CPU workers with ggml's default (hybrid) polling; attach to a context, and
    free only after the context (or detach first)."""

    def __init__(self, n_threads: int):
        if not 1 <= int(n_threads) <= _MAX_THREADS:  # ggml would crash, not fail, on 0
            raise ConfigError(f"a thread pool needs 1 to {_MAX_THREADS} threads, not {n_threads}")
        lib = _lib()
        params = _PoolParams()
        lib.ggml_threadpool_params_init(ctypes.byref(params), int(n_threads))
        self.n_threads = int(n_threads)
        self._ptr = lib.ggml_threadpool_new(ctypes.byref(params))
        if not self._ptr:
            raise NativeError(f"cannot start a ggml thread pool of {n_threads} threads")

    def attach(self, ctx_ptr) -> None:
        """Use this pool for the context's single-token decodes and its prompt batches alike."""
        _lib().llama_attach_threadpool(ctx_ptr, self._ptr, self._ptr)

    @staticmethod
    def detach(ctx_ptr) -> None:
        _lib().llama_detach_threadpool(ctx_ptr)

    def pause(self) -> None:
        """Stop the idle workers' polling until the next graph (ggml resumes a paused pool itself).

        Why: after each decode the workers poll for new work for up to ~10^8 cycles (level 50); CPU
        work done meanwhile on other threads, such as libmtmd encoding an image with its own threads,
        then runs oversubscribed and waits out scheduler slices at every barrier (an image of the demo
        model: 1 ms alone, a median 82 ms inside `eval pope`). Only from the thread that decodes on
        this pool: a pause that lands between a graph's kickoff and a worker picking it up would put
        that worker to sleep while the graph waits for it."""
        if self._ptr:
            _lib().ggml_threadpool_pause(self._ptr)

    def close(self) -> None:
        if self._ptr:
            _lib().ggml_threadpool_free(self._ptr)
            self._ptr = None
