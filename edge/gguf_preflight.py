"""Check a GGUF for what llama.cpp asserts on, before llama.cpp sees it.

llama.cpp trusts a file's metadata: a head count of 0 divides by zero, a block count of 0 or a
duplicate vocabulary token trips a GGML_ASSERT (the process aborts), and an mmproj whose tensor
name was damaged is dereferenced as a null tensor at the first image (a segfault, after the file
opened fine). Those are crashes, not errors, so the runtime reads the header first (milliseconds,
no tensor data) and refuses such a file with a one-line error naming it. The rules cover the files
factedge writes and reads (LLaMA-architecture LMs, CLIP mmproj files with the LLaVA projectors,
LoRA adapters); for other architectures only the generic hyperparameters are checked.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from factedge.edge.errors import CorruptFileError
from factedge.edge.gguf_header import GgufHeader, read_header

MAX_LAYERS = 4096  # far above any released model; a forged count must not size an allocation
MAX_WIDTH = 1 << 20
_VOCAB_ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.scores")
_SPECIAL_IDS = ("bos", "eos", "unknown", "padding", "seperator", "eot", "eom")
_LLAMA_BLOCK = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")
_CLIP_BLOCK = ("attn_q", "attn_k", "attn_v", "attn_out", "ln1", "ln2", "ffn_up", "ffn_down")
_LLAVA_PROJECTORS = {"mlp": ("mm.0.weight", "mm.2.weight"), "linear": ("mm.0.weight",)}


def _bad(path: Path, reason: str) -> CorruptFileError:
    return CorruptFileError(f"refused before loading: {reason}", path)


def _int(meta: dict[str, Any], key: str, path: Path, *, lo: int = 1, hi: int = MAX_WIDTH,
         required: bool = True) -> int | None:
    value = meta.get(key)
    if value is None:
        if required:
            raise _bad(path, f"metadata {key} is missing")
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise _bad(path, f"metadata {key} = {value!r} is not an integer in [{lo}, {hi}]")
    return value


def _shapes(header: GgufHeader, path: Path) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for t in header.tensors:
        if t.name in shapes:
            raise _bad(path, f"tensor {t.name} is stored twice")
        shapes[t.name] = t.shape
    return shapes


def _require(shapes: dict[str, tuple[int, ...]], names, path: Path) -> None:
    missing = [n for n in names if n not in shapes]
    if missing:
        raise _bad(path, f"tensor {missing[0]} is missing" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))


def _check_vocab(meta: dict[str, Any], path: Path) -> None:
    tokens = meta.get("tokenizer.ggml.tokens")
    if tokens is None:
        return
    if not tokens:
        raise _bad(path, "the vocabulary is empty")
    if len(set(tokens)) != len(tokens):
        seen: set[str] = set()
        dup = next(t for t in tokens if t in seen or seen.add(t))
        raise _bad(path, f"vocabulary token {dup!r} appears twice")
    for key in _VOCAB_ARRAYS[1:]:
        other = meta.get(key)
        if other is not None and len(other) != len(tokens):
            raise _bad(path, f"{key} has {len(other)} entries for {len(tokens)} tokens")
    for name in _SPECIAL_IDS:
        _int(meta, f"tokenizer.ggml.{name}_token_id", path, lo=0, hi=len(tokens) - 1, required=False)


def _check_lm(meta: dict[str, Any], shapes: dict[str, tuple[int, ...]], arch: str, path: Path) -> None:
    n_layer = _int(meta, f"{arch}.block_count", path, hi=MAX_LAYERS)
    n_embd = _int(meta, f"{arch}.embedding_length", path)
    n_head = _int(meta, f"{arch}.attention.head_count", path)
    n_head_kv = _int(meta, f"{arch}.attention.head_count_kv", path, required=False) or n_head
    _int(meta, f"{arch}.context_length", path, hi=1 << 24)
    _int(meta, f"{arch}.feed_forward_length", path, required=False)
    head_dim = _int(meta, f"{arch}.attention.key_length", path, required=False)
    if head_dim is None and n_embd % n_head:
        raise _bad(path, f"embedding_length {n_embd} is not a multiple of head_count {n_head}")
    if n_head % n_head_kv:
        raise _bad(path, f"head_count {n_head} is not a multiple of head_count_kv {n_head_kv}")
    _check_vocab(meta, path)
    if arch != "llama" or meta.get("llama.expert_count"):
        return
    _require(shapes, ["token_embd.weight", "output_norm.weight"]
             + [f"blk.{i}.{part}.weight" for i in range(n_layer) for part in _LLAMA_BLOCK], path)
    extra = sorted({int(n.split(".")[1]) for n in shapes if n.startswith("blk.")} - set(range(n_layer)))
    if extra:
        raise _bad(path, f"block_count is {n_layer} but the file stores block {extra[0]}")
    embd = shapes["token_embd.weight"]
    if len(embd) != 2 or embd[0] != n_embd:
        raise _bad(path, f"token_embd.weight has shape {list(embd)}, not [{n_embd}, n_vocab]")
    tokens = meta.get("tokenizer.ggml.tokens")
    if tokens is not None and embd[1] != len(tokens):
        raise _bad(path, f"token_embd.weight has {embd[1]} rows for {len(tokens)} vocabulary tokens")


def _check_clip(meta: dict[str, Any], shapes: dict[str, tuple[int, ...]], path: Path) -> None:
    patch = _int(meta, "clip.vision.patch_size", path, hi=4096)
    image = _int(meta, "clip.vision.image_size", path, hi=1 << 14)
    n_embd = _int(meta, "clip.vision.embedding_length", path)
    n_head = _int(meta, "clip.vision.attention.head_count", path)
    n_layer = _int(meta, "clip.vision.block_count", path, hi=MAX_LAYERS)
    _int(meta, "clip.vision.feed_forward_length", path)
    _int(meta, "clip.vision.projection_dim", path, required=False)
    if image % patch or n_embd % n_head:
        raise _bad(path, f"image_size {image} must be a multiple of patch_size {patch}, and embedding_length "
                         f"{n_embd} of head_count {n_head}")
    for key in ("clip.vision.image_mean", "clip.vision.image_std"):
        values = meta.get(key)
        if values is not None and (len(values) != 3 or not all(isinstance(v, float) and math.isfinite(v)
                                                                and (key.endswith("mean") or v > 0) for v in values)):
            raise _bad(path, f"{key} must be three finite numbers (std > 0)")
    projector = meta.get("clip.projector_type")
    if projector not in _LLAVA_PROJECTORS:
        return
    _require(shapes, ["v.patch_embd.weight", "v.position_embd.weight", *_LLAVA_PROJECTORS[projector]]
             + [f"v.blk.{i}.{part}.weight" for i in range(n_layer) for part in _CLIP_BLOCK], path)
    if shapes["v.patch_embd.weight"] != (patch, patch, 3, n_embd):
        raise _bad(path, f"v.patch_embd.weight has shape {list(shapes['v.patch_embd.weight'])}, "
                         f"not [{patch}, {patch}, 3, {n_embd}]")
    positions = (image // patch) ** 2 + int("v.class_embd" in shapes)
    if shapes["v.position_embd.weight"] != (n_embd, positions):
        raise _bad(path, f"v.position_embd.weight has shape {list(shapes['v.position_embd.weight'])}, "
                         f"not [{n_embd}, {positions}]")
    if shapes["mm.0.weight"][0] != n_embd:
        raise _bad(path, f"mm.0.weight takes {shapes['mm.0.weight'][0]} inputs, the encoder gives {n_embd}")


def _check_adapter(meta: dict[str, Any], path: Path) -> None:
    alpha = meta.get("adapter.lora.alpha")
    if alpha is not None and not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and abs(alpha) < 1e6):
        raise _bad(path, f"adapter.lora.alpha = {alpha!r} is not a finite number below 1e6")


def preflight(path: Path, role: str) -> GgufHeader:
    """The header of `path` ("model", "vocab" for a vocab-only load, "mmproj" or "adapter"), or
    CorruptFileError naming what would crash."""
    path = Path(path)
    header = read_header(path, arrays=_VOCAB_ARRAYS + ("clip.vision.image_mean", "clip.vision.image_std"))
    shapes = _shapes(header, path)
    meta = header.metadata
    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        raise _bad(path, "metadata general.architecture is missing")
    if role == "vocab":
        _check_vocab(meta, path)
    elif role == "adapter" or meta.get("general.type") == "adapter":
        _check_adapter(meta, path)
    elif role == "mmproj" or arch == "clip":
        if arch != "clip":
            raise _bad(path, f"an mmproj must have architecture 'clip', not {arch!r}")
        _check_clip(meta, shapes, path)
    else:
        if arch == "clip":
            raise _bad(path, "this is an mmproj (architecture 'clip'), not a language model")
        _check_lm(meta, shapes, arch, path)
    return header


__all__ = ["preflight", "MAX_LAYERS"]
