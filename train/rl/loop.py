"""The RL run every optimiser shares: set up, then per step rollout -> update -> log -> checkpoint.

PPO and the group estimators (GRPO, RLOO) differ only in what an `Algorithm` does with a rollout
batch (`update`) and in whether a value model exists; the rest lives here once: the actor-critic
with its adapters, the prompts, the step count (⌊prompts·epochs / prompts per step⌋ as the
reference), AdamW, the schedule (stepped once per RL step, `warmup_steps` of them, as the
reference trainer), resume from the newest checkpoint (weights, optimizer, schedule, RNG: the
prompts of a step are a function of (seed, step), so nothing else is needed), metrics, rollout logs,
and the output: the policy adapter as `rlhf_lora_adapter_model/` beside a link to `sft_model/` (the
LLaVA-RLHF layout `factedge convert` reads).

`optimise` runs `ppo_epochs` passes over a rollout batch in shuffled step batches (incomplete last
one dropped, as the reference's loader), each an accumulation of micro-batches, then one grad-norm
clip over every trainable parameter (policy and value together) and one AdamW step.
"""

from __future__ import annotations

import os
import shutil
import time
from collections import defaultdict
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch

from factedge.convert.layouts import RLHF_ADAPTER_DIR, RLHF_SFT_DIR
from factedge.edge.errors import ConfigError, InputError, OutputError
from factedge.train.rl.actor_critic import POLICY, ActorCritic
from factedge.train.lora import save_lora
from factedge.train.loop import Progress, make_optimizer, make_scheduler, micro_batches
from factedge.train.rl.config import RLBase
from factedge.train.rl.data import batch_indices, load_prompts, steps_for
from factedge.train.rl.oracle import check_reward_source
from factedge.train.rl.rollout import Rollout, collect, log_rollout, prompt_fits, rollout_stats
from factedge.train.run_dir import RunDir, RunResult, seed_everything

OUTPUT_DIR = "rlhf_model"
MicroLoss = Callable[[list[int], float], dict[str, float]]  # (sample indices, loss weight) -> stats


class Algorithm(Protocol):
    """What differs between PPO, GRPO and RLOO."""

    uses_value: bool
    samples_per_prompt: int

    def update(self, ac: ActorCritic, ro: Rollout, optimizer: torch.optim.Optimizer) -> dict[str, float]: ...


def optimise(ac: ActorCritic, optimizer: torch.optim.Optimizer, n_samples: int, cfg: RLBase,
             micro_loss: MicroLoss) -> dict[str, float]:
    """`ppo_epochs` × shuffled step batches × micro-batches; returns the mean of each statistic."""
    params = list(ac.trainables().values())
    step_size = min(cfg.step_batch_size, n_samples)
    if step_size < 1 or cfg.step_micro_batch_size < 1:
        raise ConfigError("step_batch_size and step_micro_batch_size must be positive")
    sums: dict[str, float] = defaultdict(float)
    n_steps = 0
    ac.train(True)
    for _ in range(cfg.ppo_epochs):
        order = torch.randperm(n_samples).tolist()
        for start in range(0, n_samples - step_size + 1, step_size):
            batch = order[start:start + step_size]
            optimizer.zero_grad(set_to_none=True)
            for micro in micro_batches(batch, cfg.step_micro_batch_size):
                weight = len(micro) / len(batch)
                for k, v in micro_loss(micro, weight).items():
                    sums[k] += v * weight
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.optim.max_grad_norm) \
                if cfg.optim.max_grad_norm > 0 else None
            if grad_norm is not None:
                sums["grad_norm"] += float(grad_norm)
            optimizer.step()
            n_steps += 1
    optimizer.zero_grad(set_to_none=True)
    ac.train(False)
    return {k: v / max(n_steps, 1) for k, v in sums.items()} | {"optimizer_steps": n_steps}


def sft_folder(base: str | Path) -> Path:
    """The folder a LLaVA-RLHF root's `sft_model/` should be: the base's own sft_model, or the base."""
    base = Path(base).resolve()
    return base / RLHF_SFT_DIR if (base / RLHF_SFT_DIR).is_dir() else base


def save_output(ac: ActorCritic, cfg: RLBase, run_path: Path) -> Path:
    """`<run>/rlhf_model/`: `rlhf_lora_adapter_model/` (the policy) + `sft_model` -> the base."""
    out = run_path / OUTPUT_DIR
    sft = sft_folder(cfg.model.base)
    out.mkdir(parents=True, exist_ok=True)
    save_lora(ac.model, out / RLHF_ADAPTER_DIR, name=POLICY, base=sft)
    link = out / RLHF_SFT_DIR
    tmp = out / f".{RLHF_SFT_DIR}.tmp-{os.getpid()}"
    try:
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink() if tmp.is_symlink() else shutil.rmtree(tmp)
        try:
            tmp.symlink_to(sft, target_is_directory=True)
        except OSError:  # no symlinks (Windows without the privilege): copy
            shutil.copytree(sft, tmp)
        if link.is_symlink() or link.is_file():
            link.unlink()
        elif link.is_dir():
            shutil.rmtree(link)
        os.replace(tmp, link)
    except OSError as exc:
        raise OutputError(f"cannot place sft_model: {exc}", link) from exc
    return out


