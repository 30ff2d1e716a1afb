"""What a GGUF file or a bundle holds, and whether a bundle's files belong together.

Reads headers only (gguf_header: no llama.cpp, no torch, no tensor data), so `factedge inspect` is
cheap and safe on any file a user points it at.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from factedge.edge.errors import CorruptFileError
from factedge.edge.gguf_header import ArrayInfo, read_header
from factedge.edge.manifest import FINGERPRINT_KEY, LORA_MERGED_KEY, Manifest, read_manifest, sha256_file

# metadata shown for each kind of file (the rest is counted, not listed)
_SHOWN = (
    "general.architecture", "general.type", "general.name", "general.file_type",
    "llama.context_length", "llama.embedding_length", "llama.block_count", "llama.attention.head_count",
    "tokenizer.ggml.model", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
    "clip.projector_type", "clip.vision.image_size", "clip.vision.patch_size", "clip.vision.block_count",
    "clip.vision.projection_dim", "adapter.type", "adapter.lora.alpha", FINGERPRINT_KEY, LORA_MERGED_KEY,
)


@dataclass
class GgufSummary:
    path: Path
    tensors: int
    metadata: dict[str, Any]
    n_metadata: int
    vocab_size: int | None = None

    @property
    def fingerprint(self) -> str | None:
        return self.metadata.get(FINGERPRINT_KEY)


def _shown(value: Any) -> Any:
    return str(value) if isinstance(value, ArrayInfo) else value


def describe_gguf(path: Path) -> GgufSummary:
    """Tensor count and the interesting metadata of a GGUF (header only: milliseconds)."""
    header = read_header(path)
    meta = {k: _shown(header.metadata[k]) for k in _SHOWN if k in header.metadata}
    tokens = header.metadata.get("tokenizer.ggml.tokens")
    vocab = tokens.count if isinstance(tokens, ArrayInfo) else None
    return GgufSummary(Path(path), len(header.tensors), meta, len(header.metadata), vocab)


@dataclass
class BundleCheck:
    manifest: Manifest
    files: list[GgufSummary | None] = field(default_factory=list)  # one per manifest entry; None: unreadable
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def check_bundle(bundle: Path, *, hashes: bool = True) -> BundleCheck:
    """Every listed file present, readable, sha256 as recorded, and carrying the bundle's fingerprint.

    Problems are collected, not raised, so `factedge inspect` can list all of them at once.
    """
    manifest = read_manifest(bundle)
    check = BundleCheck(manifest)
    expected = manifest.fingerprint.id
    for entry in manifest.files:
        path = Path(bundle) / entry.name
        summary = None
        if not path.is_file():
            check.problems.append(f"{entry.name}: listed in the manifest but missing")
        else:
            try:
                summary = describe_gguf(path)
            except CorruptFileError as exc:
                check.problems.append(f"{entry.name}: {exc.reason}")
            if summary is not None and summary.fingerprint != expected:
                check.problems.append(f"{entry.name}: fingerprint {summary.fingerprint} is not the bundle's {expected}")
            if hashes and sha256_file(path) != entry.sha256:
                check.problems.append(f"{entry.name}: sha256 differs from the manifest (file changed or corrupt)")
        check.files.append(summary)
    return check
