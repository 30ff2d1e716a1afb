"""Check a bundle's files against the sha256 in its manifest, once per file version.

A model file damaged on disk (or swapped by someone else) would otherwise reach llama.cpp. Hashing
a 4 GB GGUF takes seconds, so a verified hash is remembered in a small cache keyed by the file's
real path, size and modification time (`$FACTEDGE_CACHE` or `~/.cache/factedge`, `verified.json`):
the next open of the same unchanged file costs a stat, and any change to it is hashed again.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from factedge.edge.atomic import write_json
from factedge.edge.errors import CorruptFileError, OutputError
from factedge.edge.manifest import sha256_file

CACHE_FILE = "verified.json"


def cache_dir() -> Path:
    return Path(os.environ.get("FACTEDGE_CACHE") or Path.home() / ".cache" / "factedge")


def _key(path: Path) -> tuple[str, list[int]]:
    info = os.stat(path)
    return os.path.realpath(path), [info.st_size, info.st_mtime_ns]


def _load(cache: Path) -> dict:
    try:
        data = json.loads(cache.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError, RecursionError):
        return {}  # a missing or damaged cache only costs a re-hash


def _store(cache: Path, data: dict) -> None:
    try:
        write_json(cache, data, indent=None)
    except OutputError:
        pass  # a read-only home still verifies, it just hashes again next time


def check_sha256(files: list[tuple[Path, str]]) -> None:
    """Each (path, expected sha256) matches, or CorruptFileError naming the file that does not."""
    cache = cache_dir() / CACHE_FILE
    known = _load(cache)
    changed = False
    for path, expected in files:
        real, stamp = _key(path)
        entry = known.get(real)
        if entry == {"stamp": stamp, "sha256": expected}:
            continue
        actual = sha256_file(path)
        if actual != expected:
            raise CorruptFileError(f"sha256 {actual[:12]}... differs from the manifest's {expected[:12]}... "
                                   "(the file was changed or damaged after conversion)", path)
        known[real] = {"stamp": stamp, "sha256": expected}
        changed = True
    if changed:
        _store(cache, known)


__all__ = ["check_sha256", "cache_dir"]
