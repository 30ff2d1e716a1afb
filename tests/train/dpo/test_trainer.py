"""`train dpo` on the small base: what trains, the output layout, that it learns the pairs, resume,
mDPO's image pairs, and the on-policy variant ranking with the oracle."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from factedge.edge.errors import ConfigError
from factedge.train.config import load_config
from factedge.train.dpo.config import DPOConfig
from factedge.train.dpo.trainer import train_dpo

ADAPTER = Path("rlhf_model") / "rlhf_lora_adapter_model" / "adapter_model.safetensors"


def cfg_for(base: Path, world, out: Path, *extra: str) -> DPOConfig:
    args = ["--model.base", str(base), "--preference", str(world.preference), "--lora.r", "4", "--lora.alpha", "8",
            "--step_batch_size", "4", "--step_micro_batch_size", "2", "--max_steps", "2", "--optim.lr", "1e-2",
            "--optim.warmup_steps", "0", "--beta", "0.5", "--run.out", str(out), "--run.save_every", "1",
            "--run.seed", "3"]
    return load_config(DPOConfig, None, args + list(extra))


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_offline_dpo_output_learning_and_resume(small_base, small_world, tmp_path, interrupt):
    from factedge.convert.layouts import load_checkpoint

    torch.set_num_threads(1)
    straight = train_dpo(cfg_for(small_base, small_world, tmp_path / "a"))
    assert straight.step == 2
    ckpt = load_checkpoint(straight.output)
    assert ckpt.layout == "llava-rlhf" and (straight.output / "sft_model").resolve() == small_base.resolve()
    adapter = load_file(str(straight.run_dir / ADAPTER))
    assert any(float(v.abs().sum()) > 0 for k, v in adapter.items() if "lora_B" in k)  # the fresh B = 0 moved
    first = rows(straight.run_dir)[0]
    assert first["dpo_loss"] == pytest.approx(0.693147, abs=1e-4)  # policy == reference at step 1
    for key in ("loss", "accuracy", "margin", "chosen_reward", "rejected_reward", "grad_norm", "lr", "epoch"):
        assert key in first, key

    # interrupted after step 1, resumed: the same adapter bit for bit
    cfg_b = cfg_for(small_base, small_world, tmp_path / "b")
    interrupt(train_dpo, cfg_b, after=1)
    resumed = train_dpo(cfg_b)
    again = load_file(str(resumed.run_dir / ADAPTER))
    assert adapter.keys() == again.keys() and all(torch.equal(adapter[k], again[k]) for k in adapter)
    assert [r["step"] for r in rows(resumed.run_dir)] == [1, 2]


def test_offline_dpo_learns_its_pairs(small_base, small_world, tmp_path):
    """Many steps over the same few pairs: the implicit reward ranks every training pair right."""
    torch.set_num_threads(1)
    res = train_dpo(cfg_for(small_base, small_world, tmp_path / "run", "--max_steps", "12", "--run.save_every", "0",
                            "--optim.scheduler", "constant", "--step_batch_size", "8", "--step_micro_batch_size", "8"))
    log = rows(res.run_dir)
    assert log[-1]["dpo_loss"] < 0.35 < log[0]["dpo_loss"]
    assert log[-1]["accuracy"] == 1.0 and log[-1]["margin"] > 1.0


def test_image_pairs_and_anchor(small_base, small_world, tmp_path):
    res = train_dpo(cfg_for(small_base, small_world, tmp_path / "run", "--image_pairs", "true", "--anchor_weight",
                            "1.0", "--nll_weight", "0.1", "--max_steps", "1"))
    row = rows(res.run_dir)[-1]
    assert "image_accuracy" in row and "image_margin" in row and row["loss"] > row["dpo_loss"]


def test_on_policy_dpo_ranks_samples_with_the_oracle(small_base, small_world, tmp_path, monkeypatch):
    """A random small model's answers all score alike; the judge's scores are replaced by distinct
    ones (the oracle itself is tested with PPO) so every group gives a pair to train on."""
    import factedge.train.rl.rollout as rollout

    monkeypatch.setattr(rollout, "oracle_scores", lambda items, texts, *scene_args: torch.arange(len(texts)).float())
    res = train_dpo(cfg_for(small_base, small_world, tmp_path / "run", "--pairs", "on_policy", "--data",
                            str(small_world.ppo_prompts), "--reward.source", "oracle", "--reward.scenes",
                            str(small_world.scenes), "--samples_per_prompt", "4", "--rollout.batch_size", "8",
                            "--rollout.micro_batch_size", "8", "--rollout.max_new_tokens", "8", "--min_gap", "0.0",
                            "--max_steps", "1"))
    row = rows(res.run_dir)[-1]
    assert row["pairs"] == 2 and row["optimizer_steps"] == 1 and "rm_score" in row and "accuracy" in row
    log = [json.loads(x) for x in (res.run_dir / "rollouts" / "step-1.jsonl").read_text().splitlines()]
    assert len(log) == 8 and len({x["id"] for x in log}) == 2


def test_on_policy_reference_pairs_train_on_the_truth(small_base, small_world, tmp_path, monkeypatch):
    """chosen reference: every prompt with a reference gives a pair (truth ≻ worst sample) even though
    all samples score alike, and the chosen side is the reference turn as the SFT encoder writes it."""
    import factedge.train.dpo.trainer as trainer
    import factedge.train.rl.rollout as rollout
    from factedge.train.conversation import encode_reply
    from factedge.train.rl.data import load_prompts

    monkeypatch.setattr(rollout, "oracle_scores", lambda items, texts, *scene_args: torch.zeros(len(texts)))
    seen = []
    real = trainer.train_pairs
    monkeypatch.setattr(trainer, "train_pairs",
                        lambda ac, pairs, *a, **k: seen.extend(pairs) or real(ac, pairs, *a, **k))
    res = train_dpo(cfg_for(small_base, small_world, tmp_path / "run", "--pairs", "on_policy", "--data",
                            str(small_world.ppo_prompts), "--reward.source", "oracle", "--reward.scenes",
                            str(small_world.scenes), "--samples_per_prompt", "2", "--rollout.batch_size", "8",
                            "--rollout.micro_batch_size", "8", "--rollout.max_new_tokens", "4", "--chosen",
                            "reference", "--nll_weight", "0.5", "--max_steps", "1"))
    assert rows(res.run_dir)[-1]["pairs"] == 4 == len(seen)  # 8 samples, 4 prompts, all tied
    items = {it.id: it for it in load_prompts(small_world.ppo_prompts)}
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(small_base)
    for pair in seen:
        assert pair.chosen.reply == tuple(encode_reply(items[pair.id].reference, tok))
        assert len(pair.rejected.reply) <= 4 and pair.chosen.reply != pair.rejected.reply


def test_reference_pairs_without_references_are_refused_before_the_run(small_base, small_world, tmp_path):
    from factedge.edge.errors import InputError

    items = json.loads(Path(small_world.ppo_prompts).read_text())
    bare = Path(small_world.ppo_prompts).with_name("no_reference.json")  # beside its images
    bare.write_text(json.dumps([dict(it, conversations=it["conversations"][:1]) for it in items]))
    with pytest.raises(InputError, match="reference answers") as err:
        train_dpo(cfg_for(small_base, small_world, tmp_path / "run", "--pairs", "on_policy", "--data", str(bare),
                          "--chosen", "reference", "--reward.source", "oracle", "--reward.scenes",
                          str(small_world.scenes)))
    assert str(err.value).startswith(str(bare)) and not (tmp_path / "run").exists()
    bare.unlink()


def test_a_bad_pairs_file_leaves_no_run_folder(small_base, small_world, tmp_path):
    from factedge.edge.errors import InputError

    bad = tmp_path / "pairs.json"
    bad.write_text("[]")
    with pytest.raises(InputError, match="no items") as err:
        train_dpo(cfg_for(small_base, small_world, tmp_path / "run", "--preference", str(bad)))
    assert str(err.value).startswith(str(bad)) and not (tmp_path / "run").exists()


@pytest.mark.parametrize("args,message", [
    (("--pairs", "both"), "pairs must be one of"),
    (("--beta", "0"), "beta must be positive"),
    (("--preference", ""), "needs `preference`"),
    (("--pairs", "on_policy", "--samples_per_prompt", "1"), "samples_per_prompt >= 2"),
    (("--chosen", "truth"), "chosen must be one of"),
])
def test_bad_settings_are_refused(small_base, small_world, tmp_path, args, message):
    with pytest.raises(ConfigError, match=message):
        train_dpo(cfg_for(small_base, small_world, tmp_path / "run", *args))
    assert not (tmp_path / "run").exists()


def test_reference_table_computes_each_chunk_once(small_base, small_world, tmp_path, monkeypatch):
    """Offline DPO keeps the frozen reference's log-probs: a chunk is computed on first use, with the
    values a direct computation gives, and never again."""
    import factedge.train.dpo.loss as loss
    from factedge.train.dpo.pairs import load_preference_pairs
    from factedge.train.rl.actor_critic import REFERENCE, ActorCritic

    cfg = cfg_for(small_base, small_world, tmp_path / "run")
    ac = ActorCritic.build(cfg, value=False, reward=False)
    pairs = load_preference_pairs(small_world.preference, ac.model.tokenizer)
    assert len(pairs) >= 5
    table = loss.ReferenceTable(pairs, chunk=3)
    chosen, rejected = table.lookup(ac, [4, 0])
    with torch.no_grad():
        want_c, want_r, _ = loss.side_logprobs(ac, [pairs[4], pairs[0]], REFERENCE)
    assert torch.allclose(chosen, want_c, atol=1e-4) and torch.allclose(rejected, want_r, atol=1e-4)
    assert (chosen < 0).all() and table.done == {0, 1}

    def no_second_pass(*args):
        raise AssertionError("a stored chunk was computed again")

    monkeypatch.setattr(loss, "side_logprobs", no_second_pass)
    again_c, _ = table.lookup(ac, [1, 2, 5])
    assert torch.equal(again_c[1:2], table.chosen[2:3]) and torch.equal(table.lookup(ac, [4])[0], chosen[:1])
