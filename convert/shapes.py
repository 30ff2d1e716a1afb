"""The tensors a LLaVA model must have, in order, with the shapes its config implies.

One source of truth for three jobs: `layouts` checks a checkpoint against it (a wrong config or a
truncated shard is caught before converting), the GGUF writers take tensor order and shapes from it
(so they can write every tensor header before streaming any data), and tests build fixtures from it.
"""

from __future__ import annotations

from factedge.convert.projectors import projector
from factedge.convert.specs import ProjectorType, TextSpec, VisionSpec

Shapes = dict[str, tuple[int, ...]]  # canonical name -> torch shape, in canonical write order


def lm_shapes(text: TextSpec) -> Shapes:
    """HF LlamaForCausalLM tensors (lm_head included even when tied: GGUF llama wants `output`)."""
    h, i, v = text.hidden_size, text.intermediate_size, text.vocab_size
    kv = text.num_kv_heads * (h // text.num_heads)
    shapes: Shapes = {"model.embed_tokens.weight": (v, h)}
    for n in range(text.num_layers):
        p = f"model.layers.{n}."
        shapes.update({
            p + "input_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (h, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, h),
            p + "post_attention_layernorm.weight": (h,),
            p + "mlp.gate_proj.weight": (i, h),
            p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
        })  # fmt: skip
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (v, h)
    return shapes


def vision_shapes(vision: VisionSpec) -> Shapes:
    """HF CLIPVisionModel tensors below `vision_model.` (no position_ids buffer)."""
    d, i, p = vision.hidden_size, vision.intermediate_size, vision.patch_size
    shapes: Shapes = {
        "embeddings.class_embedding": (d,),
        "embeddings.patch_embedding.weight": (d, 3, p, p),
        "embeddings.position_embedding.weight": (vision.tokens_per_image + 1, d),
        "pre_layrnorm.weight": (d,),
        "pre_layrnorm.bias": (d,),
    }
    for n in range(vision.num_layers):
        p_ = f"encoder.layers.{n}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[p_ + f"self_attn.{proj}.weight"] = (d, d)
            shapes[p_ + f"self_attn.{proj}.bias"] = (d,)
        for norm in ("layer_norm1", "layer_norm2"):
            shapes[p_ + f"{norm}.weight"] = (d,)
            shapes[p_ + f"{norm}.bias"] = (d,)
        shapes.update({
            p_ + "mlp.fc1.weight": (i, d),
            p_ + "mlp.fc1.bias": (i,),
            p_ + "mlp.fc2.weight": (d, i),
            p_ + "mlp.fc2.bias": (d,),
        })  # fmt: skip
    shapes["post_layernorm.weight"] = (d,)
    shapes["post_layernorm.bias"] = (d,)
    return shapes


def projector_shapes(projector_type: ProjectorType, vision_hidden: int, text_hidden: int) -> Shapes:
    """LLaVA projector (convert.projectors' row): Linear(vision->text) [+ GELU + Linear(text->text)]."""
    return projector(projector_type).shapes(vision_hidden, text_hidden)
