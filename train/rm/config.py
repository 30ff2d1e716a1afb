"""The reward-model stage's config, with the paper's defaults (FACT_RLHF.md). Read with
`train.config.load_config(RMConfig, file, overrides)` like every stage's."""

from __future__ import annotations

from dataclasses import dataclass, field

from factedge.train.config import LoraSettings, ModelConfig, OptimSettings, RunSettings


@dataclass
class RMConfig:
    """The fact-augmented reward model (stage 4): LoRA + Linear(hidden, 1) head, Bradley-Terry."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: str = ""  # LLaVA-Human-Preference-10K-format JSON
    facts: str | None = None  # image_to_caption.json (image key -> list of facts)
    image_folder: str | None = None
    use_facts: bool = True  # fact-augmented prompt (False: the same prompt without the fact lines)
    eval_data: str | None = None  # held-out pairs file; None: the last `eval_size` pairs of `data`
    eval_size: int = 500
    eval_every: int = 50  # optimizer steps between held-out accuracy evaluations (0: only at the end)
    prompt_form: str = "paper"  # the rating request (rm.prompt.REWARD_FORMS): paper | verify
    # the head starts as the LM's logit(good) - logit(bad) at the score position, a zero-shot judge for
    # a pretrained LM (rm.model.reading_head); False: a fresh head, as the paper
    reading_head: bool = False
    centering_coef: float = 1e-3  # the 1e-3 * |mean(r1 + r2)| term
    lora: LoraSettings = field(default_factory=LoraSettings)
    max_length: int = 1280
    optim: OptimSettings = field(default_factory=lambda: OptimSettings(
        lr=2e-5, scheduler="constant_with_warmup", epochs=1.0, batch_size=32))
    run: RunSettings = field(default_factory=lambda: RunSettings(out="runs/rm"))
