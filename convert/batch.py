"""`factedge convert --batch FILE`: many checkpoints, one summary.

The batch file is TOML or YAML: an optional `defaults` table of ConvertOptions fields and a list
`checkpoint` of entries, each with `src`, `out` and any option to override. An entry whose output
is up to date (same options, same source hashes) is skipped; a failing entry is reported and the
batch goes on.

    [defaults]
    quants = ["Q4_K_M", "Q8_0"]
    [[checkpoint]]
    src = "ckpts/LLaVA-RLHF-7b-v1.5-224"
    out = "gguf/llava-rlhf-7b"
    vision_tower = "ckpts/clip-vit-large-patch14"
"""

from __future__ import annotations

import os
import time
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable

import yaml

from factedge.convert.bundle import ConvertOptions, Progress, convert_checkpoint, source_hashes
from factedge.convert.layouts import load_checkpoint
from factedge.edge.errors import ConfigError, FactedgeError, InputError
from factedge.edge.manifest import MANIFEST, read_manifest

_PATH_FIELDS = {"vision_tower", "lora"}


@dataclass
class BatchEntry:
    src: Path
    out: Path
    options: ConvertOptions


@dataclass
class BatchResult:
    entry: BatchEntry
    status: str  # "converted" | "skipped" | "failed"
    seconds: float = 0.0
    error: str | None = None


def _options(raw: dict[str, Any], where: str, base: Path) -> ConvertOptions:
    known = {f.name for f in fields(ConvertOptions)}
    unknown = set(raw) - known
    if unknown:
        raise ConfigError(f"{where}: unknown option(s) {', '.join(sorted(unknown))}")
    values = dict(raw)
    for key in _PATH_FIELDS & set(values):
        values[key] = (base / values[key]) if values[key] is not None else None
    return ConvertOptions(**values)


def read_batch(path: Path) -> list[BatchEntry]:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise InputError(f"cannot read batch file: {exc.strerror}", path) from exc
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"not valid {'TOML' if path.suffix == '.toml' else 'YAML'}: {str(exc).splitlines()[0]}", path) from exc
    if not isinstance(data, dict) or not isinstance(data.get("checkpoint"), list) or not data["checkpoint"]:
        raise ConfigError("a batch file needs a non-empty list `checkpoint` of {src, out}", path)
    base = path.parent
    defaults = data.get("defaults") or {}
    entries = []
    for i, item in enumerate(data["checkpoint"]):
        if not isinstance(item, dict) or "src" not in item or "out" not in item:
            raise ConfigError(f"checkpoint #{i + 1} needs `src` and `out`", path)
        rest = {k: v for k, v in item.items() if k not in ("src", "out")}
        try:
            options = _options({**defaults, **rest}, f"checkpoint #{i + 1}", base).validated()
        except ConfigError as exc:
            raise ConfigError(exc.reason, path) from exc
        entries.append(BatchEntry(base / item["src"], base / item["out"], options))
    seen: dict[str, int] = {}
    for i, entry in enumerate(entries, 1):
        key = os.path.realpath(entry.out)
        if key in seen:
            raise ConfigError(f"checkpoint #{i} writes to {entry.out}, as checkpoint #{seen[key]} does", path)
        seen[key] = i
    return entries


def up_to_date(entry: BatchEntry) -> bool:
    """The bundle exists, was made with the same options, from sources with the same hashes."""
    if not (entry.out / MANIFEST).is_file():
        return False
    try:
        manifest = read_manifest(entry.out)
        if manifest.options != entry.options.key():
            return False
        ckpt = load_checkpoint(entry.src, vision_tower=entry.options.vision_tower, lora=entry.options.lora)
        return manifest.source.get("files") == source_hashes(ckpt)
    except FactedgeError:
        return False


def run_batch(entries: list[BatchEntry], progress: Progress | None = None,
              on_result: Callable[[BatchResult], None] | None = None) -> list[BatchResult]:
    results = []
    for entry in entries:
        start = time.perf_counter()
        if up_to_date(entry):
            result = BatchResult(entry, "skipped")
        else:
            entry.options.overwrite = True
            try:
                convert_checkpoint(entry.src, entry.out, entry.options, progress)
                result = BatchResult(entry, "converted")
            except FactedgeError as exc:
                result = BatchResult(entry, "failed", error=exc.one_line())
        result.seconds = time.perf_counter() - start
        results.append(result)
        if on_result:
            on_result(result)
    return results
