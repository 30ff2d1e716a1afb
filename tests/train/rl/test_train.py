"""PPO / GRPO / RLOO on the small base: what trains, what stays frozen, logs, output, resume, determinism.

One session fixture builds the inputs an RL run needs: the small base (base_model.small_spec), a
4-image shapes world, an "RL-init" policy LoRA and a reward model (LoRA + head) with random non-zero
weights (a fresh LoRA has B = 0, which gives its A no gradient; a trained one does not).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from factedge.train.base.base_model import cached_base, small_spec
from factedge.train.config import LoraSettings, load_config
from factedge.train.lora import add_lora, lora_parameters, save_lora
from factedge.train.model import load_for_training
from factedge.train.rm.model import RewardModel
from factedge.train.world.export import write_world


@dataclass(frozen=True)
class RLInputs:
    base: Path
    world: Path
    policy: Path
    rm: Path


@pytest.fixture(scope="module")
def rl_inputs(tmp_path_factory) -> RLInputs:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("rl")
    base = cached_base(small_spec())
    write_world(root / "world", 4, seed=0)
    model = load_for_training(base)
    gen = torch.Generator().manual_seed(1)
    lora = LoraSettings(r=4, alpha=8)
    add_lora(model, lora, name="init")
    for p in lora_parameters(model, "init").values():
        p.data = torch.randn(p.shape, generator=gen) * 0.05
    save_lora(model, root / "policy", name="init")
    rm = RewardModel.create(model, lora, adapter="rm")
    for p in lora_parameters(model, "rm").values():
        p.data = torch.randn(p.shape, generator=gen) * 0.05
    rm.head.weight.data = torch.randn(rm.head.weight.shape, generator=gen) * 0.1
    rm.save(root / "rm")
    return RLInputs(base, root / "world", root / "policy", root / "rm")


def make_cfg(cls, fx: RLInputs, out: Path, *extra: str):
    args = ["--model.base", str(fx.base), "--policy_adapter", str(fx.policy), "--reward.adapter", str(fx.rm),
            "--reward.facts", str(fx.world / "image_to_caption.json"), "--data", str(fx.world / "ppo_prompts.json"),
            "--rollout.max_new_tokens", "12", "--rollout.batch_size", "4", "--rollout.micro_batch_size", "4",
            "--step_batch_size", "2", "--step_micro_batch_size", "1", "--ppo_epochs", "1", "--max_steps", "2",
            "--optim.warmup_steps", "0", "--optim.lr", "1e-3", "--run.out", str(out), "--run.save_every", "1"]
    return load_config(cls, None, args + list(extra))


def snapshot(named) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in named}


# ---------------------------------------------------------------- one PPO update, parameter by parameter
def test_ppo_update_trains_exactly_the_trainables(rl_inputs, tmp_path):
    from factedge.train.rl.actor_critic import ActorCritic
    from factedge.train.rl.ppo import PPO
    from factedge.train.rl.config import PPOConfig
    from factedge.train.rl.loop import load_items
    from factedge.train.loop import make_optimizer
    from factedge.train.rl.rollout import collect

    cfg = make_cfg(PPOConfig, rl_inputs, tmp_path)
    torch.manual_seed(0)
    ac = ActorCritic.build(cfg, value=True)
    items = load_items(ac, cfg)[:4]
    named = [*ac.model.named_parameters(), *(("reward_head." + n, p) for n, p in ac.reward.head.named_parameters()),
             *(("value_head." + n, p) for n, p in ac.value_head.named_parameters())]
    trainable_ids = {id(p) for p in ac.trainables().values()}
    trainable_names = {n for n, p in named if id(p) in trainable_ids}
    assert len(trainable_names) == len(trainable_ids)
    assert any(".policy." in n for n in trainable_names) and any(".value." in n for n in trainable_names)
    assert {"value_head.weight", "value_head.bias"} <= trainable_names
    assert float(ac.value_head.weight.detach().abs().sum()) == 0.0  # zero-initialised head
    before = snapshot(named)

    ro = collect(ac, items, cfg, with_values=True, step=0)
    assert torch.equal(ro.logprobs, ro.ref_logprobs)  # policy == reference at the start
    assert float(ro.kl.abs().sum()) == 0.0 and float(ro.values.abs().sum()) == 0.0
    optimizer = make_optimizer(ac.trainables().values(), cfg.optim)
    stats = PPO(cfg).update(ac, ro, optimizer)
    assert stats["optimizer_steps"] == 2  # 4 samples / step batch 2 (the value LoRA moves in the 2nd)

    after = snapshot(named)
    unchanged = [n for n in trainable_names if torch.equal(before[n], after[n])]
    assert not unchanged, f"trainables that did not move: {unchanged[:5]}"
    moved = [n for n in before if n not in trainable_names and not torch.equal(before[n], after[n])]
    assert not moved, f"frozen parameters that moved: {moved[:5]}"
    kinds = {"reference": ".reference.", "reward": ".reward.", "vision": "vision.", "projector": "projector."}
    for kind, key in kinds.items():
        assert any(key in n for n in before if n not in trainable_names), kind  # each frozen kind was checked


# ---------------------------------------------------------------- whole runs
def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_train_ppo_logs_output_resume_and_determinism(rl_inputs, tmp_path, interrupt):
    from factedge.convert.layouts import load_checkpoint
    from factedge.train.rl.ppo import train_ppo
    from factedge.train.rl.config import PPOConfig

    straight = train_ppo(make_cfg(PPOConfig, rl_inputs, tmp_path / "a"))
    assert straight.step == 2
    rows = _read_jsonl(straight.run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("reward", "rm_score", "kl_sum_seq", "policy_loss", "value_loss", "approx_kl", "clip_frac",
                "grad_norm", "lr", "rollout_tokens_per_s", "samples_per_s"):
        assert key in rows[-1], key
    assert rows[0]["lr"] == pytest.approx(1e-3) and rows[1]["lr"] == pytest.approx(5e-4)  # cosine over 2 steps

    log = _read_jsonl(straight.run_dir / "rollouts" / "step-1.jsonl")
    assert len(log) == 4
    for line in log:
        parts = line["reward"]
        assert parts["total"] == pytest.approx(parts["rm_score"] + parts["stop_penalty"] + parts["length"]
                                               + parts["correctness"], abs=1e-5)
        assert parts["stop_penalty"] == (0.0 if line["has_eos"] else -8.0)
        assert parts["length"] == pytest.approx(-10.0 * line["tokens"] / 12, abs=1e-5)  # m = 1 in this world
        assert line["kl"] == 0.0  # the first rollout: policy == reference
        assert line["prompt"].startswith("<image>") and isinstance(line["response"], str)
    assert any(line["kl"] > 0 for line in _read_jsonl(straight.run_dir / "rollouts" / "step-2.jsonl"))

    # the output is a LLaVA-RLHF folder that convert reads, holding the trained policy
    ckpt = load_checkpoint(straight.output)
    assert ckpt.layout == "llava-rlhf" and ckpt.adapter_dir.name == "rlhf_lora_adapter_model"
    adapter = load_file(str(straight.output / "rlhf_lora_adapter_model" / "adapter_model.safetensors"))
    trained = load_file(str(straight.run_dir / "checkpoints" / "step-2" / "trainable.safetensors"))
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    assert torch.equal(adapter[key], trained[key.replace("lora_B.weight", "lora_B.policy.weight")])
    initial = load_file(str(rl_inputs.policy / "adapter_model.safetensors"))
    assert not torch.equal(adapter[key], initial[key])

    # interrupted after step 1, resumed: the same rollouts and the same adapter, bit for bit
    cfg_b = make_cfg(PPOConfig, rl_inputs, tmp_path / "b")
    interrupt(train_ppo, cfg_b, after=1)
    resumed = train_ppo(cfg_b)
    assert (resumed.run_dir / "rollouts" / "step-2.jsonl").read_text() == \
        (straight.run_dir / "rollouts" / "step-2.jsonl").read_text()
    again = load_file(str(resumed.output / "rlhf_lora_adapter_model" / "adapter_model.safetensors"))
    assert adapter.keys() == again.keys() and all(torch.equal(adapter[k], again[k]) for k in adapter)
    assert [r["step"] for r in _read_jsonl(resumed.run_dir / "metrics.jsonl")] == [1, 2]


@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
def test_group_rl_trains_the_policy(rl_inputs, tmp_path, estimator):
    from factedge.train.rl.group_rl import train_group_rl
    from factedge.train.rl.config import GroupRLConfig

    cfg = make_cfg(GroupRLConfig, rl_inputs, tmp_path, "--estimator", estimator, "--group_size", "2",
                   "--max_steps", "1", "--step_batch_size", "4", "--step_micro_batch_size", "2")
    res = train_group_rl(cfg)
    log = _read_jsonl(res.run_dir / "rollouts" / "step-1.jsonl")
    ids = [line["id"] for line in log]
    assert ids[0] == ids[1] and ids[2] == ids[3] and ids[0] != ids[2]  # 2 prompts × 2 samples, grouped
    row = _read_jsonl(res.run_dir / "metrics.jsonl")[-1]
    assert row["optimizer_steps"] == 1 and "group_reward_std" in row
    adapter = load_file(str(res.output / "rlhf_lora_adapter_model" / "adapter_model.safetensors"))
    initial = load_file(str(rl_inputs.policy / "adapter_model.safetensors"))
    assert adapter.keys() == initial.keys()
    assert sum(not torch.equal(adapter[k], initial[k]) for k in adapter) == len(adapter)
    saved = load_file(str(res.run_dir / "checkpoints" / "step-1" / "trainable.safetensors"))
    assert saved and all(".policy." in k for k in saved)  # no value model in group methods


def test_ppo_with_the_oracle_reward_trains_on_the_judges_scores(rl_inputs, tmp_path):
    """reward.source oracle: the rollout's RM-score term is the judge's rating of the response against
    the true scene, minus 3 (train.rl.oracle); the run trains and logs it like any PPO run."""
    from factedge.train.rl.config import PPOConfig
    from factedge.train.rl.ppo import train_ppo
    from factedge.train.world.export import read_scenes
    from factedge.train.world.judge import judge

    cfg = make_cfg(PPOConfig, rl_inputs, tmp_path / "run", "--reward.source", "oracle",
                   "--reward.scenes", str(rl_inputs.world / "scenes.json"), "--max_steps", "1")
    result = train_ppo(cfg)
    scenes = read_scenes(rl_inputs.world / "scenes.json")
    rows = [json.loads(line) for line in (result.run_dir / "rollouts" / "step-1.jsonl").read_text().splitlines()]
    assert len(rows) == 4
    for row in rows:
        scene = scenes[Path(row["image"]).name]
        want = judge(scene, row["response"], row["prompt"].replace("<image>", "").strip()).score - 3.0
        assert row["reward"]["rm_score"] == pytest.approx(want)
    assert (result.output / "rlhf_lora_adapter_model" / "adapter_model.safetensors").is_file()
