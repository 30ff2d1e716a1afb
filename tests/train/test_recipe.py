"""The whole recipe at the micro preset: a LLaVA-RLHF folder that convert's loader detects, with a
relative vision tower (so it survives a move), metrics per stage, and a content-hash cache hit."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch

from factedge.convert.layouts import load_checkpoint
from factedge.train.recipe import RecipeConfig, recipe_key, recipe_preset, run_recipe


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    torch.set_num_threads(1)
    cache = tmp_path_factory.mktemp("recipe")
    cfg = recipe_preset("micro")
    cfg.plain_rm = True
    return cfg, cache, run_recipe(cfg, cache)


def test_layout_is_llava_rlhf_and_moves(micro, tmp_path):
    cfg, _, res = micro
    root = res.root
    names = sorted(p.name for p in root.iterdir())
    assert {"sft_model", "rlhf_lora_adapter_model", "rm_lora_adapter_model"} <= set(names)
    assert (root / "rm_lora_adapter_model" / "reward_head.safetensors").is_file()
    tower = json.loads((root / "sft_model" / "config.json").read_text())["mm_vision_tower"]
    assert tower.startswith("../") and (root / "sft_model" / tower / "config.json").is_file()
    moved = tmp_path / "elsewhere"
    shutil.copytree(root, moved)
    ckpt = load_checkpoint(moved)
    assert ckpt.layout == "llava-rlhf"
    assert ckpt.vision.image_size == cfg.base.vision.image_size == 112
    assert ckpt.text.hidden_size == cfg.base.text.hidden_size


def test_metrics_present(micro):
    _, _, res = micro
    m = res.metrics
    assert set(m["timings"]) >= {"world", "base", "sft", "rm", "rm_plain", "ppo"}
    assert m["sft"]["samples"] == 2 * 8 and m["sft"]["samples_per_s"] > 0
    assert 0.0 <= m["rm"]["eval_accuracy"] <= 1.0 and 0.0 <= m["rm_plain"]["eval_accuracy"] <= 1.0
    assert len(m["ppo"]["steps"]) == 1 and "kl" in json.dumps(m["ppo"]["steps"][0])
    assert res.world.heldout.n_images == 4 and res.plain_rm is not None and not res.cached


def test_cache_hit_and_key(micro):
    cfg, cache, res = micro
    t0 = time.perf_counter()
    again = run_recipe(cfg, cache)
    assert time.perf_counter() - t0 < 2.0
    assert again.cached and again.root == res.root and again.metrics == json.loads(json.dumps(res.metrics))
    other = recipe_preset("micro")
    other.plain_rm = True
    assert recipe_key(other) == recipe_key(cfg)
    other.ppo.max_steps = 2
    assert recipe_key(other) != recipe_key(cfg)
    assert isinstance(RecipeConfig().to_dict()["world"], dict)
