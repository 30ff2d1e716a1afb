"""Reading benchmark files and finding their images, with errors that name the file and the item.

Benchmarks are shared as JSON / JSONL whose image references are relative paths, bare file names or
URLs (MMHal-Bench's `image_src` points at Flickr). We never download: an image is looked up next to
the benchmark file and in a user-given `--images` folder, and a URL counts only through its basename.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from factedge.edge.errors import CorruptFileError, InputError


def read_records(path: Path) -> list[dict[str, Any]]:
    """A JSON list of objects, or JSONL (one object per line; blank lines skipped)."""
    path = Path(path)
    if not path.is_file():
        raise InputError("benchmark file not found", path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CorruptFileError(f"cannot read: {exc}", path) from exc
    stripped = text.lstrip()
    try:
        if stripped.startswith("["):
            records = json.loads(text)
        else:
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise CorruptFileError(f"not JSON or JSONL ({exc})", path) from exc
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise CorruptFileError("expected a list of JSON objects", path)
    if not records:
        raise InputError("benchmark file holds no items", path)
    return records


def is_url(ref: str) -> bool:
    return urlparse(ref).scheme in ("http", "https", "ftp")


def resolve_image(refs: list[str], *, base: Path, images: Path | None, source: Path, where: str) -> Path:
    """The first existing local file among `refs` (paths or URLs), tried as given, relative to the
    benchmark's folder and to `images`, then by basename in `images` and `<base>/images`."""
    tried: list[Path] = []
    for ref in refs:
        if not ref:
            continue
        name = Path(urlparse(ref).path).name if is_url(ref) else None
        candidates: list[Path] = []
        if name is None:
            p = Path(ref)
            candidates += [p] if p.is_absolute() else [base / p] + ([images / p] if images else [])
            name = p.name
        candidates += ([images / name] if images else []) + [base / "images" / name]
        for c in candidates:
            if c.is_file():
                return c
            tried.append(c)
    urls = [r for r in refs if r and is_url(r)]
    if urls and not any(r and not is_url(r) for r in refs):
        hint = f"pass --images DIR holding {Path(urlparse(urls[0]).path).name}" if images is None else \
            f"{images} has no {Path(urlparse(urls[0]).path).name}"
        raise InputError(f"{where}: the image is a URL ({urls[0]}) and no local copy was found; "
                         f"factedge does not download ({hint})", source)
    shown = ", ".join(str(t) for t in tried[:3]) or "no image reference"
    raise InputError(f"{where}: image not found (tried {shown})", source)
