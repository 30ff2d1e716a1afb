"""The canonical -> GGUF name table agrees with gguf-py and covers every tensor we write."""

from __future__ import annotations

import re

import gguf

from factedge.convert.shapes import lm_shapes, projector_shapes, vision_shapes
from factedge.convert.tensor_names import LM_TENSORS, PROJECTOR_TENSORS, VISION_TENSORS, gguf_name, is_rope_permuted
from factedge.train.base.tiny_weights import tiny_text, tiny_vision


def _base(name: str) -> str:
    """`blk.3.attn_q.weight` -> `blk.{bid}.attn_q` (gguf-py's TENSOR_NAMES form)."""
    name = re.sub(r"\.(weight|bias)$", "", name.replace("{i}", "{bid}"))
    return re.sub(r"^mm\.\d+", "mm.{bid}", name)


def test_lm_names_are_gguf_llama_tensors():
    llama = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[gguf.MODEL_ARCH.LLAMA]}
    assert {_base(g) for _, g in LM_TENSORS} <= llama


def test_vision_names_are_gguf_clip_tensors():
    known = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[gguf.MODEL_ARCH.MMPROJ]}
    assert {_base(g) for _, g in VISION_TENSORS + PROJECTOR_TENSORS} <= known
    assert gguf_name("encoder.layers.2.mlp.fc1.weight", VISION_TENSORS) == "v.blk.2.ffn_up.weight"
    assert gguf_name("encoder.layers.2.mlp.fc2.bias", VISION_TENSORS) == "v.blk.2.ffn_down.bias"
    assert gguf_name("embeddings.class_embedding", VISION_TENSORS) == "v.class_embd"


def test_every_written_tensor_has_exactly_one_row():
    text, vision = tiny_text(), tiny_vision()
    for table, names in ((LM_TENSORS, lm_shapes(text)), (VISION_TENSORS, vision_shapes(vision)),
                         (PROJECTOR_TENSORS, projector_shapes("mlp2x_gelu", 64, 256))):  # fmt: skip
        out = [gguf_name(n, table) for n in names]
        assert None not in out and len(set(out)) == len(out)
    assert gguf_name("model.layers.12.self_attn.k_proj.weight", LM_TENSORS) == "blk.12.attn_k.weight"
    assert gguf_name("model.layers.x.self_attn.k_proj.weight", LM_TENSORS) is None
    assert [is_rope_permuted(f"blk.7.attn_{p}.weight") for p in "qkv"] == [True, True, False]
