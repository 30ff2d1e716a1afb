"""Canonical (HF) tensor names -> GGUF tensor names, as llama.cpp's loaders look them up.

A pure data table so the names live in one place: the LM writer, the LoRA writer and the mmproj writer
all read it, and a test can check it against gguf-py. `{i}` is the block index. Sources:
- LM: gguf-py `gguf/constants.py` TENSOR_NAMES for MODEL_ARCH.LLAMA (`src/llama-arch.cpp` LLM_TENSOR_*);
- vision/projector: llama.cpp `tools/mtmd/clip-impl.h` TN_* macros (gguf-py V_ENC_* / V_MMPROJ).
  CLIP `mlp.fc1` is the up projection (`ffn_up`), `mlp.fc2` the down one (`ffn_down`), as gguf-py's
  current tensor_mapping does; the old llava converter swapped them and clip.cpp only un-swaps when
  the shapes say so, so we write the correct names.
"""

from __future__ import annotations

import re
from functools import lru_cache

# (canonical HF LlamaForCausalLM name, GGUF name)
LM_TENSORS: tuple[tuple[str, str], ...] = (
    ("model.embed_tokens.weight", "token_embd.weight"),  # LLM_TENSOR_TOKEN_EMBD
    ("model.layers.{i}.input_layernorm.weight", "blk.{i}.attn_norm.weight"),  # LLM_TENSOR_ATTN_NORM
    ("model.layers.{i}.self_attn.q_proj.weight", "blk.{i}.attn_q.weight"),  # LLM_TENSOR_ATTN_Q (rows permuted)
    ("model.layers.{i}.self_attn.k_proj.weight", "blk.{i}.attn_k.weight"),  # LLM_TENSOR_ATTN_K (rows permuted)
    ("model.layers.{i}.self_attn.v_proj.weight", "blk.{i}.attn_v.weight"),  # LLM_TENSOR_ATTN_V
    ("model.layers.{i}.self_attn.o_proj.weight", "blk.{i}.attn_output.weight"),  # LLM_TENSOR_ATTN_OUT
    ("model.layers.{i}.post_attention_layernorm.weight", "blk.{i}.ffn_norm.weight"),  # LLM_TENSOR_FFN_NORM
    ("model.layers.{i}.mlp.gate_proj.weight", "blk.{i}.ffn_gate.weight"),  # LLM_TENSOR_FFN_GATE
    ("model.layers.{i}.mlp.up_proj.weight", "blk.{i}.ffn_up.weight"),  # LLM_TENSOR_FFN_UP
    ("model.layers.{i}.mlp.down_proj.weight", "blk.{i}.ffn_down.weight"),  # LLM_TENSOR_FFN_DOWN
    ("model.norm.weight", "output_norm.weight"),  # LLM_TENSOR_OUTPUT_NORM
    ("lm_head.weight", "output.weight"),  # LLM_TENSOR_OUTPUT
)

# GGUF LM names whose rows llama.cpp expects in its interleaved RoPE order (see language_model.permute_qk).
LM_ROPE_PERMUTED: frozenset[str] = frozenset({"blk.{i}.attn_q.weight", "blk.{i}.attn_k.weight"})