def load_items(ac: ActorCritic, cfg: RLBase):
    facts = cfg.reward.facts if cfg.reward.use_facts else None
    if cfg.reward.use_facts and facts is None and cfg.reward.source == "rm":  # the oracle reads scenes
        raise ConfigError("reward.use_facts needs reward.facts (image_to_caption.json); or set use_facts false")
    items = load_prompts(cfg.data, image_folder=cfg.image_folder, facts_path=facts)
    kept = [it for it in items if prompt_fits(ac, it, cfg.rollout.max_prompt_tokens)]
    if not kept:
        raise InputError(f"no prompt fits max_prompt_tokens={cfg.rollout.max_prompt_tokens}", cfg.data)
    return kept


@dataclass
class Session:
    """An RL-family run in progress: folder, adapters, optimiser and schedule, first step to run."""

    cfg: RLBase
    run: RunDir
    ac: ActorCritic
    optimizer: torch.optim.Optimizer
    scheduler: Any
    total: int
    start: int


def open_session(cfg: RLBase, total_for: Callable[[ActorCritic], int], *, value: bool = False,
                 reward: bool = True, value_adapter: str | None = None) -> Session:
    """Seed, build the adapters, plan `total_for(ac)` steps, AdamW + schedule (stepped once per
    step), and resume from the newest checkpoint (or record the config). The run folder is made only
    once the model and the data have loaded, so bad input leaves nothing behind."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world > 1:  # every process would roll out and write the same run folder
        raise ConfigError(f"the RL stages (PPO, GRPO, RLOO, DPO) run on one process, not {world}: start them with "
                          "python or `factedge train`, not `accelerate launch --num_processes N`")
    if cfg.run.num_threads > 0:
        torch.set_num_threads(cfg.run.num_threads)
    seed_everything(cfg.run.seed)
    check_reward_source(cfg.reward)
    ac = ActorCritic.build(cfg, value=value, value_adapter=value_adapter, reward=reward)
    total = total_for(ac)
    run = RunDir(cfg.run.out, keep=cfg.run.keep_checkpoints)
    optimizer = make_optimizer(ac.trainables().values(), cfg.optim)
    scheduler = make_scheduler(optimizer, cfg.optim, total, cfg.optim.warmup_steps)
    latest = run.latest_checkpoint() if cfg.run.resume else None
    start = 0
    if latest is not None:
        start = run.load_checkpoint(latest, None, optimizer, scheduler, trainables=ac.trainables()).step
    else:
        run.write_config(cfg)
    return Session(cfg, run, ac, optimizer, scheduler, total, start)


def drive(s: Session, step: Callable[[int], dict[str, Any]], progress: Progress | None = None) -> RunResult:
    """Steps `start`..`total`: `step(i)` does the work and returns its figures; then the schedule,
    metrics.jsonl, checkpoints (weights, optimizer, schedule, RNG) and progress; finally the output."""
    cfg, run, ac = s.cfg, s.run, s.ac
    metrics: dict[str, Any] = {}
    for i in range(s.start, s.total):
        t0 = time.perf_counter()
        stats = step(i)
        lr = s.scheduler.get_last_lr()[0]
        s.scheduler.step()
        done = i + 1
        metrics = {**stats, "lr": lr, "step_s": time.perf_counter() - t0}
        if done % max(cfg.run.log_every, 1) == 0 or done == s.total:
            run.log(done, metrics)
        if (cfg.run.save_every > 0 and done % cfg.run.save_every == 0) or done == s.total:
            saved = {n: p.detach() for n, p in ac.trainables().items()}
            run.save_checkpoint(done, None, s.optimizer, s.scheduler, {"epoch": metrics.get("epoch", 0.0)},
                                trainables=saved)
        if progress is not None:
            progress(done, s.total, metrics)
    output = save_output(ac, cfg, run.path)
    return RunResult(run.path, output, s.total, metrics)


def run_rl(cfg: RLBase, algo: Algorithm, progress: Progress | None = None, *,
           value_adapter: str | None = None) -> RunResult:
    """Train `algo` as configured; returns the run folder and the LLaVA-RLHF-layout output."""
    k = algo.samples_per_prompt
    if cfg.rollout.batch_size < k or cfg.rollout.batch_size % k:
        raise ConfigError(f"rollout.batch_size {cfg.rollout.batch_size} must be a multiple of {k} (group size)")
    per_step = cfg.rollout.batch_size // k
    items: list = []

    def plan(ac: ActorCritic) -> int:
        items.extend(load_items(ac, cfg))
        return steps_for(len(items), per_step, cfg.epochs, cfg.max_steps)

    s = open_session(cfg, plan, value=algo.uses_value, value_adapter=value_adapter,
                     reward=algo.uses_value or cfg.reward.source == "rm")

    def step(i: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        batch = [items[j] for j in batch_indices(len(items), per_step, i, cfg.run.seed) for _ in range(k)]
        ro = collect(s.ac, batch, cfg, with_values=algo.uses_value, step=i)
        t1 = time.perf_counter()
        stats = algo.update(s.ac, ro, s.optimizer)
        if cfg.rollout.log:
            log_rollout(s.run.path / "rollouts" / f"step-{i + 1}.jsonl", ro, i + 1)
        return {**rollout_stats(ro), **stats, "epoch": (i + 1) * per_step / len(items),
                "rollout_tokens_per_s": int(ro.mask.sum()) / max(t1 - t0, 1e-9),
                "samples_per_s": len(ro) / max(time.perf_counter() - t0, 1e-9)}

    return drive(s, step, progress)
