"""Resuming a run never executes code from the run folder, and restores the RNG and scheduler exactly."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch
from torch import nn

from factedge.edge.errors import CorruptFileError, UnsafePickleError
from factedge.train.run_dir import RunDir, seed_everything

MARKER = "factedge-test-payload-ran"


class _Payload:
    """Unpickling this creates MARKER in the working folder: a code-execution canary."""

    def __reduce__(self):
        return (os.mkdir, (MARKER,))


def _run(tmp_path):
    seed_everything(3)
    model = nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    from transformers import get_scheduler

    sched = get_scheduler("cosine", opt, num_warmup_steps=2, num_training_steps=10)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    sched.step()
    run = RunDir(tmp_path / "run")
    return run, model, opt, sched, run.save_checkpoint(1, model, opt, sched)


def test_rng_and_scheduler_round_trip_without_pickles(tmp_path):
    run, model, opt, sched, ckpt = _run(tmp_path)
    assert sorted(p.name for p in ckpt.iterdir()) == ["optimizer.pt", "rng.json", "rng.safetensors", "scheduler.json",
                                                      "state.json", "trainable.safetensors"]
    want = (random.random(), np.random.rand(), torch.rand(1).item())
    lr = sched.get_last_lr()
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    sched.step()
    run.load_checkpoint(ckpt, model, opt, sched)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == want
    assert sched.get_last_lr() == lr


@pytest.mark.parametrize("name", ["optimizer.pt", "scheduler.json", "rng.json", "rng.safetensors", "state.json"])
def test_a_planted_pickle_payload_is_refused_not_run(tmp_path, monkeypatch, name):
    run, model, opt, sched, ckpt = _run(tmp_path)
    monkeypatch.chdir(tmp_path)
    torch.save({"state": _Payload()}, ckpt / name)
    with pytest.raises((UnsafePickleError, CorruptFileError, Exception)) as info:
        run.load_checkpoint(ckpt, model, opt, sched)
    assert not (tmp_path / MARKER).exists(), f"{name}: the pickle ran"
    assert isinstance(info.value, (UnsafePickleError, CorruptFileError)), repr(info.value)
    assert str(ckpt) in str(info.value)
