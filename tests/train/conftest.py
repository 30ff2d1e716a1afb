"""Fixtures shared by the train tests: a small trainable base and a small synthetic world.

`small_base`: `base_model.small_spec()` (real 32000 vocab, LLaMA hidden 64 x 2 layers, ViT 64 px /
patch 16 = 16 image tokens) built once and cached on disk like the tiny checkpoints.
`small_world`: 12 train images (+ held-out) of the shapes world at 64 px, written once per session.
`fresh_model()`: a new LlavaForTraining on the small base (tests that train must not share one).
`interrupt(trainer, cfg, after)`: run a trainer and kill it (by its progress callback) once step
`after` is done, as a crash would; the resume tests then run it again.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def small_base() -> Path:
    from factedge.train.base.base_model import cached_base, small_spec

    return cached_base(small_spec())


@pytest.fixture(scope="session")
def small_world(tmp_path_factory):
    from factedge.train.world.export import write_world
    from factedge.train.world.scene import WorldConfig

    return write_world(tmp_path_factory.mktemp("world"), 12, seed=0, cfg=WorldConfig(image_size=64))


@pytest.fixture
def fresh_model(small_base):
    from factedge.train.model import load_for_training

    def make(**kwargs):
        torch.manual_seed(0)
        return load_for_training(small_base, **kwargs)

    return make


class _Interrupted(Exception):
    pass


@pytest.fixture
def interrupt():
    def run(trainer, cfg, after: int) -> None:
        def progress(done, total, metrics):
            if done == after:
                raise _Interrupted

        with pytest.raises(_Interrupted):
            trainer(cfg, progress=progress)

    return run
