"""Config dataclasses: the paper's defaults, YAML/TOML loading, typed --key value overrides."""

from __future__ import annotations

import pytest

from factedge.edge.errors import ConfigError, CorruptFileError
from factedge.train.config import LORA_TARGETS, SFTConfig, load_config, parse_overrides
from factedge.train.rm.config import RMConfig


def test_defaults_are_the_papers():
    sft, rm = SFTConfig(), RMConfig()
    assert (sft.optim.lr, sft.optim.epochs, sft.optim.batch_size, sft.optim.warmup_ratio) == (2e-5, 3.0, 128, 0.03)
    assert sft.optim.scheduler == "cosine" and sft.max_length == 1280 and sft.mode == "full"
    assert (sft.lora.r, sft.lora.alpha, sft.lora.dropout) == (64, 16, 0.0)
    assert sft.lora.targets == LORA_TARGETS == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                "down_proj"]
    assert (rm.optim.lr, rm.optim.scheduler, rm.optim.epochs, rm.optim.batch_size) == (2e-5, "constant_with_warmup",
                                                                                     1.0, 32)
    assert (rm.centering_coef, rm.eval_size, rm.use_facts) == (1e-3, 500, True)
    sft.lora.targets.append("x")  # default lists are per instance
    assert SFTConfig().lora.targets == LORA_TARGETS


def test_yaml_then_typed_overrides(tmp_path):
    path = tmp_path / "sft.yaml"
    path.write_text("data: a.json\nmode: lora\nmodel:\n  base: /m\noptim:\n  lr: 1.0e-4\n  batch_size: 16\n")
    cfg = load_config(SFTConfig, path, ["--optim.lr", "3e-5", "--lora.targets", "q_proj,v_proj", "--run.resume=false",
                                        "--train-projector", "none", "--optim.max_steps", "7", "--model.dtype=bfloat16"])
    assert cfg.data == "a.json" and cfg.mode == "lora" and cfg.model.base == "/m"
    assert cfg.optim.lr == 3e-5 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.batch_size == 16 and cfg.optim.micro_batch_size == 4  # partial mapping keeps defaults
    assert cfg.lora.targets == ["q_proj", "v_proj"] and cfg.lora.r == 64
    assert cfg.run.resume is False and cfg.train_projector is None and cfg.optim.max_steps == 7
    assert cfg.model.dtype == "bfloat16" and cfg.model.attn_implementation == "sdpa"


def test_toml_and_json_list(tmp_path):
    path = tmp_path / "rm.toml"
    path.write_text('data = "p.json"\nuse_facts = false\n[lora]\nr = 8\n[optim]\nbetas = [0.9, 0.95]\n')
    cfg = load_config(RMConfig, path, ["--lora.targets", '["q_proj"]'])
    assert (cfg.data, cfg.use_facts, cfg.lora.r, cfg.optim.betas) == ("p.json", False, 8, [0.9, 0.95])
    assert cfg.lora.targets == ["q_proj"] and cfg.optim.scheduler == "constant_with_warmup"


@pytest.mark.parametrize("overrides, message", [
    (["--nope", "1"], "unknown config key 'nope'"),
    (["--optim.nope", "1"], "unknown config key 'optim.nope'"),
    (["--optim.batch_size", "1.5"], "optim.batch_size: '1.5' is not a valid int"),
    (["--run.resume", "maybe"], "run.resume: 'maybe' is not a valid bool"),
    (["--optim.lr"], "--optim.lr needs a value"),
    (["lr", "1"], "expected --key value"),
    (["--train_projector", "maybe"], "train_projector: 'maybe' is not a valid bool"),
    (["--data.x", "1"], "data: expected a value, not a group"),
    (["--optim", "1"], "optim: expected a mapping"),
])
def test_bad_overrides(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_config(SFTConfig, None, overrides)


def test_bad_files(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1,\n")
    with pytest.raises(CorruptFileError, match="cannot parse config"):
        load_config(SFTConfig, bad)
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n")
    with pytest.raises(CorruptFileError, match="mapping"):
        load_config(SFTConfig, listed)
    with pytest.raises(ConfigError, match=".ini"):
        (tmp_path / "c.ini").write_text("x")
        load_config(SFTConfig, tmp_path / "c.ini")
    assert parse_overrides(["--a-b=1", "--c", "x y"]) == {"a_b": "1", "c": "x y"}
