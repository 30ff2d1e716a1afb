"""`factedge convert`: one checkpoint -> a bundle folder (LM GGUFs, mmproj, adapter, manifest, card).

Everything is written into a staging folder `.<out>.partial-<pid>-<random>/` that this run creates
(edge.atomic.temp_sibling: never one that existed before) and renamed to `<out>` only when complete, so an interrupted or failed
conversion leaves no folder that looks finished, and a failure removes the staging folder and any
parent folder it created. Options, the output path and the native tools are checked before the
checkpoint is read. An existing output is refused unless `overwrite` is set (mlx-lm's rule), and even
then only a bundle holding nothing but what factedge wrote (its manifest's files, the manifest, the
card) is replaced, once the new one is complete: a folder of the user's is never deleted, nor a file
the user added to a bundle.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from factedge.convert.language_model import write_language_model
from factedge.convert.layouts import load_checkpoint
from factedge.convert.lora_gguf import write_lora_adapter
from factedge.convert.merge import check_targets, merged_lm_tensors, read_adapter
from factedge.convert.mmproj import write_mmproj
from factedge.convert.quantize import check_lm_quants, quantize_language_model
from factedge.convert.shapes import lm_shapes
from factedge.convert.specs import Checkpoint
from factedge.edge.atomic import temp_sibling, write_text
from factedge.edge.file_types import (MMPROJ_TYPES, adapter_file, base_model_file, lm_base_type, mmproj_file,
                                      mmproj_type, quant_model_file)
from factedge.edge.errors import ConfigError, OutputError
from factedge.edge.manifest import (FINGERPRINT_KEY, LORA_MERGED_KEY, MANIFEST, BundleFile, Fingerprint, Manifest,
                                    sha256_file)
from factedge.edge.native import native_dir

LORA_MODES = ("merge", "adapter")

# (step name, done, total) -> None: the CLI turns this into progress bars
Progress = Callable[[str, int, int], None]


@dataclass
class ConvertOptions:
    """What to produce. Field groups: input, language model, vision, checks."""

    # input
    vision_tower: Path | None = None
    lora: Path | None = None  # a PEFT adapter folder; LLaVA-RLHF's is found automatically
    lora_mode: str = "merge"  # "merge" into the LM, or keep as a runtime "adapter" GGUF
    # language model
    base_type: str = "f16"  # the unquantized LM file
    quants: list[str] = field(default_factory=lambda: ["Q4_K_M", "Q8_0"])
    # vision
    mmproj_types: list[str] = field(default_factory=lambda: ["f16"])
    # checks
    verify: bool = True
    overwrite: bool = False
    threads: int = 0

    def validated(self) -> "ConvertOptions":
        if self.lora_mode not in LORA_MODES:
            raise ConfigError(f"lora mode must be one of {', '.join(LORA_MODES)}, not {self.lora_mode!r}")
        self.base_type = lm_base_type(self.base_type)
        self.quants = check_lm_quants(_names(self.quants))
        self.mmproj_types = [mmproj_type(t) for t in _names(self.mmproj_types)]
        if not self.mmproj_types:
            raise ConfigError(f"at least one mmproj type is needed ({', '.join(MMPROJ_TYPES)})")
        if len(set(self.mmproj_types)) != len(self.mmproj_types):
            raise ConfigError("an mmproj type is listed twice")
        return self

    def key(self) -> dict:
        """The options that change the output (for batch up-to-date checks)."""
        d = asdict(self)
        for k in ("verify", "overwrite", "threads"):
            d.pop(k)
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}


def _names(value: str | list[str]) -> list[str]:
    """A list of type names; "Q4_K_M,Q8_0" (a string, as in a batch file) is split on commas."""
    if isinstance(value, str):
        return [v for v in (s.strip() for s in value.split(",")) if v]
    return list(value)


def source_hashes(ckpt: Checkpoint) -> dict[str, str]:
    files = sorted(set(ckpt.source_files))
    if ckpt.adapter_dir is not None:
        files += sorted(p for p in Path(ckpt.adapter_dir).iterdir() if p.is_file())
    return {str(p): sha256_file(p) for p in files}


def fingerprint(ckpt: Checkpoint, hashes: dict[str, str]) -> Fingerprint:
    """LM width + base weights + image contract: what an mmproj/adapter must share with the LM."""
    adapter = str(ckpt.adapter_dir) if ckpt.adapter_dir else None
    base = hashlib.sha256("".join(h for p, h in sorted(hashes.items()) if adapter is None or not p.startswith(adapter)).encode())
    return Fingerprint(ckpt.text.hidden_size, base.hexdigest(), ckpt.vision.image_size, ckpt.vision.tokens_per_image)


def _check_out(out: Path, overwrite: bool) -> None:
    """Refuse an output we must not write, before any work is done."""
    if out.is_file():
        raise OutputError("output path is a file, not a folder", out)
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise OutputError("output exists (use --overwrite to replace it)", out)
        if out.is_symlink() or not out.is_dir():
            raise OutputError("output exists and is not a folder; refusing to replace it", out)
        if any(out.iterdir()):
            foreign = _foreign_files(out)
            if foreign:
                raise OutputError(f"output holds {foreign[0]!r}" + (f" and {len(foreign) - 1} more" if len(foreign) > 1 else "")
                                  + ", which factedge did not write; refusing to replace it", out)
    parent = _existing_ancestor(out.parent)
    if not parent.is_dir():
        raise OutputError("cannot create the output folder: a parent is a file", parent)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError("output folder is not writable", parent)


def _foreign_files(out: Path) -> list[str]:
    """Names in an existing output that its manifest does not account for (all of them without one)."""
    from factedge.convert.card import CARD
    from factedge.edge.errors import FactedgeError
    from factedge.edge.manifest import read_manifest

    names = sorted(p.name for p in out.iterdir())
    try:
        ours = {f.name for f in read_manifest(out).files} | {MANIFEST, CARD}
    except FactedgeError:
        return names
    return [n for n in names if n not in ours]


def _existing_ancestor(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _prepare_out(out: Path) -> tuple[Path, list[Path]]:
    """Create a fresh staging folder beside `out` (and missing parents); returns it and the parents created."""
    created: list[Path] = []
    parent = Path(os.path.abspath(out.parent))
    missing = [p for p in [parent, *parent.parents] if not p.exists()]
    try:
        for folder in reversed(missing):
            folder.mkdir()
            created.append(folder)
        staging = temp_sibling(out, "partial")
        staging.mkdir()  # exclusive: fails rather than reuse anything
    except OSError as exc:
        _remove_created(created)
        raise OutputError(f"cannot create the output folder: {exc.strerror or exc}", exc.filename or out) from exc
    return staging, created


def _remove_created(created: list[Path]) -> None:
    for folder in reversed(created):
        try:
            folder.rmdir()
        except OSError:
            break


def _move_into_place(staging: Path, out: Path) -> None:
    """Rename the finished staging folder to `out`; an old bundle is set aside (under a fresh name)
    until that succeeded, then deleted."""
    old = temp_sibling(out, "old")
    try:
        if out.exists():
            os.replace(out, old)
        try:
            os.replace(staging, out)
        except OSError:
            if old.exists():
                os.replace(old, out)
            raise
    except OSError as exc:
        raise OutputError(f"cannot move the finished bundle into place: {exc.strerror or exc}", out) from exc
    shutil.rmtree(old, ignore_errors=True)


def check_native_tools(options: ConvertOptions) -> None:
    """The native libraries this conversion will need, found before any work (NativeError if not)."""
    if options.quants:
        native_dir()


def convert_checkpoint(src: Path, out: Path, options: ConvertOptions | None = None,
                       progress: Progress | None = None, ckpt: Checkpoint | None = None) -> Manifest:
    """Convert one checkpoint into the bundle folder `out`; returns its manifest.

    Order matters: options, the output path and the native tools are checked before the checkpoint
    is read; nothing is written until all of it passed. A failure removes everything written.
    """
    options = (options or ConvertOptions()).validated()
    out = Path(out)
    report = progress or (lambda step, done, total: None)
    _check_out(out, options.overwrite)
    check_native_tools(options)
    ckpt = ckpt or load_checkpoint(src, vision_tower=options.vision_tower, lora=options.lora)
    staging, created = _prepare_out(out)
    done = False
    try:
        manifest = _convert_into(ckpt, staging, options, report)
        _move_into_place(staging, out)
        done = True
        return manifest
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if not done:
            _remove_created(created)


def _step(report: Progress, name: str) -> Callable[[int, int, str], None]:
    return lambda done, total, _tensor: report(name, done, total)


def _convert_into(ckpt: Checkpoint, staging: Path, options: ConvertOptions, report: Progress) -> Manifest:
    hashes = source_hashes(ckpt)
    fp = fingerprint(ckpt, hashes)
    kv = {FINGERPRINT_KEY: fp.id}
    lora = ckpt.adapter_dir is not None
    merged = lora and options.lora_mode == "merge"
    files: list[BundleFile] = []

    def record(path: Path, role: str, dtype: str) -> None:
        files.append(BundleFile(path.name, role, dtype, sha256_file(path), path.stat().st_size))

    base_name = base_model_file(options.base_type)
    tensors = merged_lm_tensors(ckpt, ckpt.adapter_dir) if merged else None  # checks the adapter fits
    if lora and not merged:
        check_targets(read_adapter(ckpt.adapter_dir), "lm", lm_shapes(ckpt.text))  # before any file is written
    lm_kv = {**kv, LORA_MERGED_KEY: True} if merged else kv
    base = write_language_model(ckpt, staging / base_name, tensors=tensors, ftype=options.base_type,
                                extra_kv=lm_kv, progress=_step(report, f"language model {options.base_type}"))
    record(base, "model", options.base_type.upper())
    for i, quant in enumerate(options.quants):
        report(f"quantize {quant}", i, len(options.quants))
        path = quantize_language_model(base, staging / quant_model_file(quant), quant, threads=options.threads or None)
        record(path, "model", quant)
    if lora and not merged:
        path = write_lora_adapter(ckpt, staging / adapter_file("f32"), ftype="f32", extra_kv=kv,
                                  progress=_step(report, "LoRA adapter"))
        record(path, "adapter", "f32")
    for mm_type in options.mmproj_types:
        path = write_mmproj(ckpt, staging / mmproj_file(mm_type), ftype=mm_type, extra_kv=kv,
                            progress=_step(report, f"mmproj {mm_type}"))
        record(path, "mmproj", mm_type)
    manifest = Manifest(
        fingerprint=fp,
        files=files,
        source={"layout": ckpt.layout, "path": str(ckpt.root), "adapter": str(ckpt.adapter_dir) if lora else None,
                "files": hashes},
        lora=("merged" if merged else "adapter") if lora else None,
        options=options.key(),
    )
    write_text(staging / MANIFEST, manifest.to_json())
    if options.verify:
        from factedge.convert.card import write_card
        from factedge.convert.verify import verify_bundle

        report("verify", 0, 1)
        _, result = verify_bundle(staging, ckpt)
        manifest.fidelity = result.to_dict()
        write_text(staging / MANIFEST, manifest.to_json())
        write_card(staging, manifest)
        report("verify", 1, 1)
    else:
        from factedge.convert.card import write_card

        write_card(staging, manifest)
    return manifest
