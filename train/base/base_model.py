"""The "tiny base" the whole recipe starts from: a small random LLaVA in the original-LLaVA layout.

Real bases (Vicuna + CLIP) cannot be downloaded here, so the demo and the end-to-end tests start
from `build_base`: `train.tiny.build_tiny` writes the real files (LlavaLlamaForCausalLM folder, the
CLIP folder named by `mm_vision_tower`, the real 32000-piece LLaMA tokenizer), then the language model
is re-drawn with a *training* init (HF's: N(0, 0.02) matrices, unit norms). tiny's own LM weights are
tuned for converter parity tests (logit std ~8, sharp attention), a poor start for learning; the
CLIP and projector weights are kept (CLIP stays frozen and random: its features are a fixed random
map of the pixels, which the projector and LM learn to read). SFT (a full fine-tune) then teaches
the LM the synthetic world's language.

Default demo shape: ViT 224 px / patch 32 (49 image tokens), hidden 128, 4 layers; LLaMA vocab
32000, hidden 256, 4 layers, 4 heads, MLP 688; projector mlp2x_gelu.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from factedge.convert.specs import ProjectorType, TextSpec, VisionSpec
from factedge.edge.errors import ConfigError
from factedge.train.base.tensor_files import save_tensors
from factedge.train.base.smol_base import LM_KINDS, LMKind, write_smol_model
from factedge.train.base.tiny import build_tiny, clip_folder_name, write_clip
from factedge.train.base.tiny_cache import locked
from factedge.train.base.vision_pretrain import VisionPretrain, pretrain_tower_folder

INIT_STD = 0.02  # LlamaConfig.initializer_range


def demo_vision() -> VisionSpec:
    return VisionSpec(image_size=224, patch_size=32, hidden_size=128, intermediate_size=256, num_layers=4, num_heads=4)


def demo_text() -> TextSpec:
    return TextSpec(vocab_size=32000, hidden_size=256, intermediate_size=688, num_layers=4, num_heads=4,
                    num_kv_heads=4, max_position_embeddings=2048)


@dataclass(frozen=True)
class BaseSpec:
    """Shapes and seed of a base; `layout` is the original-LLaVA folder (what SFT writes back);
    weights are one model.safetensors (fp16)."""

    text: TextSpec = field(default_factory=demo_text)
    vision: VisionSpec = field(default_factory=demo_vision)
    projector: ProjectorType = "mlp2x_gelu"
    seed: int = 0
    vision_pretrain: VisionPretrain | None = None  # None: the tower stays random (see vision_pretrain.py)
    lm: LMKind = "llama"  # llama: a training-init LM + LLaMA's vocab; smollm2(-init): see smol_base.py

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def small_spec(seed: int = 0) -> BaseSpec:
    """A smaller base for unit tests (2 layers, 16 image tokens) with the real vocab."""
    vision = VisionSpec(image_size=64, patch_size=16, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2)
    text = TextSpec(vocab_size=32000, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2,
                    num_kv_heads=2, max_position_embeddings=1024)
    return BaseSpec(text=text, vision=vision, projector="mlp2x_gelu", seed=seed)


def training_init(text: TextSpec, seed: int) -> dict[str, torch.Tensor]:
    """LlamaForCausalLM weights as HF initialises them for training: N(0, 0.02), norms 1."""
    gen = torch.Generator().manual_seed(seed)
    h, f = text.hidden_size, text.intermediate_size
    kv = text.num_kv_heads * (h // text.num_heads)
    draw = lambda *shape: torch.randn(shape, generator=gen) * INIT_STD  # noqa: E731
    sd = {"model.embed_tokens.weight": draw(text.vocab_size, h)}
    for i in range(text.num_layers):
        p = f"model.layers.{i}"
        sd[f"{p}.input_layernorm.weight"] = torch.ones(h)
        for name, shape in (("self_attn.q_proj", (h, h)), ("self_attn.k_proj", (kv, h)), ("self_attn.v_proj", (kv, h)),
                            ("self_attn.o_proj", (h, h)), ("mlp.gate_proj", (f, h)), ("mlp.up_proj", (f, h)),
                            ("mlp.down_proj", (h, f))):
            sd[f"{p}.{name}.weight"] = draw(*shape)
        sd[f"{p}.post_attention_layernorm.weight"] = torch.ones(h)
    sd["model.norm.weight"] = torch.ones(h)
    sd["lm_head.weight"] = draw(text.vocab_size, h)
    return sd


def build_base(out: str | Path, spec: BaseSpec | None = None) -> Path:
    """Write a base into `out` (the CLIP folder and `llava-base-<px>/`); returns the LLaVA folder."""
    spec = spec or BaseSpec()
    if spec.lm not in LM_KINDS:
        raise ConfigError(f"base.lm must be one of {', '.join(LM_KINDS)}, not {spec.lm!r}")
    if spec.lm == "llama" and spec.text.vocab_size != 32000:
        raise ConfigError("the base uses the real LLaMA tokenizer: vocab_size must be 32000")
    if spec.text.hidden_size % spec.text.num_heads:
        raise ConfigError("hidden_size must be a multiple of num_heads")
    out = Path(out)
    if spec.lm == "llama":
        model = _llama_model(out, spec)
    else:
        clip_dir = write_clip(out / clip_folder_name(spec.vision.image_size), spec.vision, spec.seed)
        init = training_init(spec.text, spec.seed) if spec.lm == "smollm2-init" else {}
        model = write_smol_model(out, spec.lm, spec.text, spec.vision, spec.projector, clip_dir, spec.seed, init)
    if spec.vision_pretrain is not None:
        from factedge.convert.layouts import resolve_vision_tower
        from factedge.train.world.scene import WorldConfig

        cfg_path = model / "config.json"
        tower = resolve_vision_tower(json.loads(cfg_path.read_text()), cfg_path, None)
        metrics = pretrain_tower_folder(tower, spec.vision, WorldConfig(), spec.vision_pretrain)
        (tower / "pretraining.json").write_text(json.dumps(metrics, indent=1) + "\n")
    return model


def _llama_model(out: Path, spec: BaseSpec) -> Path:
    """tiny's original-LLaVA folder with the LM re-drawn by `training_init` (one model.safetensors)."""
    model = build_tiny("llava", out, projector=spec.projector, sharded=False, seed=spec.seed, text=spec.text,
                       vision=spec.vision)
    weights = model / "pytorch_model.bin"
    sd = torch.load(weights, map_location="cpu", weights_only=True)
    fresh = training_init(spec.text, spec.seed)
    dtype = sd["lm_head.weight"].dtype
    sd.update({k: v.to(dtype) for k, v in fresh.items()})
    save_tensors(model / "model.safetensors", sd, "safetensors")  # loads faster than a pickle
    weights.unlink()
    return model


def cached_base(spec: BaseSpec | None = None, cache_dir: str | Path | None = None) -> Path:
    """`build_base` once per (spec, builder sources); later calls return the same folder."""
    from factedge.train.base.tiny_cache import default_cache_dir

    spec = spec or BaseSpec()
    train = Path(__file__).resolve().parents[1]  # the train/ folder
    h = hashlib.sha256(spec.key().encode())
    for name in ("base/base_model.py", "base/tiny.py", "base/tiny_weights.py", "base/tensor_files.py", "base/spm_vocab.py",
                 "base/vision_pretrain.py", "world/scene.py", "world/render.py", "base/smol_base.py", "base/smol.py"):
        h.update((train / name).read_bytes())
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    folder = cache / f"base-{h.hexdigest()[:16]}"
    marker = folder / ".complete"
    with locked(cache / f".{folder.name}.lock"):
        if not marker.is_file():
            if folder.exists():
                shutil.rmtree(folder)  # an interrupted build
            model = build_base(folder, spec)
            tmp = marker.with_name(".complete.tmp")
            tmp.write_text(model.name + "\n")
            os.replace(tmp, marker)
        return folder / marker.read_text().strip()
