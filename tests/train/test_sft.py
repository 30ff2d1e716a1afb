"""SFT: what trains (and what does not), bit-for-bit repeatable and resumable CPU runs, outputs in
the real layouts that load_checkpoint reads and `factedge convert` converts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from factedge.convert.layouts import load_checkpoint
from factedge.train.config import SFTConfig, load_config
from factedge.train.model import load_for_training
from factedge.train.run_dir import iter_metrics, seed_everything
from factedge.train.sft import LORA_DIR, SFT_MODEL_DIR, prepare_model, train_sft

torch.set_num_threads(2)


def _cfg(base, world, out, *extra) -> SFTConfig:
    return load_config(SFTConfig, None, [
        "--model.base", str(base), "--data", str(world.sft), "--run.out", str(out),
        "--optim.batch_size", "4", "--optim.micro_batch_size", "2", "--optim.lr", "1e-3",
        "--optim.warmup_ratio", "0", "--optim.max_steps", "3", "--save_dtype", "float32", "--lora.r", "4", *extra])


def _final(run: Path) -> dict[str, torch.Tensor]:
    last = sorted((run / "checkpoints").iterdir(), key=lambda d: int(d.name.split("-")[1]))[-1]
    return load_file(str(last / "trainable.safetensors"))


@pytest.fixture(scope="module")
def full_run(small_base, small_world, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft") / "full"
    return train_sft(_cfg(small_base, small_world, out))


def test_full_ft_trains_lm_and_projector_only(full_run, small_base, small_world, tmp_path):
    seed_everything(42)
    initial = prepare_model(_cfg(small_base, small_world, tmp_path))
    flags = {n: p.requires_grad for n, p in initial.named_parameters()}
    assert not any(v for n, v in flags.items() if n.startswith("vision."))
    trained = _final(full_run.run_dir)
    want = sorted(n for n, v in flags.items() if v)
    assert sorted(trained) == want and any(n.startswith("projector.") for n in want)
    before = dict(initial.named_parameters())
    unchanged = [n for n in want if torch.equal(before[n].detach(), trained[n])]
    assert unchanged == []  # every trainable tensor moved (3 steps, lr 1e-3)


def test_projector_mode_trains_the_projector_alone(small_base, small_world, tmp_path):
    model = prepare_model(_cfg(small_base, small_world, tmp_path, "--mode", "projector"))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("projector.") for n in trainable)


def test_full_ft_output_is_an_original_llava_folder(full_run):
    out = full_run.output
    assert out == full_run.run_dir / SFT_MODEL_DIR
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlavaLlamaForCausalLM"] and cfg["mm_projector_type"] == "mlp2x_gelu"
    assert Path(cfg["mm_vision_tower"]).is_dir() and (out / "tokenizer.model").is_file()
    ckpt = load_checkpoint(out)
    assert ckpt.layout == "llava" and ckpt.projector_type == "mlp2x_gelu"
    model = load_for_training(out)
    trained = _final(full_run.run_dir)
    for name, p in model.named_parameters():
        if name in trained:
            assert torch.equal(p.detach(), trained[name]), name
    rows = iter_metrics(full_run.run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["loss"] > 0 and r["tokens_per_s"] > 0 for r in rows)
    assert json.loads((full_run.run_dir / "config.json").read_text())["optim"]["lr"] == 1e-3


def test_seeded_runs_repeat_and_resume_bit_for_bit(full_run, small_base, small_world, tmp_path, interrupt):
    again = train_sft(_cfg(small_base, small_world, tmp_path / "again"))
    want = _final(full_run.run_dir)
    got = _final(again.run_dir)
    assert all(torch.equal(want[k], got[k]) for k in want)

    cfg = _cfg(small_base, small_world, tmp_path / "resumed", "--run.save_every", "2")
    interrupt(train_sft, cfg, after=2)
    assert [d.name for d in (tmp_path / "resumed" / "checkpoints").iterdir()] == ["step-2"]
    seen = []
    train_sft(cfg, progress=lambda step, total, m: seen.append(step))
    assert seen == [3]
    resumed = _final(tmp_path / "resumed")
    assert all(torch.equal(want[k], resumed[k]) for k in want)
    losses = lambda run: [r["loss"] for r in iter_metrics(run)]  # noqa: E731
    assert losses(tmp_path / "resumed") == losses(full_run.run_dir)


def test_lora_trains_only_the_adapter(small_base, small_world, tmp_path):
    """2 steps: LoRA's B starts at 0, so A gets no gradient in step 1; by step 2 both moved."""
    cfg = _cfg(small_base, small_world, tmp_path / "lora", "--mode", "lora", "--optim.max_steps", "2")
    seed_everything(42)
    initial = prepare_model(cfg)
    before = {n: p.detach().clone() for n, p in initial.named_parameters()}
    result = train_sft(cfg)
    trained = _final(result.run_dir)
    assert sorted(trained) == sorted(n for n, p in initial.named_parameters() if p.requires_grad)
    assert len(trained) == 2 * 7 * 2 and all("lora_" in n for n in trained)  # A,B x 7 targets x 2 layers
    assert all(not torch.equal(before[n], trained[n]) for n in trained)
    assert result.output == result.run_dir / LORA_DIR
    files = sorted(p.name for p in result.output.iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors"]
    adapter = load_file(str(result.output / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in adapter and len(adapter) == 28
    ckpt = load_checkpoint(small_base, lora=result.output)
    assert ckpt.adapter_dir == result.output


def test_outputs_convert(full_run, small_base, small_world, tmp_path, native_tools):
    from factedge.convert.bundle import ConvertOptions, convert_checkpoint

    fast = {"verify": False, "quants": [], "mmproj_types": ["f32"]}
    manifest = convert_checkpoint(full_run.output, tmp_path / "full", ConvertOptions(**fast))
    assert (tmp_path / "full" / "manifest.json").is_file() and manifest is not None
    lora = train_sft(_cfg(small_base, small_world, tmp_path / "lora", "--mode", "lora", "--optim.max_steps", "1"))
    convert_checkpoint(Path(small_base), tmp_path / "merged", ConvertOptions(lora=lora.output, **fast))
    convert_checkpoint(Path(small_base), tmp_path / "adapter", ConvertOptions(lora=lora.output, lora_mode="adapter", **fast))
    assert (tmp_path / "adapter" / "adapter-f32.gguf").is_file() and (tmp_path / "merged" / "model-f16.gguf").is_file()
    from factedge.edge.manifest import read_manifest

    assert read_manifest(tmp_path / "merged").lora == "merged" and read_manifest(tmp_path / "adapter").lora == "adapter"
