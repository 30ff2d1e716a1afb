"""Find and load the patched llama.cpp that factedge builds (one ggml per process).

The top-level CMakeLists.txt installs the shared libraries, a few data files and (unless built with
FACTEDGE_TOOLS=OFF) `llama-quantize` and `llama-mtmd-cli` under `factedge/_native/`. llama-cpp-python
is installed without native code of its own; we point it at our libraries through the variables it
reads (`LLAMA_CPP_LIB_PATH`, `MTMD_CPP_LIB`) *before* it is imported, so the process maps exactly one
libggml; ggml functions it does not bind are reached through libllama's handle (`linked_symbols`).
"""

from __future__ import annotations

import json
import os
import sys
import sysconfig
from functools import lru_cache
from pathlib import Path
from types import ModuleType

from factedge.edge.errors import NativeError

ENV_NATIVE_DIR = "FACTEDGE_NATIVE_DIR"
_LIB_NAME = {"linux": "libllama.so", "darwin": "libllama.dylib", "win32": "llama.dll"}


def _candidates() -> list[Path]:
    found: list[Path] = []
    if os.environ.get(ENV_NATIVE_DIR):
        found.append(Path(os.environ[ENV_NATIVE_DIR]))
    import factedge

    found += [Path(p) / "_native" for p in getattr(factedge, "__path__", [])]
    for key in ("platlib", "purelib"):
        found.append(Path(sysconfig.get_paths()[key]) / "factedge" / "_native")
    return found


def _lib_file_name() -> str:
    for prefix, name in _LIB_NAME.items():
        if sys.platform.startswith(prefix):
            return name
    return "libllama.so"


@lru_cache(maxsize=1)
def native_dir() -> Path:
    """The folder with lib/, bin/ and share/ of the patched build."""
    for cand in _candidates():
        if (cand / "lib" / _lib_file_name()).is_file():
            return cand.resolve()
    tried = ", ".join(str(c) for c in _candidates())
    raise NativeError(
        f"patched llama.cpp libraries not found (tried {tried}); run `bash scripts/setup.sh` "
        f"or set {ENV_NATIVE_DIR}"
    )


def lib_dir() -> Path:
    return native_dir() / "lib"


def tool(name: str) -> Path:
    """Path of a native tool (`llama-quantize`, `llama-mtmd-cli`): the benchmarks and tests run them."""
    exe = native_dir() / "bin" / (name + (".exe" if sys.platform == "win32" else ""))
    if not exe.is_file():
        raise NativeError(f"native tool {name} missing from the factedge build "
                          f"(build it with FACTEDGE_TOOLS=ON bash scripts/setup.sh)", exe)
    return exe


def share_file(name: str) -> Path:
    """A data file installed with the build (e.g. `ggml-vocab-llama-spm.gguf`)."""
    path = native_dir() / "share" / name
    if not path.is_file():
        raise NativeError("data file missing from the factedge build", path)
    return path


def spm_vocab() -> Path:
    """The real LLaMA SPM vocab shipped in llama-cpp-python's sdist (with .inp/.out test vectors)."""
    return share_file("ggml-vocab-llama-spm.gguf")


def build_info() -> dict:
    """What was built: llama-cpp-python version, sdist sha256, patches applied, backends."""
    return json.loads(share_file("build_info.json").read_text())


def load_llama_cpp() -> ModuleType:
    """Import llama_cpp bound to our libraries; refuse if it was already bound to others."""
    libs = str(lib_dir())
    if "llama_cpp" in sys.modules:
        bound = os.environ.get("LLAMA_CPP_LIB_PATH")
        if bound != libs:
            raise NativeError(
                f"llama_cpp was imported before factedge and is bound to {bound or 'its own libraries'}; "
                "import factedge.edge first"
            )
    os.environ["LLAMA_CPP_LIB_PATH"] = libs
    os.environ["MTMD_CPP_LIB"] = libs
    try:
        import llama_cpp
        import llama_cpp.mtmd_cpp  # noqa: F401  (binds libmtmd from the same folder)
    except (OSError, RuntimeError) as exc:
        raise NativeError(f"cannot load the patched llama.cpp: {exc}", libs) from exc
    return llama_cpp


def linked_symbols():
    """A ctypes handle for ggml functions that llama-cpp-python does not bind (`ggml_threadpool_new`,
    `ggml_quantize_chunk`, ...), resolved in the very libraries libllama was loaded with.

    Why not `ctypes.CDLL(lib_dir() / "libggml-cpu.so")`: a wheel cannot hold symlinks, so an installed
    build has `libggml-cpu.so`, `.so.0` and `.so.0.25.3` as three separate files; opening another name
    than the one the loader picked maps a *second* ggml with its own globals (a thread pool made by it
    computed garbage). dlsym on libllama's own handle searches libllama's dependencies instead. The
    wrapper is our own (same handle, no new dlopen), so the argtypes callers set never touch
    llama-cpp-python's bindings.
    """
    import ctypes

    bound = load_llama_cpp().llama_cpp._lib
    return ctypes.CDLL(bound._name, handle=bound._handle)
