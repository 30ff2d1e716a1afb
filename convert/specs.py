"""What a LLaVA-family checkpoint is, independent of how its files are laid out.

`layouts.py` reads a folder (llava-hf, original LLaVA, LLaVA-RLHF) into a `Checkpoint`; every writer,
the PyTorch reference and `verify` consume only this, so a new layout is one reader, not a new path
through the whole converter. Tensor names here are *canonical*:
- language model: HF `LlamaForCausalLM` names (`model.embed_tokens.weight`,
  `model.layers.{i}.self_attn.q_proj.weight`, ..., `model.norm.weight`, `lm_head.weight`);
- vision tower: HF `CLIPVisionModel` names below `vision_model.` (`embeddings.class_embedding`,
  `embeddings.patch_embedding.weight`, `embeddings.position_embedding.weight`, `pre_layrnorm.weight`,
  `encoder.layers.{i}.self_attn.q_proj.weight`, ..., `post_layernorm.weight`);
- projector: LLaVA's `nn.Sequential` indices (`0.weight`, `0.bias`, and for mlp2x_gelu `2.weight`, `2.bias`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Literal

LayoutName = Literal["llava-hf", "llava", "llava-rlhf"]
ProjectorType = Literal["linear", "mlp2x_gelu"]

# (canonical name, loader) pairs: the loader materialises one tensor (a torch.Tensor) when called,
# so writers can stream a model tensor by tensor with memory bounded by the largest tensor.
LazyTensors = Iterator[tuple[str, Callable[[], "object"]]]


@dataclass(frozen=True)
class TextSpec:
    """LLaMA/Vicuna hyper-parameters, as in HF `LlamaConfig`."""

    vocab_size: int  # rows of the embedding matrix (llava-hf pads this, e.g. 32064)
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    bos_token_id: int = 1
    eos_token_id: int = 2
    unk_token_id: int = 0
    pad_token_id: int = 0  # LLaVA: pad = unk


@dataclass(frozen=True)
class VisionSpec:
    """CLIP ViT hyper-parameters and the image contract (size, normalisation, feature layer)."""

    image_size: int
    patch_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    image_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    feature_layer: int = -2  # HF hidden_states index, negative as in LLaVA configs
    select_feature: str = "patch"  # "patch" drops CLS (LLaVA default)

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def tokens_per_image(self) -> int:
        return self.patches_per_side**2

    @property
    def pad_color(self) -> tuple[int, int, int]:
        """LLaVA's pad-to-square colour: the mean, in 0..255 (122, 116, 104 for CLIP)."""
        return tuple(int(m * 255) for m in self.image_mean)  # type: ignore[return-value]


@dataclass
class Checkpoint:
    """One LLaVA-family model on disk, read into canonical form (tensors stay lazy)."""

    layout: LayoutName
    root: Path
    text: TextSpec
    vision: VisionSpec
    projector_type: ProjectorType
    tokenizer_dir: Path  # folder holding tokenizer.model (+ tokenizer_config.json, added_tokens.json)
    image_token_id: int | None = None  # llava-hf's `<image>` id; None for original LLaVA
    adapter_dir: Path | None = None  # PEFT LoRA folder (LLaVA-RLHF's rlhf_lora_adapter_model, or --lora)
    source_files: list[Path] = field(default_factory=list)  # every file read, for manifest hashes
    _lm: Callable[[], LazyTensors] | None = None
    _vision: Callable[[], LazyTensors] | None = None
    _projector: Callable[[], LazyTensors] | None = None

    def lm_tensors(self) -> LazyTensors:
        assert self._lm is not None
        return self._lm()

    def vision_tensors(self) -> LazyTensors:
        assert self._vision is not None
        return self._vision()

    def projector_tensors(self) -> LazyTensors:
        assert self._projector is not None
        return self._projector()