# (canonical HF CLIPVisionModel name below `vision_model.`, GGUF name)
VISION_TENSORS: tuple[tuple[str, str], ...] = (
    ("embeddings.class_embedding", "v.class_embd"),  # TN_CLASS_EMBD
    ("embeddings.patch_embedding.weight", "v.patch_embd.weight"),  # TN_PATCH_EMBD (CLIP conv has no bias)
    ("embeddings.position_embedding.weight", "v.position_embd.weight"),  # TN_POS_EMBD
    ("pre_layrnorm.weight", "v.pre_ln.weight"),  # TN_LN_PRE (sic: HF spells it "layrnorm")
    ("pre_layrnorm.bias", "v.pre_ln.bias"),  # TN_LN_PRE
    ("encoder.layers.{i}.self_attn.q_proj.weight", "v.blk.{i}.attn_q.weight"),  # TN_ATTN_Q
    ("encoder.layers.{i}.self_attn.q_proj.bias", "v.blk.{i}.attn_q.bias"),  # TN_ATTN_Q
    ("encoder.layers.{i}.self_attn.k_proj.weight", "v.blk.{i}.attn_k.weight"),  # TN_ATTN_K
    ("encoder.layers.{i}.self_attn.k_proj.bias", "v.blk.{i}.attn_k.bias"),  # TN_ATTN_K
    ("encoder.layers.{i}.self_attn.v_proj.weight", "v.blk.{i}.attn_v.weight"),  # TN_ATTN_V
    ("encoder.layers.{i}.self_attn.v_proj.bias", "v.blk.{i}.attn_v.bias"),  # TN_ATTN_V
    ("encoder.layers.{i}.self_attn.out_proj.weight", "v.blk.{i}.attn_out.weight"),  # TN_ATTN_OUTPUT
    ("encoder.layers.{i}.self_attn.out_proj.bias", "v.blk.{i}.attn_out.bias"),  # TN_ATTN_OUTPUT
    ("encoder.layers.{i}.layer_norm1.weight", "v.blk.{i}.ln1.weight"),  # TN_LN_1
    ("encoder.layers.{i}.layer_norm1.bias", "v.blk.{i}.ln1.bias"),  # TN_LN_1
    ("encoder.layers.{i}.layer_norm2.weight", "v.blk.{i}.ln2.weight"),  # TN_LN_2
    ("encoder.layers.{i}.layer_norm2.bias", "v.blk.{i}.ln2.bias"),  # TN_LN_2
    ("encoder.layers.{i}.mlp.fc1.weight", "v.blk.{i}.ffn_up.weight"),  # TN_FFN_UP
    ("encoder.layers.{i}.mlp.fc1.bias", "v.blk.{i}.ffn_up.bias"),  # TN_FFN_UP
    ("encoder.layers.{i}.mlp.fc2.weight", "v.blk.{i}.ffn_down.weight"),  # TN_FFN_DOWN
    ("encoder.layers.{i}.mlp.fc2.bias", "v.blk.{i}.ffn_down.bias"),  # TN_FFN_DOWN
    ("post_layernorm.weight", "v.post_ln.weight"),  # TN_LN_POST
    ("post_layernorm.bias", "v.post_ln.bias"),  # TN_LN_POST
)

# (canonical LLaVA nn.Sequential index name, GGUF name); `linear` has only index 0.
PROJECTOR_TENSORS: tuple[tuple[str, str], ...] = (
    ("0.weight", "mm.0.weight"),  # TN_LLAVA_PROJ (first Linear)
    ("0.bias", "mm.0.bias"),  # TN_LLAVA_PROJ
    ("2.weight", "mm.2.weight"),  # TN_LLAVA_PROJ (second Linear, after GELU at index 1)
    ("2.bias", "mm.2.bias"),  # TN_LLAVA_PROJ
)


@lru_cache(maxsize=None)
def _compiled(table: tuple[tuple[str, str], ...]) -> tuple[tuple[re.Pattern[str], str], ...]:
    rows = []
    for canonical, gguf_name in table:
        pattern = re.escape(canonical).replace(re.escape("{i}"), r"(?P<i>\d+)")
        rows.append((re.compile(pattern + r"\Z"), gguf_name))
    return tuple(rows)


def gguf_name(canonical: str, table: tuple[tuple[str, str], ...]) -> str | None:
    """The GGUF name of `canonical` in `table`, or None if the table has no row for it."""
    for pattern, target in _compiled(table):
        match = pattern.match(canonical)
        if match:
            return target.replace("{i}", match.groupdict().get("i") or "")
    return None


def is_rope_permuted(gguf_tensor_name: str) -> bool:
    """True for LM q/k weights, whose rows llama.cpp expects permuted from HF's half-split RoPE order."""
    generic = re.sub(r"^blk\.\d+\.", "blk.{i}.", gguf_tensor_name)
    return generic in LM_ROPE_PERMUTED
