"""Training on two processes (`accelerate launch --multi_gpu --num_processes 2`: torchrun, gloo on CPU;
`--cpu --num_processes 2` starts ONE process unless MPI is set up): SFT and the reward
model give the one-process losses and weights for the same global batch, write their run folder once,
and resume; the RL stages refuse to run on several processes instead of writing one folder twice.

Each process takes its shard of every global batch (train/loop.py) and DDP averages the gradients,
so the only difference from one process is the order of float sums: a tolerance of 1e-5 relative.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

ACCELERATE = Path(sys.executable).with_name("accelerate")
FACTEDGE = Path(sys.executable).with_name("factedge")
pytestmark = pytest.mark.skipif(not (ACCELERATE.is_file() and FACTEDGE.is_file()),
                                reason="accelerate and the factedge script must be installed in this environment")


def _run(stage: str, args: list[str], processes: int) -> subprocess.CompletedProcess:
    cmd = [str(FACTEDGE), "train", stage, *args, "--run.num_threads", "1"]
    if processes > 1:
        cmd = [str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
               "--main_process_port", str(29500 + os.getpid() % 1000), "--mixed_precision", "no",
               "--dynamo_backend", "no", *cmd]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}  # CPU processes even on a GPU box
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


def _ok(stage: str, args: list[str], processes: int) -> list[dict]:
    done = _run(stage, args, processes)
    assert done.returncode == 0, done.stderr[-2000:]
    out = Path(args[args.index("--run.out") + 1])
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _close(a: list[dict], b: list[dict], key: str = "loss") -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b):
        assert x[key] == pytest.approx(y[key], rel=1e-5), (x["step"], x[key], y[key])


def _weights(folder: Path) -> dict:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _sft_args(small_base, small_world, out: Path, steps: int, *extra: str) -> list[str]:
    return ["--model.base", str(small_base), "--data", str(small_world.sft), "--run.out", str(out),
            "--optim.batch_size", "4", "--optim.micro_batch_size", "1", "--optim.lr", "1e-3",
            "--optim.warmup_ratio", "0", "--optim.max_steps", str(steps), "--save_dtype", "float32", *extra]


def test_sft_two_processes_match_one(small_base, small_world, tmp_path):
    one = _ok("sft", _sft_args(small_base, small_world, tmp_path / "one", 3, "--run.save_every", "2"), 1)
    two = _ok("sft", _sft_args(small_base, small_world, tmp_path / "two", 3, "--run.save_every", "2"), 2)
    assert [r["processes"] for r in one] == [1] * 3 and [r["processes"] for r in two] == [2] * 3
    _close(one, two)
    assert one[-1]["loss"] < one[0]["loss"]  # it trained
    a, b = _weights(tmp_path / "one" / "sft_model"), _weights(tmp_path / "two" / "sft_model")
    assert sorted(a) == sorted(b)
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < 1e-5
    # written once: the same checkpoint folders, no leftovers of a second writer
    names = lambda run: sorted(p.name for p in (run / "checkpoints").iterdir())  # noqa: E731
    assert names(tmp_path / "one") == names(tmp_path / "two") and len(names(tmp_path / "two")) == 2
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())


def test_sft_two_processes_resume(small_base, small_world, tmp_path):
    """2 steps on two processes, then the same run folder continued to 4: the one-process 4-step run."""
    const = ("--optim.scheduler", "constant", "--run.save_every", "1")
    straight = _ok("sft", _sft_args(small_base, small_world, tmp_path / "straight", 4, *const), 1)
    _ok("sft", _sft_args(small_base, small_world, tmp_path / "resumed", 2, *const), 2)
    resumed = _ok("sft", _sft_args(small_base, small_world, tmp_path / "resumed", 4, *const), 2)
    _close(straight, resumed)


def test_reward_model_two_processes_match_one(small_base, small_world, tmp_path):
    def args(out):
        return ["--model.base", str(small_base), "--data", str(small_world.preference), "--facts",
                str(small_world.captions), "--run.out", str(out), "--lora.r", "4", "--eval_size", "0",
                "--optim.batch_size", "4", "--optim.micro_batch_size", "1", "--optim.max_steps", "2",
                "--optim.lr", "1e-3", "--optim.warmup_ratio", "0"]

    _close(_ok("rm", args(tmp_path / "one"), 1), _ok("rm", args(tmp_path / "two"), 2))


def test_rl_stages_refuse_several_processes(small_base, small_world, tmp_path):
    out = tmp_path / "ppo"
    done = _run("ppo", ["--model.base", str(small_base), "--data", str(small_world.ppo_prompts),
                        "--reward.source", "oracle", "--reward.scenes", str(small_world.scenes),
                        "--run.out", str(out)], 2)
    assert done.returncode != 0 and "one process" in done.stderr
    assert not out.exists()
