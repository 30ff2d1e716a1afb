"""The parts every trainer's loop shares: batch order, optimizer, schedule, accelerate, throughput.

The batch order is a pure function of (seed, step): global batch `step` is a slice of a permutation
drawn from a generator seeded with (seed, epoch). So a resumed run reads exactly the batches the
uninterrupted one would have, without saving a data-loader state, and each process of a multi-GPU
run takes its share (`shard`) of the same global batch. accelerate does the device placement, DDP
wrapping, autocast and gradient sync (on one CPU it is a thin pass-through).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch

from factedge.edge.errors import ConfigError
from factedge.train.config import SCHEDULERS, AdamWSettings, OptimSettings, RunSettings

# (step done, total steps, metrics of that step) -> None; the CLI draws a progress bar from it
Progress = Callable[[int, int, dict[str, Any]], None]


@dataclass(frozen=True)
class Plan:
    """How many optimizer steps a run makes over `n_samples` with global batch `batch_size`."""

    n_samples: int
    batch_size: int
    steps_per_epoch: int
    total_steps: int

    @classmethod
    def make(cls, n_samples: int, optim: OptimSettings) -> "Plan":
        if n_samples <= 0:
            raise ConfigError("no training samples")
        if optim.batch_size <= 0 or optim.micro_batch_size <= 0:
            raise ConfigError("batch_size and micro_batch_size must be positive")
        batch = min(optim.batch_size, n_samples)
        per_epoch = math.ceil(n_samples / batch)
        total = optim.max_steps if optim.max_steps > 0 else max(1, math.ceil(optim.epochs * per_epoch))
        return cls(n_samples, batch, per_epoch, total)

    def epoch(self, step: int) -> float:
        return step / self.steps_per_epoch

    def batch(self, step: int, seed: int) -> list[int]:
        """Sample indices of global batch `step` (0-based)."""
        epoch, k = divmod(step, self.steps_per_epoch)
        gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = torch.randperm(self.n_samples, generator=gen).tolist()
        return order[k * self.batch_size:(k + 1) * self.batch_size]


def shard(indices: Sequence[int], rank: int, world: int) -> list[int]:
    return list(indices[rank::world])


def micro_batches(indices: Sequence[int], size: int) -> list[list[int]]:
    return [list(indices[i:i + size]) for i in range(0, len(indices), size)]


def make_optimizer(params: Iterable[torch.nn.Parameter], optim: AdamWSettings) -> torch.optim.AdamW:
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ConfigError("nothing to train: no parameter requires a gradient")
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps)


def make_scheduler(optimizer: torch.optim.Optimizer, optim: AdamWSettings, total_steps: int, warmup_steps: int):
    """The one schedule maker: transformers' schedules (SCHEDULERS) over `total_steps` optimizer steps.
    Offline stages pass warmup = ceil(warmup_ratio * steps) (`offline_warmup`), the RL loop its steps."""
    from transformers import get_scheduler

    if optim.scheduler not in SCHEDULERS:
        raise ConfigError(f"unknown scheduler {optim.scheduler!r} ({', '.join(SCHEDULERS)})")
    return get_scheduler(optim.scheduler, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps)


def offline_warmup(optim: OptimSettings, total_steps: int) -> int:
    return math.ceil(optim.warmup_ratio * total_steps)


def make_accelerator(run: RunSettings):
    """An accelerate.Accelerator for this run (CPU when no GPU is visible).

    split_batches: every process takes its shard of the one global batch (`shard`), so the schedule
    must step once per optimizer step; by default accelerate steps it once per process (it assumes
    each process reads batches of its own), which on 2 processes ran the schedule twice as fast."""
    from accelerate import Accelerator, DataLoaderConfiguration

    if run.mixed_precision not in ("no", "bf16", "fp16"):
        raise ConfigError(f"mixed_precision must be no, bf16 or fp16, not {run.mixed_precision!r}")
    if run.num_threads > 0:
        torch.set_num_threads(run.num_threads)
    return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=run.mixed_precision,
                       dataloader_config=DataLoaderConfiguration(split_batches=True))


class Throughput:
    """Tokens and samples per second since the last `take()` (wall clock)."""

    def __init__(self) -> None:
        self.t0, self.tokens, self.samples = time.perf_counter(), 0, 0

    def add(self, tokens: int, samples: int) -> None:
        self.tokens += tokens
        self.samples += samples

    def take(self) -> dict[str, float]:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        out = {"tokens_per_s": self.tokens / dt, "samples_per_s": self.samples / dt}
        self.t0, self.tokens, self.samples = time.perf_counter(), 0, 0
        return out


# (micro-batch indices, global batch indices, step) -> (loss, summable stats such as {"tokens": n}); called
# under autocast, backward done by fit(). Scale the loss so that, summed over a process's micro-batches
# and averaged over processes (DDP averages gradients), it is the global batch's objective.
LossFn = Callable[[list[int], list[int], int], "tuple[torch.Tensor, dict[str, float]]"]


@dataclass
class Fit:
    """Everything `fit` drives: the prepared (accelerate) model/optimizer/scheduler and the run."""

    accel: Any
    run: Any  # RunDir
    model: torch.nn.Module  # as returned by accel.prepare
    optimizer: torch.optim.Optimizer
    scheduler: Any
    plan: Plan
    optim: OptimSettings
    settings: RunSettings
    trainables: dict[str, torch.Tensor] | None = None  # what checkpoints hold (default: requires_grad params)

    @property
    def raw(self) -> torch.nn.Module:
        return self.accel.unwrap_model(self.model)


def fit(f: Fit, start: int, loss_fn: LossFn, *, progress: Progress | None = None,
        evaluate: Callable[[], dict[str, Any]] | None = None, eval_every: int = 0) -> dict[str, Any]:
    """Optimizer steps `start`..plan.total_steps: micro-batches with gradient accumulation (no DDP
    sync until the last), grad-norm clip, schedule, metrics.jsonl, progress, checkpoints, evals.
    Returns the last step's metrics."""
    accel, plan = f.accel, f.plan
    rank, world = accel.process_index, accel.num_processes
    params = [p for p in f.model.parameters() if p.requires_grad]
    meter = Throughput()
    metrics: dict[str, Any] = {}
    f.model.train()
    for step in range(start, plan.total_steps):
        batch = plan.batch(step, f.settings.seed)
        mine = micro_batches(shard(batch, rank, world), f.optim.micro_batch_size)
        total = torch.zeros((), device=accel.device)
        stats: dict[str, float] = {}
        for n, micro in enumerate(mine):
            sync = n == len(mine) - 1
            with (contextlib.nullcontext() if sync else accel.no_sync(f.model)), accel.autocast():
                loss, part = loss_fn(micro, batch, step)
                accel.backward(loss)
            total += loss.detach()
            for k, v in part.items():
                stats[k] = stats.get(k, 0.0) + float(v)
        grad_norm = accel.clip_grad_norm_(params, f.optim.max_grad_norm) if f.optim.max_grad_norm > 0 else None
        lr = f.scheduler.get_last_lr()[0]
        f.optimizer.step()
        f.scheduler.step()
        f.optimizer.zero_grad(set_to_none=True)
        done = step + 1
        loss_value = float(accel.reduce(total, reduction="mean")) if world > 1 else float(total)
        meter.add(int(stats.get("tokens", 0)) * world, len(batch))
        metrics = {"loss": loss_value, "lr": lr, "epoch": plan.epoch(done),
                   "grad_norm": None if grad_norm is None else float(grad_norm), "processes": world}
        metrics.update({k: v for k, v in stats.items() if k != "tokens"})
        if evaluate is not None and ((eval_every > 0 and done % eval_every == 0) or done == plan.total_steps):
            metrics.update(evaluate())
            f.model.train()
        if done % max(f.settings.log_every, 1) == 0 or done == plan.total_steps:
            metrics.update(meter.take())
            f.run.log(done, metrics)
        if (f.settings.save_every > 0 and done % f.settings.save_every == 0) or done == plan.total_steps:
            accel.wait_for_everyone()
            f.run.save_checkpoint(done, f.raw, f.optimizer, f.scheduler, {"epoch": plan.epoch(done)}, f.trainables)
        if progress is not None:
            progress(done, plan.total_steps, metrics)
    accel.wait_for_everyone()
    return metrics


def prepare_fit(accel, run, model: torch.nn.Module, optim: OptimSettings, settings: RunSettings, n_samples: int,
                cfg_to_record: Any, trainables: dict[str, torch.nn.Parameter] | None = None,
                params: Iterable[torch.nn.Parameter] | None = None) -> tuple[Fit, int]:
    """Plan, optimizer, schedule; resume from the newest checkpoint (or record the config); prepare
    with accelerate. Returns (Fit, first step to run)."""
    plan = Plan.make(n_samples, optim)
    optimizer = make_optimizer(params if params is not None else model.parameters(), optim)
    scheduler = make_scheduler(optimizer, optim, plan.total_steps, offline_warmup(optim, plan.total_steps))
    start = 0
    latest = run.latest_checkpoint() if settings.resume else None
    if latest is not None:
        start = run.load_checkpoint(latest, model, optimizer, scheduler, trainables=trainables).step
    else:
        run.write_config(cfg_to_record)
    prepared, optimizer, scheduler = accel.prepare(model, optimizer, scheduler)
    return Fit(accel, run, prepared, optimizer, scheduler, plan, optim, settings, trainables), start
