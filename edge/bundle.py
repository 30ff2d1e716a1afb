"""Open a bundle (or loose files) and refuse pieces that were not made for each other.

A bundle made by `factedge convert` lists its files in `manifest.json`; the model file is picked by
quant (the smallest quantized one by default), the mmproj by precision. Every GGUF carries the
bundle's fingerprint, so an mmproj or adapter from another conversion is refused before llama.cpp
ever sees it, even when the widths happen to match.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from factedge.edge.errors import InputError, MismatchError
from factedge.edge.file_types import ADAPTER_TYPES, LM_PREFERENCE, MMPROJ_PREFERENCE
from factedge.edge.file_hashes import check_sha256
from factedge.edge.inspect import describe_gguf
from factedge.edge.manifest import LORA_MERGED_KEY, MANIFEST, Manifest, check_pairing, read_manifest



@dataclass
class BundleFiles:
    model: Path
    mmproj: Path | None
    adapter: Path | None = None
    manifest: Manifest | None = None
    quant: str | None = None


def _pick(manifest: Manifest, role: str, wanted: str | None, preference: tuple[str, ...]):
    files = manifest.by_role(role)
    if not files:
        return None
    if wanted is not None:
        return manifest.file(role, wanted)
    rank = {name.lower(): i for i, name in enumerate(preference)}
    return min(files, key=lambda f: rank.get(f.dtype.lower(), len(rank)))


def open_bundle(path: Path, *, quant: str | None = None, mmproj_type: str | None = None,
                verify_hashes: bool = True) -> BundleFiles:
    """The files of a bundle folder, checked to belong together and (unless `verify_hashes` is off)
    to be the bytes the manifest lists (edge.file_hashes: hashed once per file version)."""
    path = Path(path)
    if not (path / MANIFEST).is_file():
        raise InputError("not a factedge bundle (no manifest.json); pass model= and mmproj= instead", path)
    manifest = read_manifest(path)
    model = _pick(manifest, "model", quant, LM_PREFERENCE)
    if model is None:
        raise InputError("bundle lists no model file", path / MANIFEST)
    mmproj = _pick(manifest, "mmproj", mmproj_type, MMPROJ_PREFERENCE)
    adapter = _pick(manifest, "adapter", None, ADAPTER_TYPES)
    files = BundleFiles(path / model.name, path / mmproj.name if mmproj else None,
                        path / adapter.name if adapter else None, manifest, model.dtype)
    check_files(files)
    if verify_hashes:
        check_sha256([(path / f.name, f.sha256) for f in (model, mmproj, adapter) if f is not None])
    return files


def check_files(files: BundleFiles) -> None:
    """Every file present, the model the manifest's (if any), and mmproj/adapter fingerprints equal
    to the model's."""
    for p in (files.model, files.mmproj, files.adapter):
        if p is not None and not p.is_file():
            raise InputError("file missing", p)
    model = describe_gguf(files.model)
    model_fp = model.fingerprint
    if files.adapter is not None and model.metadata.get(LORA_MERGED_KEY):
        raise MismatchError("the model already has its LoRA merged in; applying an adapter on top would add it twice",
                            files.adapter)
    if files.manifest is not None and model_fp != files.manifest.fingerprint.id:
        raise MismatchError(f"model file does not belong to this bundle (fingerprint {model_fp}, manifest has "
                            f"{files.manifest.fingerprint.id})", files.model)
    if model_fp is None:  # a foreign GGUF: nothing to check against
        return
    for p, what in ((files.mmproj, "mmproj"), (files.adapter, "adapter")):
        if p is not None:
            check_pairing(model_fp, describe_gguf(p).fingerprint, p, what)
