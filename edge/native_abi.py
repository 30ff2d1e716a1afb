"""Check that the native libraries share the system's C++ runtime instead of carrying their own.

A library linked against a private, static copy of libstdc++ (seen with a CUDA build whose host
compiler was a second GCC beside the system one) exports thousands of libstdc++'s own symbols and
lacks `NEEDED libstdc++.so.6`. Loaded after anything that maps the system libstdc++ (numpy, PIL,
torch), the two copies' locale state diverge and the first formatted integer crashes the process.
This check runs after every native build (CMakeLists.txt, all backends) and in the tests, so the
mistake fails the build with a clear message instead of segfaulting a user's first model load.

For each ELF shared library given: if it uses C++ (any `_ZNS`/`_ZSt`/`_ZNKS` symbol, defined or
not) it must list libstdc++.so.6 as NEEDED, and it must not define as strong (T/D/B/R) any symbol
the system libstdc++ exports (template instantiations a library emits are weak and allowed).
Standalone on purpose (stdlib + binutils' `nm`/`readelf`): CMake runs it before factedge is installed.

    python edge/native_abi.py LIBDIR_OR_FILE... [--libstdcxx PATH]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

_CXX_PREFIXES = ("_ZNS", "_ZSt", "_ZNKS", "_ZGVNS", "_ZTVNS", "_ZTSNS", "_ZTINS")
_STRONG = {"T", "D", "B", "R"}


class AbiError(Exception):
    """A library carries its own C++ runtime (or lacks the shared one)."""


def _run(args: list[str]) -> str:
    return subprocess.run(args, capture_output=True, text=True, check=True).stdout


def _is_elf(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(4) == b"\x7fELF"
    except OSError:
        return False


def _dynamic_symbols(path: Path) -> list[tuple[str, str]]:
    """(nm type letter, mangled name without version) of the dynamic symbol table."""
    out = []
    for line in _run(["nm", "-D", str(path)]).splitlines():
        parts = line.split()
        if len(parts) >= 2:
            kind, name = parts[-2], parts[-1]
            out.append((kind, name.split("@", 1)[0]))
    return out


def system_libstdcxx() -> Path:
    """The libstdc++.so.6 the build's C++ compiler links against (CXX, else c++/g++ on PATH)."""
    for cxx in (os.environ.get("CXX"), "c++", "g++"):
        if cxx and shutil.which(cxx.split()[0]):
            found = _run([*cxx.split(), "-print-file-name=libstdc++.so.6"]).strip()
            if os.path.isabs(found) and os.path.exists(found):
                return Path(os.path.realpath(found))
    raise AbiError("no C++ compiler found to locate the system libstdc++.so.6 (set CXX)")


def check_library(path: Path, libstdcxx_exports: set[str]) -> list[str]:
    """Problems of one library (empty: it shares the system C++ runtime)."""
    symbols = _dynamic_symbols(path)
    uses_cxx = any(name.startswith(_CXX_PREFIXES) for _, name in symbols)
    needed = [line.split("[", 1)[1].rstrip("]") for line in _run(["readelf", "-d", str(path)]).splitlines()
              if "(NEEDED)" in line and "[" in line]
    problems = []
    if uses_cxx and not any(n.startswith("libstdc++.so") for n in needed):
        problems.append("uses C++ but does not link libstdc++.so.6 dynamically (NEEDED lacks it)")
    private = sorted(name for kind, name in symbols if kind in _STRONG and name in libstdcxx_exports)
    if private:
        problems.append(f"defines {len(private)} of libstdc++'s own symbols (a private static copy), e.g. {private[0]}")
    return problems


def check_paths(paths: list[Path], libstdcxx: Path | None = None) -> dict[Path, list[str]]:
    """Problems by library for every ELF shared object in `paths` (folders are searched, links skipped)."""
    if not shutil.which("nm") or not shutil.which("readelf"):
        raise AbiError("binutils (nm, readelf) are needed for the C++ runtime check")
    libstdcxx = libstdcxx or system_libstdcxx()
    exports = {name for kind, name in _dynamic_symbols(libstdcxx) if kind in _STRONG | {"W", "V", "u"}}
    files: list[Path] = []
    for p in paths:
        found = sorted(p.rglob("*.so*")) if p.is_dir() else [p]
        files += [f for f in found if f.is_file() and not f.is_symlink() and _is_elf(f)]
    return {f: check_library(f, exports) for f in files}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", type=Path)
    parser.add_argument("--libstdcxx", type=Path, help="the libstdc++.so.6 to compare with (default: CXX's)")
    args = parser.parse_args(argv)
    if sys.platform != "linux":
        print("factedge native ABI check: skipped (ELF/Linux only)")
        return 0
    try:
        results = check_paths(args.paths, args.libstdcxx)
    except (AbiError, subprocess.CalledProcessError) as exc:
        print(f"factedge native ABI check: error: {exc}", file=sys.stderr)
        return 2
    bad = {f: p for f, p in results.items() if p}
    for f, problems in bad.items():
        for problem in problems:
            print(f"factedge native ABI check: {f.name}: {problem}", file=sys.stderr)
    if bad:
        print("factedge native ABI check: FAILED. The libraries must share the system C++ runtime: build "
              "with one compiler (set CC, CXX and, for CUDA, CUDAHOSTCXX to the system gcc/g++) so that "
              "libstdc++ is linked dynamically.", file=sys.stderr)
        return 1
    print(f"factedge native ABI check: {len(results)} libraries share the system libstdc++")
    return 0


if __name__ == "__main__":
    sys.exit(main())
