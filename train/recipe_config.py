"""The recipe's configuration: every knob in one dataclass, and the presets of the tiny-LLaMA recipe.

Why the base looks as it does (see `recipe_base`): 112 px with 16-px patches (49 tokens) and a 2-layer
ViT, whose first layer is *pretrained on the world* (`vision_pretrain.py`, the stand-in for CLIP's own
pretraining) before the LLaVA stages, which keep it frozen. With a random tower the tiny LM learnt the
language but not the image (answer loss with the right image == with a shuffled one, even after
thousands of fresh images on an H100); with the pretrained tower, 600 SFT steps on 2 CPU cores give a
held-out answer loss of 0.216 with the right image vs 0.668 with a shuffled one (bench/probes/image_use.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from factedge.convert.specs import TextSpec, VisionSpec
from factedge.edge.errors import ConfigError
from factedge.train.base.base_model import BaseSpec
from factedge.train.base.vision_pretrain import VisionPretrain
from factedge.train.config import LoraSettings, ModelConfig, OptimSettings, RunSettings, SFTConfig
from factedge.train.rl.config import PPOConfig, RewardSettings, RLOptim, RolloutSettings
from factedge.train.rm.config import RMConfig
from factedge.train.world.scene import WorldConfig


def recipe_base(seed: int = 0, *, hidden: int = 256, layers: int = 4, mlp: int = 688,
                pretrain: VisionPretrain | None = None) -> BaseSpec:
    """112 px / 16-px patches (49 tokens), 2 ViT layers (features = output of layer 1), the tower
    pretrained on the world (`pretrain`, default VisionPretrain()); LLaMA vocab 32000."""
    vision = VisionSpec(image_size=112, patch_size=16, hidden_size=128, intermediate_size=256, num_layers=2,
                        num_heads=4)
    text = TextSpec(vocab_size=32000, hidden_size=hidden, intermediate_size=mlp, num_layers=layers, num_heads=4,
                    num_kv_heads=4, max_position_embeddings=2048)
    return BaseSpec(text=text, vision=vision, projector="mlp2x_gelu", seed=seed,
                    vision_pretrain=pretrain or VisionPretrain(seed=seed))


@dataclass
class RecipeConfig:
    """Every knob of the recipe; the stage configs' data/model/out paths are filled in by `run_recipe`."""

    n_images: int = 3000
    seed: int = 0
    world: WorldConfig = field(default_factory=lambda: WorldConfig(image_size=112))
    base: BaseSpec = field(default_factory=recipe_base)
    pretrain: SFTConfig | None = None  # LLaVA's stage 1 (mode "projector") before SFT; None: none
    sft: SFTConfig = field(default_factory=SFTConfig)
    rm: RMConfig = field(default_factory=RMConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    plain_rm: bool = False  # also train the RM without facts (same data and budget), for the comparison
    device: str = "auto"  # auto (CUDA when available) | cpu | cuda
    threads: int = 0  # torch CPU threads (0: leave torch's setting)
    scale: str = "cpu"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _lora(r: int) -> LoraSettings:
    return LoraSettings(r=r, alpha=2 * r)


def check_scale(scale: str) -> None:
    if scale not in ("micro", "cpu", "gpu"):
        raise ConfigError(f"scale must be micro, cpu or gpu, not {scale!r}")


def tiny_preset(scale: str = "cpu", seed: int = 0) -> RecipeConfig:
    """micro (tests, seconds) | cpu (the demo: ~9 minutes on 2 cores) | gpu (one H100; not yet timed with
    the pretrained tower)."""
    check_scale(scale)
    gpu = scale == "gpu"
    pick = lambda micro, cpu, gpu_: {"micro": micro, "cpu": cpu, "gpu": gpu_}[scale]  # noqa: E731
    pretrain = VisionPretrain(steps=pick(3, 1500, 3000), batch_size=pick(4, 32, 64), seed=seed)
    base = recipe_base(seed, pretrain=pretrain) if gpu else recipe_base(
        seed, hidden=pick(64, 128, 0), layers=2, mlp=pick(128, 344, 0), pretrain=pretrain)
    mdl = ModelConfig(dtype="float32")
    sft_batch = pick(8, 32, 64)
    sft = SFTConfig(model=mdl, mode="full", max_length=256, save_dtype="float32",
                    optim=OptimSettings(lr=1e-3, epochs=pick(1.0, 1.0, 3.0), batch_size=sft_batch,
                                        micro_batch_size=sft_batch, warmup_ratio=0.03, max_steps=pick(2, 600, 0)),
                    run=RunSettings(seed=seed, resume=False))
    rm_batch = pick(8, 16, 32)
    rm = RMConfig(model=mdl, use_facts=True, lora=_lora(16), max_length=512, eval_size=0, eval_every=0,
                  optim=OptimSettings(lr=1e-3, scheduler="constant_with_warmup", epochs=1.0, batch_size=rm_batch,
                                      micro_batch_size=rm_batch, warmup_ratio=0.03, max_steps=pick(2, 120, 240)),
                  run=RunSettings(seed=seed, resume=False))
    roll, max_new = pick(4, 16, 128), pick(8, 56, 64)  # the longest world description is 49 tokens + EOS
    # the paper's length rate: -10 per 896 tokens, whatever max_new_tokens is (the term scales by it)
    reward = RewardSettings(use_facts=True, length_score=-10.0 * max_new / 896)
    ppo = PPOConfig(model=mdl, lora=_lora(16), epochs=1.0, max_steps=pick(1, 40, 60), step_batch_size=roll,
                    step_micro_batch_size=roll, ppo_epochs=2,
                    rollout=RolloutSettings(max_new_tokens=max_new, batch_size=roll, micro_batch_size=roll, log=False),
                    reward=reward,
                    optim=RLOptim(lr=pick(1e-3, 2e-4, 2e-4), warmup_steps=1),
                    run=RunSettings(seed=seed, resume=False, save_every=0))
    return RecipeConfig(n_images=pick(40, 1000, 6000), seed=seed, base=base, sft=sft, rm=rm, ppo=ppo, scale=scale)
