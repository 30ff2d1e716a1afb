"""Write checkpoint files the way HF / PEFT lay them out, atomically and byte-reproducibly.

Fixtures are cached and shared between test processes, so a file must never be seen half-written:
everything goes through `edge.atomic` (a temp file in the same folder, then os.replace).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch

from factedge.edge.atomic import atomic_path, write_json

WeightFormat = Literal["safetensors", "bin"]

# HF file names: single file, shard pattern, index.
_NAMES = {
    "safetensors": ("model.safetensors", "model-{i:05d}-of-{n:05d}.safetensors", "model.safetensors.index.json"),
    "bin": ("pytorch_model.bin", "pytorch_model-{i:05d}-of-{n:05d}.bin", "pytorch_model.bin.index.json"),
}


def write_hf_json(path: Path, obj: dict) -> Path:
    """JSON the way HF and PEFT write configs and indexes (indent 2, sorted keys, trailing newline)."""
    return write_json(path, obj, sort_keys=True)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], fmt: WeightFormat) -> Path:
    """One weights file: safetensors (with HF's `format: pt` metadata) or a torch zip pickle."""
    # Own, contiguous storage per tensor: no shared-storage surprises for readers.
    tensors = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        if fmt == "safetensors":
            from safetensors.torch import save_file

            save_file(tensors, str(tmp), metadata={"format": "pt"})
        else:
            torch.save(tensors, tmp)
    return Path(path)


def split_shards(tensors: dict[str, torch.Tensor], n_shards: int) -> list[dict[str, torch.Tensor]]:
    """Contiguous split in key order with about equal bytes per shard (HF fills shards in order)."""
    total = sum(_nbytes(t) for t in tensors.values())
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(n_shards)]
    done = 0
    for name, t in tensors.items():
        idx = min(n_shards - 1, done * n_shards // total)
        shards[idx][name] = t
        done += _nbytes(t)
    if any(not s for s in shards):
        raise ValueError(f"cannot split {len(tensors)} tensors into {n_shards} non-empty shards")
    return shards


def save_checkpoint(folder: Path, tensors: dict[str, torch.Tensor], fmt: WeightFormat, n_shards: int = 1) -> list[Path]:
    """HF weight files in `folder`: one file, or `n_shards` shards plus the `*.index.json` map."""
    single, pattern, index_name = _NAMES[fmt]
    folder = Path(folder)
    if n_shards <= 1:
        return [save_tensors(folder / single, tensors, fmt)]
    written, weight_map = [], {}
    for i, shard in enumerate(split_shards(tensors, n_shards), start=1):
        name = pattern.format(i=i, n=n_shards)
        written.append(save_tensors(folder / name, shard, fmt))
        weight_map.update({k: name for k in shard})
    total = sum(_nbytes(t) for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    written.append(write_hf_json(folder / index_name, index))
    return written
