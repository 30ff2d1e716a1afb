"""The DPO stage's config: what it shares with the RL stages (model, policy LoRA, rollout, reward,
optimiser, run) plus the preference settings. Read with `train.config.load_config(DPOConfig, ...)`."""

from __future__ import annotations

from dataclasses import dataclass, field

from factedge.train.config import RunSettings
from factedge.train.rl.config import RLBase, RLOptim

PAIR_SOURCES = ("offline", "on_policy")
CHOSEN_SOURCES = ("best", "reference")  # on_policy: the chosen side of a pair


@dataclass
class DPOConfig(RLBase):
    """Direct preference optimisation of the policy LoRA against the SFT model (the reference).

    offline: pairs from `preference` (LLaVA-Human-Preference-10K format); `epochs`, `max_steps`,
    `step_batch_size` pairs per optimizer step. on_policy (RLAIF-V-style): each step samples
    `samples_per_prompt` answers for each prompt of `data` (ppo_prompts.json) from the current policy,
    ranks them by `reward` (the fact RM or the oracle) and trains on best vs worst; with `chosen`
    "reference" (POVID / HA-DPO: the ground truth preferred to the model's own hallucination) the chosen
    side is the prompt's reference answer and the worst sample the rejected one, so a prompt whose
    samples all make the same mistake still gives a pair."""

    pairs: str = "offline"  # one of PAIR_SOURCES
    preference: str = ""  # offline: the preference pairs file
    beta: float = 0.1
    label_smoothing: float = 0.0  # conservative DPO's ε
    image_pairs: bool = False  # mDPO: also (chosen, its image) ≻ (chosen, another image)
    image_weight: float = 1.0  # weight of the image-conditional pairs' loss
    anchor_weight: float = 0.0  # mDPO's anchor −log σ(β·Δ_w) (mDPO uses 1 with image_pairs)
    nll_weight: float = 0.0  # + per-token NLL of the chosen response (RPO); keeps answers from thinning
    samples_per_prompt: int = 4  # on_policy: answers per prompt
    min_gap: float = 0.5  # on_policy, chosen best: groups whose best and worst reward differ less give no pair
    chosen: str = "best"  # on_policy: one of CHOSEN_SOURCES (reference: needs the prompts' reference turns)
    ppo_epochs: int = 1  # passes over each step's pairs (on_policy)
    step_batch_size: int = 16
    step_micro_batch_size: int = 8
    optim: RLOptim = field(default_factory=lambda: RLOptim(lr=5e-5, warmup_steps=5, scheduler="cosine"))
    run: RunSettings = field(default_factory=lambda: RunSettings(out="runs/dpo", save_every=50))
