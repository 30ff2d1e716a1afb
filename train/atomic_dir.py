"""Write a folder under a temporary name and publish it with one rename.

Model folders, adapters and checkpoints are several files; a crash half-way must never leave a
folder that looks complete, so every writer in train/ builds `.<name>.tmp-<pid>` beside the target
and renames it into place only when all files are written.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from factedge.edge.errors import OutputError


@contextmanager
def building_dir(out: Path, what: str) -> Iterator[Path]:
    """Yield an empty temp folder beside `out`; on success it replaces `out`, on OSError it is removed
    and an OutputError naming `out` and `what` is raised."""
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OutputError(f"cannot write {what}: {exc}", out) from exc
    finally:
        if tmp.exists():  # an exception other than OSError: leave nothing behind
            shutil.rmtree(tmp, ignore_errors=True)
