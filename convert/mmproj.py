"""Write the vision tower + projector of a Checkpoint as llama.cpp's mmproj GGUF (arch `clip`).

What llama.cpp's mtmd loader (tools/mtmd/clip.cpp, clip-impl.h, models/llava.cpp) reads, and why:
- `clip.projector_type`: "mlp" (Linear-GELU-Linear: `mm.0`, `mm.2`) or "linear" (one Linear `mm.0`;
  a projector type our llama.cpp patch adds -- stock "mlp" without `mm.2` would still apply GELU);
- only the encoder layers LLaVA uses are stored: for hidden_states[-2] the last layer is dropped and
  `clip.vision.block_count` = N - 1, as every llava converter does. Our llama.cpp patch 0002 makes
  the graph run every stored layer (stock llama.cpp stops one layer early on such files). We also
  write `clip.vision.feature_layer` = [number of stored layers] (a non-negative HF hidden_states
  index), which gives the same layer on stock llama.cpp too; `feature_layer_key=False` leaves it out
  (the legacy form, used by the test that proves patch 0002);
- the CLS token is dropped by the graph itself (it gathers patch rows only), LLaVA's "patch" select;
- `post_layernorm` is NOT written: the graph applies `v.post_ln` whenever present, but LLaVA's
  features are taken before it;
- `clip.use_gelu` false selects quick_gelu (CLIP's activation); true selects ggml's gelu;
- 1-D tensors F32 (ggml adds/norms want F32); matrices, position embeddings and the patch conv kernel
  F32 or F16 per ftype (ggml_conv_2d accepts either: its im2col is F16 for non-BF16 kernels anyway,
  upstream's MmprojModel makes the same choice).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from typing import Any

from factedge.convert.gguf_stream import PlannedTensor, Progress, add_provenance, all_finite, to_numpy, write_gguf
from factedge.convert.shapes import projector_shapes, vision_shapes
from factedge.convert.projectors import projector
from factedge.convert.specs import Checkpoint, VisionSpec
from factedge.convert.tensor_names import PROJECTOR_TENSORS, VISION_TENSORS, gguf_name
from factedge.edge.errors import ConfigError, MismatchError, NumericsError
from factedge.edge.file_types import mmproj_type

SKIPPED_VISION = ("post_layernorm.weight", "post_layernorm.bias")  # see module docstring
_USE_GELU = {"quick_gelu": False, "gelu": True}


def _types(ftype: str):
    from gguf import GGMLQuantizationType as Q
    from gguf import LlamaFileType as F

    table = {"f32": (Q.F32, F.ALL_F32), "f16": (Q.F16, F.MOSTLY_F16), "q8_0": (Q.Q8_0, F.MOSTLY_Q8_0)}
    return table[mmproj_type(ftype)]


def feature_layer_index(vision: VisionSpec) -> int:
    """LLaVA's feature layer as a non-negative HF `hidden_states` index (0 = embeddings after pre-LN)."""
    n = vision.num_layers
    idx = vision.feature_layer if vision.feature_layer >= 0 else n + 1 + vision.feature_layer
    if not 0 <= idx <= n:
        raise ConfigError(f"vision feature layer {vision.feature_layer} out of range for {n} layers")
    return idx


def _check_spec(ckpt: Checkpoint) -> None:
    vision = ckpt.vision
    if vision.select_feature != "patch":
        raise ConfigError(f"llama.cpp's llava graph always drops CLS; select_feature {vision.select_feature!r} "
                          "cannot be converted", ckpt.root)
    if vision.hidden_act not in _USE_GELU:
        raise ConfigError(f"vision activation {vision.hidden_act!r} not supported by clip.cpp "
                          f"({', '.join(_USE_GELU)})", ckpt.root)
    projector(ckpt.projector_type, ckpt.root)  # a ConfigError for a type without a row
    if vision.image_size % vision.patch_size:
        raise ConfigError(f"image size {vision.image_size} is not a multiple of patch {vision.patch_size}", ckpt.root)
    feature_layer_index(vision)


def _producer(load, name: str, shape: tuple[int, ...], qtype):
    def produce():
        import torch

        tensor = load()
        if tuple(tensor.shape) != shape:
            raise MismatchError(f"tensor {name}: shape {list(tensor.shape)}, the config implies {list(shape)}")
        array = to_numpy(tensor, qtype)
        finite = bool(torch.isfinite(tensor).all()) if array.dtype == np.uint8 else all_finite(array)  # q8_0: the input
        if not finite:
            raise NumericsError(f"tensor {name} is not finite after conversion (f16 overflow?)")
        return array

    return produce


