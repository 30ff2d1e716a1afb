"""Write a PEFT LoRA adapter as a llama.cpp GGUF LoRA (applied at load time with `--lora`).

The alternative to merging: the base GGUF stays shared and the RLHF policy is a small file. llama.cpp
(src/llama-adapter.cpp) wants `general.type=adapter`, `adapter.type=lora`, `adapter.lora.alpha`, the
base's architecture, and per adapted weight `<gguf name>.lora_a` with ggml shape [in, r] (PEFT's A,
torch (r, in), as is) and `.lora_b` with ggml shape [r, out] (PEFT's B, torch (out, r)). It scales by
alpha / r with r read from lora_b, so PEFT's alpha / r carries over. Because the base q/k rows are
permuted for ggml's RoPE, B's rows of q/k get the same permutation (A is untouched):
permute(W + B A) = permute(W) + permute(B) A.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from factedge.convert.gguf_stream import PlannedTensor, add_provenance, Progress, to_numpy, write_gguf
from factedge.convert.language_model import ftype_types, permute_qk, qk_heads
from factedge.convert.merge import AdapterWeights, check_targets, read_adapter
from factedge.convert.shapes import lm_shapes
from factedge.convert.specs import Checkpoint
from factedge.convert.tensor_names import LM_TENSORS, gguf_name
from factedge.convert.weights import TensorRef, load_tensor
from factedge.edge.errors import ConfigError, NumericsError


def gguf_alpha(adapter: AdapterWeights) -> float:
    """The alpha that makes llama.cpp's alpha / r equal PEFT's scaling (rsLoRA: alpha / sqrt(r))."""
    if not adapter.use_rslora:
        return adapter.alpha
    ranks = {p.rank for pairs in adapter.targets.values() for p in pairs.values()}
    if len(ranks) != 1:
        raise ConfigError("rsLoRA with per-module ranks cannot be expressed as one GGUF alpha", adapter.folder)
    return adapter.alpha * math.sqrt(ranks.pop())


def _producer(ref: TensorRef, qtype, heads: int | None):
    def produce():
        import torch

        tensor = load_tensor(ref).to(torch.float32)
        if not torch.isfinite(tensor).all():
            raise NumericsError(f"LoRA tensor {ref.key} is not finite", ref.file)
        if heads is not None:
            tensor = permute_qk(tensor, heads)
        return to_numpy(tensor, qtype)

    return produce


def write_lora_adapter(
    ckpt: Checkpoint,
    out_path: str | Path,
    *,
    adapter_dir: str | Path | None = None,
    ftype: str = "f16",
    progress: Progress | None = None,
    extra_kv: dict[str, Any] | None = None,
    name: str | None = None,
) -> Path:
    """Write the adapter (default: ckpt.adapter_dir) for the checkpoint's LM as a GGUF LoRA."""
    folder = adapter_dir if adapter_dir is not None else ckpt.adapter_dir
    if folder is None:
        raise ConfigError("no LoRA adapter: the checkpoint has none and adapter_dir was not given", ckpt.root)
    adapter = read_adapter(folder)
    others = sorted(c for c in adapter.targets if c != "lm")
    if others:
        raise ConfigError(f"adapter also adapts the {', '.join(others)}; llama.cpp LoRA covers only the LM (merge instead)", adapter.file)
    if any(n in ("model.embed_tokens.weight", "lm_head.weight") for n in adapter.targets.get("lm", {})):
        raise ConfigError("LoRA on the embedding / lm_head is not supported as a GGUF adapter (merge instead)", adapter.file)
    pairs = check_targets(adapter, "lm", lm_shapes(ckpt.text))
    qtype, _ = ftype_types(ftype)
    plan = []
    for canonical in lm_shapes(ckpt.text):  # canonical order, so the file is deterministic
        pair = pairs.get(canonical)
        if pair is None:
            continue
        base = gguf_name(canonical, LM_TENSORS)
        assert base is not None, canonical
        plan.append(PlannedTensor(base + ".lora_a", pair.a.shape, qtype, _producer(pair.a, qtype, None)))
        plan.append(PlannedTensor(base + ".lora_b", pair.b.shape, qtype, _producer(pair.b, qtype, qk_heads(base, ckpt.text))))
    alpha = gguf_alpha(adapter)

    def metadata(writer) -> None:
        from gguf import GGUFType, Keys

        writer.add_type(GGUFType.ADAPTER)
        writer.add_string(Keys.Adapter.TYPE, "lora")
        writer.add_float32(Keys.Adapter.LORA_ALPHA, alpha)
        writer.add_name(name or Path(folder).name)
        add_provenance(writer, ckpt.layout, "lora_adapter", extra_kv or {})

    return write_gguf(out_path, "llama", metadata, plan, progress=progress)
