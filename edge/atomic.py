"""Write files and folders so that no reader ever sees them half-written: the one place that does it.

Everything factedge writes (bundles' manifests and cards, run folders, checkpoints, results, world
data, the REPL's transcripts, the hash cache) goes to a temporary name beside its target, created by
this process (`.<name>.tmp-<pid>-<random>`), and is renamed into place only when complete; a failure
removes the temporary and raises OutputError naming the target. Only what this module created is
ever deleted. It lives in edge/, the ground floor: every wing may import it, it imports no wing.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from factedge.edge.errors import OutputError


def temp_sibling(path: Path, kind: str = "tmp") -> Path:
    """A fresh, unused name beside `path` for this process to create."""
    while True:
        candidate = path.with_name(f".{path.name}.{kind}-{os.getpid()}-{secrets.token_hex(3)}")
        if not candidate.exists() and not candidate.is_symlink():
            return candidate


@contextmanager
def atomic_path(path: str | Path, *, make_parents: bool = True) -> Iterator[Path]:
    """Yield a temp path beside `path`; it replaces `path` only if the block succeeds."""
    path = Path(path)
    tmp = temp_sibling(path)
    try:
        if make_parents:
            path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        os.replace(tmp, path)
    except OSError as exc:
        raise OutputError(f"cannot write: {exc.strerror or exc}", path) from exc
    finally:
        if tmp.exists() or tmp.is_symlink():
            tmp.unlink()


def write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: Any, *, indent: int | None = 2, sort_keys: bool = False,
               default=None) -> Path:
    """JSON with a trailing newline, UTF-8 kept as is (HF writes its configs with sort_keys=True)."""
    text = json.dumps(obj, indent=indent, sort_keys=sort_keys, ensure_ascii=False, default=default) + "\n"
    return write_text(path, text)


@contextmanager
def building_dir(out: Path, what: str) -> Iterator[Path]:
    """Yield an empty staging folder beside `out` (created here); on success it replaces `out`, on
    failure it is removed and OutputError names `out` and `what`. A previous `out` is set aside under a
    fresh name and deleted only once the new one is in place."""
    out = Path(out)
    tmp = temp_sibling(out)
    old = None
    try:
        tmp.mkdir(parents=True)
        yield tmp
        if out.exists():
            old = temp_sibling(out, "old")
            os.replace(out, old)
        os.replace(tmp, out)
    except OSError as exc:
        if old is not None and not out.exists():
            os.replace(old, out)
            old = None
        raise OutputError(f"cannot write {what}: {exc.strerror or exc}", out) from exc
    finally:
        for leftover in (tmp, old):
            if leftover is not None and leftover.exists():
                shutil.rmtree(leftover, ignore_errors=True)


__all__ = ["atomic_path", "building_dir", "temp_sibling", "write_bytes", "write_json", "write_text"]
