"""Reading the recipe's JSON files (FACT_RLHF.md formats) with typed errors that name the file.

SFT conversations, LLaVA-Human-Preference-10K pairs, `image_to_caption.json` facts and PPO prompts
are all JSON; an item's `image` is a path relative to an image folder (LLaVA's `--image_folder`),
by default the JSON file's own folder or its `images/` sub-folder when that is where the file is.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from factedge.edge.errors import CorruptFileError, InputError


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise InputError("data file missing", path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptFileError(f"not valid JSON: {exc}", path) from exc


def read_items(path: str | Path, *, required: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """A JSON list of objects, each holding the `required` keys."""
    data = read_json(path)
    if not isinstance(data, list):
        raise CorruptFileError("expected a JSON list of items", path)
    for n, item in enumerate(data):
        if not isinstance(item, dict):
            raise CorruptFileError(f"item {n} is not an object", path)
        missing = [k for k in required if k not in item]
        if missing:
            raise CorruptFileError(f"item {n} ({item.get('id', '?')}) has no {', '.join(missing)}", path)
    if not data:
        raise InputError("no items", path)
    return data


def read_facts(path: str | Path) -> dict[str, list[str]]:
    """`image_to_caption.json`: image key -> list of fact strings."""
    data = read_json(path)
    if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
        raise CorruptFileError("expected an object mapping image keys to lists of strings", path)
    return {str(k): [str(x) for x in v] for k, v in data.items()}


def image_folder(data_file: str | Path, folder: str | Path | None) -> Path:
    """Where image paths of `data_file` are relative to."""
    return Path(folder) if folder else Path(data_file).resolve().parent


def image_path(folder: Path, name: str, data_file: str | Path | None = None) -> Path:
    """The image file for an item's `image` value (relative to `folder`, or `folder/images`)."""
    for cand in (folder / name, folder / "images" / name):
        if cand.is_file():
            return cand
    raise InputError(f"image {name!r} not found under {folder}", data_file)
