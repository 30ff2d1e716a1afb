"""`factedge train`: config file + overrides reach the trainer; errors are one line with a code."""

from __future__ import annotations

import json

from factedge.edge.cli import run
from factedge.train.run_dir import iter_metrics
from factedge.train.train_cli import describe


def test_print_config_applies_file_and_overrides(tmp_path, capsys):
    cfg = tmp_path / "rm.yaml"
    cfg.write_text("use_facts: false\noptim:\n  lr: 1.0e-4\n")
    assert run(["train", "rm", "--config", str(cfg), "--print-config", "--lora.r", "8"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["use_facts"] is False and shown["optim"]["lr"] == 1e-4 and shown["lora"]["r"] == 8
    assert shown["optim"]["batch_size"] == 32


def test_bad_key_is_one_line(capsys):
    assert run(["train", "sft", "--nope", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("factedge: error: unknown config key 'nope'") and "\n" not in err


def test_sft_through_the_cli(small_base, small_world, tmp_path, capsys):
    cfg = tmp_path / "sft.toml"
    cfg.write_text(f'data = "{small_world.sft}"\nsave_dtype = "float32"\n[model]\nbase = "{small_base}"\n'
                   '[optim]\nbatch_size = 2\nmicro_batch_size = 2\nmax_steps = 1\n')
    assert run(["train", "sft", "--config", str(cfg), "--run.out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert f"output:     {tmp_path / 'run' / 'sft_model'}" in out and "last step 1: loss " in out
    assert [r["step"] for r in iter_metrics(tmp_path / "run")] == [1]
    assert describe({"loss": 1.23456, "eval_accuracy": 0.5, "tokens_per_s": 99.6, "other": 3}) == \
        "loss 1.2346  eval acc 0.500  tok/s 100"
