"""Tiny LLaVA-on-SmolLM2 checkpoints: the real SmolLM2 BPE tokenizer, shrunk GQA + tied-embedding LM.

What users bring besides Vicuna LLaVAs: a byte-level BPE vocabulary (tokenizer.json, no
tokenizer.model), grouped-query attention, an LM head tied to the embedding, a ChatML template.
The llava-hf folder is written by the installed transformers' own `save_pretrained` (key names, tied
head dropped, tokenizer files and chat template exactly as this transformers version writes them);
the original-LLaVA folder the way LLaVA's training saves a LlavaLlamaForCausalLM.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from factedge.convert.specs import LayoutName, TextSpec
from factedge.edge.errors import ConfigError
from factedge.train.base import tiny_weights as tw
from factedge.train.base.smol import smol_tokenizer, write_smol_tokenizer
from factedge.train.base.tensor_files import save_checkpoint, write_hf_json
from factedge.train.base.tiny import (clip_folder_name, llava_hf_config, llava_hf_state_dict, write_clip,
                                     write_llava_model, write_preprocessor)

SMOL_VOCAB = 49152
SMOL_LLAVA_HF_VOCAB = 49216  # 49,152 + <image>, padded to a multiple of 64 as llava-hf pads Vicuna's


def tiny_smol_text(vocab_rows: int = SMOL_VOCAB) -> TextSpec:
    """SmolLM2's structure (GQA 2:1, tied head, rope base 1e5, ChatML ids) at test size."""
    return TextSpec(vocab_size=vocab_rows, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                    num_kv_heads=2, rms_norm_eps=1e-5, rope_theta=100000.0, max_position_embeddings=2048,
                    tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, unk_token_id=0, pad_token_id=2)


def _write_llava_hf(out: Path, image_size: int, seed: int) -> Path:
    from transformers import LlavaForConditionalGeneration

    tok = smol_tokenizer(image_token=True)
    image_id = tok.convert_tokens_to_ids("<image>")
    text, vision = tiny_smol_text(SMOL_LLAVA_HF_VOCAB), tw.tiny_vision(image_size)
    lm = tw.text_weights(text, seed, base_vocab=len(tok))
    lm.pop("lm_head.weight")  # tied
    sd = llava_hf_state_dict(text, vision, seed, lm)
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(Path(tmp), sd, "safetensors")
        write_hf_json(Path(tmp) / "config.json", llava_hf_config(text, vision, image_token_id=image_id,
                                                                  pad_token_id=text.pad_token_id,
                                                                  lm_name="HuggingFaceTB/SmolLM2-135M-Instruct"))
        model = LlavaForConditionalGeneration.from_pretrained(tmp, dtype=torch.float32)
        model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    write_preprocessor(out, vision)
    return out


def build_tiny_smol(layout: LayoutName, out_dir: str | Path, *, image_size: int = 224, seed: int = 0) -> Path:
    """A tiny LLaVA-on-SmolLM2 folder of `layout` ("llava-hf" or "llava"; CLIP beside the latter)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if layout == "llava-hf":
        return _write_llava_hf(out, image_size, seed)
    if layout != "llava":
        raise ConfigError(f"no tiny SmolLM2 build for layout {layout!r} (llava-hf, llava)")
    vision = tw.tiny_vision(image_size)
    clip_dir = write_clip(out / clip_folder_name(image_size), vision, seed)
    return write_llava_model(out / f"llava-smollm2-tiny-{image_size}", tiny_smol_text(), vision, "mlp2x_gelu",
                             clip_dir, torch.float16, False, seed, lambda folder: write_smol_tokenizer(folder, False))
