"""`factedge train sft|rm|ppo|grpo|rloo|dpo --config FILE [--key value ...]`: a thin click layer.

Each command reads the stage's config dataclass from a YAML/TOML file plus `--key value`
overrides (config.load_config), runs the library function with exactly that config, and shows a
progress bar with the figures the trainer reports (loss, accuracy, reward, KL, tokens/s). The
library never prints; the run folder holds config.json, metrics.jsonl and checkpoints. The RL
commands import helper RL's modules only when named.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any, Callable

import click

# command -> (config class, trainer, fixed overrides)
STAGES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "sft": ("factedge.train.config:SFTConfig", "factedge.train.sft:train_sft", ()),
    "rm": ("factedge.train.rm.config:RMConfig", "factedge.train.rm.trainer:train_rm", ()),
    "ppo": ("factedge.train.rl.config:PPOConfig", "factedge.train.rl.ppo:train_ppo", ()),
    "grpo": ("factedge.train.rl.config:GroupRLConfig", "factedge.train.rl.group_rl:train_group_rl",
             ("--estimator", "grpo")),
    "rloo": ("factedge.train.rl.config:GroupRLConfig", "factedge.train.rl.group_rl:train_group_rl",
             ("--estimator", "rloo")),
    "dpo": ("factedge.train.dpo.config:DPOConfig", "factedge.train.dpo.trainer:train_dpo", ()),
}
HELP = {
    "sft": "Supervised fine-tuning on LLaVA conversation JSON (full fine-tune or LoRA).",
    "rm": "Train the (fact-augmented) reward model on preference pairs.",
    "ppo": "Fact-RLHF PPO with policy / reference / value / reward LoRA adapters on one base.",
    "grpo": "GRPO with the fact-augmented reward model (group-normalised advantages, no value model).",
    "rloo": "RLOO with the fact-augmented reward model (leave-one-out baseline, no value model).",
    "dpo": "DPO of a policy LoRA on fact-checked pairs: offline (a preference file, optionally with mDPO's "
           "image-conditional pairs) or on-policy (sampled answers ranked by the fact RM or the oracle).",
}
# metric key -> (label, format) shown on the progress line, in this order
SHOWN = (("loss", "loss", "{:.4f}"), ("accuracy", "acc", "{:.3f}"), ("eval_accuracy", "eval acc", "{:.3f}"),
         ("reward", "reward", "{:.3f}"), ("kl", "KL", "{:.4f}"), ("tokens_per_s", "tok/s", "{:.0f}"),
         ("samples_per_s", "samples/s", "{:.2f}"), ("pairs", "pairs", "{:.0f}"))


def _load(target: str) -> Any:
    module, attr = target.split(":")
    return getattr(importlib.import_module(module), attr)


def describe(metrics: dict[str, Any]) -> str:
    """The progress line's figures, e.g. `loss 2.3012  tok/s 1234`."""
    parts = []
    for key, label, fmt in SHOWN:
        value = metrics.get(key)
        if isinstance(value, (int, float)):
            parts.append(f"{label} {fmt.format(value)}")
    return "  ".join(parts)


def _progress(stage: str) -> tuple[Any, Callable[[int, int, dict], None]]:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn(f"[bold]{stage}[/bold]"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("{task.fields[info]}"), console=Console(stderr=True), transient=False)
    task = bar.add_task(stage, total=None, info="loading")

    def update(step: int, total: int, metrics: dict[str, Any]) -> None:
        bar.update(task, completed=step, total=total, info=describe(metrics))

    return bar, update


def run_stage(stage: str, config: str | None, overrides: tuple[str, ...], print_config: bool = False) -> Any:
    """Load the stage's config and run its trainer under a progress bar; returns the RunResult."""
    from factedge.train.config import config_to_dict, load_config

    cls_name, trainer_name, fixed = STAGES[stage]
    cfg = load_config(_load(cls_name), Path(config) if config else None, list(overrides) + list(fixed))
    if print_config:
        click.echo(json.dumps(config_to_dict(cfg), indent=2))
        return None
    trainer = _load(trainer_name)
    bar, update = _progress(stage)
    with bar:
        result = trainer(cfg, progress=update)
    click.echo(f"run folder: {result.run_dir}")
    if result.output is not None:
        click.echo(f"output:     {result.output}")
    if result.metrics:
        click.echo(f"last step {result.step}: {describe(result.metrics)}")
    return result


def _command(stage: str) -> click.Command:
    @click.command(name=stage, help=HELP[stage] + " Overrides: --key value (dotted for groups, e.g. --optim.lr 1e-4).",
                   context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
    @click.option("--config", "config", type=click.Path(dir_okay=False), default=None,
                  help="YAML or TOML file with the stage's settings.")
    @click.option("--print-config", is_flag=True, help="Print the resolved settings as JSON and exit.")
    @click.argument("overrides", nargs=-1, type=click.UNPROCESSED)
    def command(config: str | None, print_config: bool, overrides: tuple[str, ...]) -> None:
        run_stage(stage, config, overrides, print_config)

    return command


@click.group()
def train() -> None:
    """Run a stage of the Fact-RLHF recipe (SFT -> reward model -> PPO / GRPO / RLOO, or DPO)."""


for _stage in STAGES:
    train.add_command(_command(_stage))
