"""The recipe's presets on SmolLM2-135M-Instruct: a pretrained LM under the shapes-world LLaVA.

The same stages and trainers as the tiny-LLaMA recipe (recipe.py); what changes is what a pretrained
LM needs: LLaVA's stage 1 first (the projector alone learns to feed the frozen LM, lr 2e-3 as the
paper), then SFT at a fine-tuning learning rate rather than the from-scratch 1e-3 (the paper's 2e-5
with batch 128; here 5e-5 with batch 8), and LoRA learning rates for the RM and PPO in the paper's
range. The conversations are ChatML, SmolLM2's own format (train/conversation.py follows the model).
The reward models use the "verify" prompt form with a reading head (rm/prompt.py, rm/model.py).

Scales: micro (tests: "smollm2-init", SmolLM2's structure and tokenizer at 2 layers, seconds),
cpu (the reduced preset: 2 cores; its stage times are measured, see BENCHMARKS.md), gpu (one GPU).
"""

from __future__ import annotations

import dataclasses

from factedge.edge.errors import ConfigError
from factedge.train.base.smol_base import smol_135m_text, smol_init_text
from factedge.train.config import LoraSettings, ModelConfig, OptimSettings, RunSettings, SFTConfig
from factedge.train.recipe_config import RecipeConfig, check_scale, recipe_base
from factedge.train.rl.config import PPOConfig, RewardSettings, RLOptim, RolloutSettings
from factedge.train.rm.config import RMConfig
from factedge.train.base.vision_pretrain import VisionPretrain
from factedge.train.world.scene import WorldConfig


def _optim(lr: float, batch: int, steps: int, scheduler: str = "cosine", micro: int = 0) -> OptimSettings:
    return OptimSettings(lr=lr, scheduler=scheduler, epochs=1.0, batch_size=batch, micro_batch_size=micro or batch,
                         warmup_ratio=0.03, max_steps=steps)


def smol_preset(scale: str, seed: int = 0, lm: str = "smollm2") -> RecipeConfig:
    """The recipe on a SmolLM2 base (`lm` "smollm2": the real weights; "smollm2-init": test size)."""
    if lm not in ("smollm2", "smollm2-init"):
        raise ConfigError(f"lm must be llama, smollm2 or smollm2-init, not {lm!r}")
    check_scale(scale)
    pick = lambda micro, cpu, gpu: {"micro": micro, "cpu": cpu, "gpu": gpu}[scale]  # noqa: E731
    text = smol_135m_text() if lm == "smollm2" else smol_init_text()
    pretrain_tower = VisionPretrain(steps=pick(3, 1500, 3000), batch_size=pick(4, 32, 64), seed=seed)
    base = dataclasses.replace(recipe_base(seed, pretrain=pretrain_tower), text=text, lm=lm)
    mdl = ModelConfig(dtype="float32")
    run = RunSettings(seed=seed, resume=False)
    batch = pick(4, 8, 64)
    projector = SFTConfig(model=mdl, mode="projector", max_length=256, save_dtype="float32",
                          optim=_optim(2e-3, batch, pick(1, 60, 300)), run=run)
    sft = SFTConfig(model=mdl, mode="full", max_length=256, save_dtype="float32",
                    optim=_optim(pick(1e-3, 1e-4, 2e-5), batch, pick(1, 120, 1500)), run=run)
    # the RM asks the question SmolLM2 answers zero-shot (rm.prompt "verify": captions, the quoted
    # exchange, "supported? Yes or No") and starts from that answer (reading_head): the paper's long
    # rating request is below chance for a 135M LM before training (BENCHMARKS.md)
    rm = RMConfig(model=mdl, use_facts=True, lora=LoraSettings(r=16, alpha=32), max_length=384, eval_size=0,
                  eval_every=0, run=run, prompt_form="verify", reading_head=True,
                  optim=_optim(pick(1e-3, 2e-4, 1e-4), batch, pick(1, 16, 300), "constant_with_warmup", pick(0, 4, 16)))
    roll, max_new = pick(2, 8, 128), pick(8, 48, 64)
    ppo = PPOConfig(model=mdl, lora=LoraSettings(r=16, alpha=32), epochs=1.0, max_steps=pick(1, 8, 60),
                    step_batch_size=roll, step_micro_batch_size=roll, ppo_epochs=2,
                    rollout=RolloutSettings(max_new_tokens=max_new, batch_size=roll, micro_batch_size=roll, log=False),
                    reward=RewardSettings(use_facts=True, length_score=-10.0 * max_new / 896),
                    optim=RLOptim(lr=pick(1e-3, 5e-5, 3e-5), warmup_steps=1),
                    run=dataclasses.replace(run, save_every=0))
    return RecipeConfig(n_images=pick(24, 1000, 6000), seed=seed, world=WorldConfig(image_size=112), base=base,
                        pretrain=projector, sft=sft, rm=rm, ppo=ppo, scale=scale)
