"""LLaVA on SmolLM2 (byte-level BPE, GQA, tied embeddings, ChatML): both layouts convert and match
PyTorch exactly as the Vicuna layouts do (f32 top-1 100%, mean KL <= 1e-5, 32 greedy tokens, image
embeddings cos >= 0.9999, the tokenizer identical to HF on texts with Unicode, digits, whitespace
runs and special tokens), and the GGUF says what llama.cpp needs to read the vocabulary.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from factedge.convert.bundle import ConvertOptions, convert_checkpoint
from factedge.convert.layouts import load_checkpoint
from factedge.convert.verify import VerifyOptions, verify_bundle
from factedge.edge.errors import ConfigError, LayoutError

OPTIONS = dict(base_type="f32", quants=["Q8_0"], mmproj_types=["f32"], verify=False)


@pytest.fixture(scope="module", params=["tiny_llava_smol_hf", "tiny_llava_smol"])
def smol_converted(request, tmp_path_factory, convert_and_verify):
    return convert_and_verify(request, tmp_path_factory, OPTIONS)


def test_smollm2_llavas_match_pytorch(smol_converted):
    ckpt, _, report = smol_converted
    assert ckpt.text.num_kv_heads < ckpt.text.num_heads and ckpt.text.tie_word_embeddings
    f32 = report.logits["F32"]
    assert f32.top1_agreement == 1.0 and f32.mean_kl <= 1e-5 and f32.greedy_identical, f32
    assert len(set(f32.greedy_gguf)) >= 8  # a real continuation, not one token repeated
    assert min(f.min_cosine for f in report.embeddings["f32"]) >= 0.9999
    assert report.tokenizer["texts"] >= 50 and report.tokenizer["mismatches"] == 0, report.tokenizer
    # random weights in Q8_0: where PyTorch has a real margin the top-1 holds (measured KL 0.023 here,
    # larger than the Vicuna builds' because the tied build writes 4x more into the residual stream)
    q8 = report.logits["Q8_0"]
    assert q8.decided_positions >= 0.3 * q8.positions and q8.decided_agreement == 1.0 and q8.mean_kl <= 0.1, q8


def test_the_gguf_carries_the_bpe_vocab_and_the_chatml_template(smol_converted, gguf_io):
    ckpt, out, _ = smol_converted
    fields = gguf_io.fields(out / "model-f32.gguf")
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert len(fields["tokenizer.ggml.merges"]) == 48900  # SmolLM2's merges, in rank order
    assert len(fields["tokenizer.ggml.tokens"]) == ckpt.text.vocab_size
    assert fields["tokenizer.ggml.add_bos_token"] is False  # SmolLM2 adds no BOS
    assert fields["tokenizer.ggml.eos_token_id"] == 2  # <|im_end|>
    assert "<|im_start|>" in fields["tokenizer.chat_template"]
    assert (Path(ckpt.tokenizer_dir) / "chat_template.jinja").read_text() == fields["tokenizer.chat_template"]
    assert "output.weight" not in gguf_io.tensors(out / "model-f32.gguf")  # tied: llama.cpp reuses token_embd


def test_the_hub_pre_tokenizer_of_smollm2_becomes_smollm(tiny_llava_smol_hf, tmp_path, gguf_io):
    """SmolLM2's hub tokenizer.json splits digits before the byte-level regex (transformers' GGUF
    rebuild leaves that out); such a folder must get llama.cpp's `smollm` pre-tokenizer and still
    tokenize exactly like HF."""
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_llava_smol_hf.root, folder)
    data = json.loads((folder / "tokenizer.json").read_text())
    data["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, data["pre_tokenizer"]]}
    (folder / "tokenizer.json").write_text(json.dumps(data))
    ckpt = load_checkpoint(folder)
    out = tmp_path / "bundle"
    convert_checkpoint(folder, out, ConvertOptions(base_type="f32", quants=[], mmproj_types=["f32"], verify=False),
                       ckpt=ckpt)
    assert gguf_io.fields(out / "model-f32.gguf")["tokenizer.ggml.pre"] == "smollm"
    _, report = verify_bundle(out, ckpt, VerifyOptions(n_greedy=4))
    assert report.tokenizer["mismatches"] == 0, report.tokenizer


def test_a_bpe_checkpoint_without_a_chat_template_is_refused(tiny_llava_smol_hf, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_llava_smol_hf.root, folder)
    (folder / "chat_template.jinja").unlink()
    with pytest.raises(ConfigError, match="no chat template") as info:
        convert_checkpoint(folder, tmp_path / "out", ConvertOptions(**OPTIONS))
    assert info.value.path == folder and not (tmp_path / "out").exists()


def test_a_word_level_tokenizer_is_refused_by_name(tiny_llava_smol_hf, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_llava_smol_hf.root, folder)
    data = json.loads((folder / "tokenizer.json").read_text())
    data["model"]["type"] = "WordLevel"
    (folder / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(LayoutError, match="tokenizer model 'WordLevel' is not supported") as info:
        convert_checkpoint(folder, tmp_path / "out", ConvertOptions(**OPTIONS))
    assert info.value.path == folder / "tokenizer.json"