def _plan_part(tensors, expected: dict, table, what: str, qtype, skipped=()) -> list[PlannedTensor]:
    from gguf import GGMLQuantizationType as Q

    loaders = dict(tensors)
    unknown = sorted(set(loaders) - set(expected) - set(skipped))
    if unknown:
        raise MismatchError(f"{what} tensors not expected for this config: {unknown[:3]} ({len(unknown)} in all)")
    plan = []
    for name, shape in expected.items():
        if name in skipped:
            continue
        if name not in loaders:
            raise MismatchError(f"{what} tensor {name} missing from the tensors to write")
        out_name = gguf_name(name, table)
        if out_name is None:
            raise MismatchError(f"{what} tensor {name} has no GGUF name")
        t_type = Q.F32 if len(shape) == 1 else qtype
        if t_type == Q.Q8_0 and not _quantizable(name, shape):
            t_type = Q.F16
        plan.append(PlannedTensor(out_name, shape, t_type, _producer(loaders[name], name, shape, t_type)))
    return plan


def unused_layers(vision: VisionSpec) -> tuple[str, ...]:
    """Canonical names of the encoder layers after the feature layer (never run by LLaVA)."""
    keep = feature_layer_index(vision)
    return tuple(name for name in vision_shapes(vision)
                 if name.startswith("encoder.layers.") and int(name.split(".")[2]) >= keep)


def _quantizable(name: str, shape: tuple[int, ...]) -> bool:
    """q8_0 goes to the matrices of the encoder and projector only: the patch convolution and the
    position table stay F16 (as llama.cpp's own mmproj quantization keeps them)."""
    return len(shape) == 2 and shape[-1] % 32 == 0 and "embeddings." not in name


def plan_mmproj(ckpt: Checkpoint, ftype: str) -> list[PlannedTensor]:
    """Vision tensors (minus post_layernorm and unused layers) then projector tensors, in canonical order."""
    qtype, _ = _types(ftype)
    vision, text = ckpt.vision, ckpt.text
    skipped = SKIPPED_VISION + unused_layers(vision)
    plan = _plan_part(ckpt.vision_tensors(), vision_shapes(vision), VISION_TENSORS, "vision", qtype, skipped)
    proj_shapes = projector_shapes(ckpt.projector_type, vision.hidden_size, text.hidden_size)
    plan += _plan_part(ckpt.projector_tensors(), proj_shapes, PROJECTOR_TENSORS, "projector", qtype)
    return plan


def _metadata(ckpt: Checkpoint, ftype: str, name: str, extra_kv: dict[str, Any], feature_layer_key: bool):
    from gguf import GGUFType

    vision = ckpt.vision
    _, file_type = _types(ftype)
    feature_idx = feature_layer_index(vision)

    def add(writer) -> None:
        writer.add_type(GGUFType.MMPROJ)
        writer.add_name(name)
        writer.add_description(f"LLaVA image encoder + {ckpt.projector_type} projector (factedge)")
        writer.add_file_type(file_type)
        writer.add_clip_has_vision_encoder(True)
        writer.add_clip_projector_type(projector(ckpt.projector_type).gguf_type)
        writer.add_vision_image_size(vision.image_size)
        writer.add_vision_patch_size(vision.patch_size)
        writer.add_vision_embedding_length(vision.hidden_size)
        writer.add_vision_feed_forward_length(vision.intermediate_size)
        writer.add_vision_projection_dim(ckpt.text.hidden_size)
        writer.add_vision_block_count(feature_idx)  # layers stored = layers run
        writer.add_vision_head_count(vision.num_heads)
        writer.add_vision_attention_layernorm_eps(vision.layer_norm_eps)
        writer.add_vision_image_mean(list(vision.image_mean))
        writer.add_vision_image_std(list(vision.image_std))
        writer.add_vision_use_gelu(_USE_GELU[vision.hidden_act])
        if feature_layer_key:
            writer.add_array("clip.vision.feature_layer", [feature_idx])
        add_provenance(writer, ckpt.layout, "mmproj", extra_kv)

    return add


def write_mmproj(
    ckpt: Checkpoint,
    out_path: str | Path,
    *,
    ftype: str = "f32",
    extra_kv: dict[str, Any] | None = None,
    progress: Progress | None = None,
    name: str | None = None,
    feature_layer_key: bool = True,
) -> Path:
    """Stream the checkpoint's CLIP tower and projector into a `clip` GGUF at `out_path` (atomic)."""
    _check_spec(ckpt)
    plan = plan_mmproj(ckpt, ftype)
    metadata = _metadata(ckpt, ftype, name or f"{ckpt.root.name} mmproj", extra_kv or {}, feature_layer_key)
    return write_gguf(out_path, "clip", metadata, plan, progress=progress)
