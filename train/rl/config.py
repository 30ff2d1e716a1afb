"""PPO and group-RL (GRPO / RLOO) configs with LLaVA-RLHF's defaults (FACT_RLHF.md, the 7B script).

Loaded with `train.config.load_config(PPOConfig, path, overrides)` like the other stages; the model
and run sections are helper MODEL's `ModelConfig` / `LoraSettings` / `RunSettings`. The RL-specific
batch shape does not fit `OptimSettings` (a PPO step is one rollout batch, several optimizer steps,
and the LR schedule and its 5 warmup steps count rollouts, as the reference trainer does), hence
`RLOptim`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from factedge.train.config import AdamWSettings, LoraSettings, ModelConfig, RunSettings


@dataclass
class RolloutSettings:
    """Sampling: temperature 1, top-p 1, top-k 0; prompts ≤ 128 tokens, responses ≤ 896."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 896
    max_prompt_tokens: int = 128  # prompt ids (system + first user turn, the image placeholder as one); longer: skipped
    batch_size: int = 512  # samples per RL step (the reference's rollout_batch_size)
    micro_batch_size: int = 8  # sequences generated / scored at once
    log: bool = True  # rollouts/step-N.jsonl in the run folder


@dataclass
class RewardSettings:
    """The frozen reward model and the shaping around it (RM + stop, length, correctness, KL)."""

    adapter: str = ""  # RM folder: PEFT LoRA + reward_head.safetensors (rm_lora_adapter_model/)
    source: str = "rm"  # rm: the reward model scores | oracle: the world's judge against scenes (rl/oracle.py)
    scenes: str | None = None  # scenes.json, for source oracle
    oracle_score: str = "mmhal"  # mmhal: judge score − 3 | claims: true claims (+1 right answer) − w·false claims
    #                              | objects: objects identified by true claims (+1 right answer) − w·false claims
    oracle_false_weight: float = 2.0  # w of oracle_score claims / objects
    facts: str | None = None  # image_to_caption.json; None: the plain reward prompt
    use_facts: bool = True
    penalty_no_eos: float = -8.0
    length_score: float = -10.0  # × length_bonus multiplier × len / max_new_tokens
    correct_score: float = 2.0
    bias: float = 0.0
    kl_coef: float = 0.1
    kl_estimator: str = "k1"  # k1 clamped at 0 (the paper) | k3
    whiten_rewards: bool = False
    unwhitened_scale: float = 10.0  # the reference multiplies shaped rewards by 10 when not whitening


@dataclass
class RLOptim(AdamWSettings):
    """AdamW over the trainable adapters (+ value head); schedule stepped once per RL step;
    max_grad_norm clips policy and value together."""

    lr: float = 3e-5
    warmup_steps: int = 5


@dataclass
class RLBase:
    """What every RL optimiser shares: model, data, rollout, reward, optimiser, run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    policy_adapter: str | None = None  # RL-init LoRA (policy and reference start here); None: fresh LoRA
    lora: LoraSettings = field(default_factory=LoraSettings)  # shape of a fresh policy LoRA
    data: str = ""  # ppo_prompts.json
    image_folder: str | None = None  # default: the prompts file's folder
    epochs: float = 4.0  # passes over the prompts
    max_steps: int = 0  # > 0: stop after this many RL steps
    step_batch_size: int = 256  # samples per optimizer step
    step_micro_batch_size: int = 4  # samples per forward/backward (gradient accumulation up to step_batch_size)
    ppo_epochs: int = 2  # optimisation passes over each rollout batch
    cliprange: float = 0.2
    rollout: RolloutSettings = field(default_factory=RolloutSettings)
    reward: RewardSettings = field(default_factory=RewardSettings)
    optim: RLOptim = field(default_factory=RLOptim)
    run: RunSettings = field(default_factory=lambda: RunSettings(out="runs/ppo", save_every=10))


@dataclass
class PPOConfig(RLBase):
    """Fact-RLHF PPO: policy + value (from the RM LoRA, zero head), GAE, clipped losses."""

    gamma: float = 1.0
    lam: float = 1.0
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    whiten_advantages: bool = True
    value_adapter: str | None = None  # None: initialise the value LoRA from the reward adapter


@dataclass
class GroupRLConfig(RLBase):
    """GRPO / RLOO: k samples per prompt, advantages from the group; no value model."""

    estimator: str = "grpo"  # grpo | rloo
    group_size: int = 4  # samples per prompt (rollout.batch_size counts samples)
    scale_rewards: bool = True  # GRPO: divide by the group std
    ppo_epochs: int = 1
    kl_in: str = "reward"  # reward: −β·Σ KL folded into each sample's reward | loss: β·k3 KL added to the loss
    run: RunSettings = field(default_factory=lambda: RunSettings(out="runs/grpo", save_every=10))
