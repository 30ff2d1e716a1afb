"""llava-hf checkpoints in every transformers version's key naming, including what the installed
transformers' own `save_pretrained` writes, read to the same tensors and converted exactly; and
configs or headers that lie are refused with one line naming the file (never a traceback).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from factedge.convert.layouts import load_checkpoint
from factedge.edge.errors import ConfigError, CorruptFileError, InputError, MismatchError

# the canonical llava-hf prefixes of each transformers generation (source prefix -> that version's)
NAMINGS = {
    "transformers<4.52": {},
    "transformers 4.52-4.x": {"language_model.model.": "model.language_model.", "language_model.lm_head.": "lm_head.",
                              "vision_tower.": "model.vision_tower.",
                              "multi_modal_projector.": "model.multi_modal_projector."},
    "transformers>=5": {"language_model.model.": "model.language_model.", "language_model.lm_head.": "lm_head.",
                        "vision_tower.vision_model.": "model.vision_tower.",
                        "multi_modal_projector.": "model.multi_modal_projector."},
}


def _copy_with_keys(src: Path, dst: Path, rename: dict[str, str]) -> Path:
    shutil.copytree(src, dst)
    sd = load_file(str(dst / "model.safetensors"))
    out = {}
    for key, value in sd.items():
        for old, new in rename.items():
            if key.startswith(old):
                key = new + key[len(old):]
                break
        out[key] = value
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def _tensors(ckpt) -> dict[str, torch.Tensor]:
    return {f"{part}:{name}": load() for part, lazy in (("lm", ckpt.lm_tensors()), ("vision", ckpt.vision_tensors()),
                                                        ("proj", ckpt.projector_tensors())) for name, load in lazy}


@pytest.mark.parametrize("naming", sorted(NAMINGS))
def test_every_naming_reads_the_same_tensors(tiny_llava_hf, tmp_path, naming):
    base = _tensors(load_checkpoint(tiny_llava_hf.root))
    folder = _copy_with_keys(Path(tiny_llava_hf.root), tmp_path / "ckpt", NAMINGS[naming])
    got = _tensors(load_checkpoint(folder))
    assert list(got) == list(base) and all(torch.equal(got[k], base[k]) for k in base)


@pytest.fixture(scope="module")
def saved_by_transformers(tiny_llava_hf, tmp_path_factory):
    """The tiny llava-hf model loaded and written back by the installed transformers itself."""
    from transformers import LlavaForConditionalGeneration

    out = tmp_path_factory.mktemp("hf-saved") / "ckpt"
    model = LlavaForConditionalGeneration.from_pretrained(tiny_llava_hf.root, torch_dtype=torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                 "preprocessor_config.json"):
        if (Path(tiny_llava_hf.root) / name).is_file():
            shutil.copy(Path(tiny_llava_hf.root) / name, out / name)
    return out


def test_the_installed_transformers_save_pretrained_converts_exactly(saved_by_transformers, tmp_path):
    from factedge.convert.bundle import ConvertOptions, convert_checkpoint
    from factedge.convert.verify import VerifyOptions, verify_bundle

    keys = load_file(str(next(saved_by_transformers.glob("*.safetensors")))).keys()
    assert any("vision_tower" in k for k in keys)
    ckpt = load_checkpoint(saved_by_transformers)
    out = tmp_path / "b"
    convert_checkpoint(saved_by_transformers, out, ConvertOptions(base_type="f32", quants=[], mmproj_types=["f32"],
                                                                  verify=False), ckpt=ckpt)
    _, report = verify_bundle(out, ckpt, VerifyOptions(n_greedy=16))
    f32 = report.logits["F32"]
    assert f32.top1_agreement == 1.0 and f32.mean_kl <= 1e-5 and f32.greedy_identical
    assert min(f.min_cosine for f in report.embeddings["f32"]) >= 0.9999


def _with_config(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    edit(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("edit, error, words", [
    (lambda c: c["text_config"].update(num_attention_heads=0), ConfigError, "num_attention_heads = 0"),
    (lambda c: c["text_config"].update(num_hidden_layers=10**9), ConfigError, "num_hidden_layers = 1000000000"),
    (lambda c: c["text_config"].update(num_hidden_layers="2"), ConfigError, "num_hidden_layers = '2'"),
    (lambda c: c["text_config"].update(num_hidden_layers=1), MismatchError, "layer beyond the 1"),
    (lambda c: c["vision_config"].update(num_attention_heads=0), ConfigError, "num_attention_heads = 0"),
    (lambda c: c["vision_config"].update(patch_size=0), ConfigError, "patch_size = 0"),
    (lambda c: c["text_config"].update(rms_norm_eps=float("nan")), ConfigError, "rms_norm_eps"),
    (lambda c: c.update(vision_feature_layer=-40), ConfigError, "feature layer"),
])
def test_lying_configs_are_refused(tiny_llava_hf, tmp_path, edit, error, words):
    folder = _with_config(Path(tiny_llava_hf.root), tmp_path / "ckpt", edit)
    with pytest.raises(error, match=words) as info:
        load_checkpoint(folder)
    assert info.value.path is not None


def test_deeply_nested_json_is_a_corrupt_file(tiny_llava_hf, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_llava_hf.root, folder)
    (folder / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(CorruptFileError, match="nested too deeply"):
        load_checkpoint(folder)


def test_string_data_offsets_in_a_safetensors_header(tmp_path):
    from factedge.convert.weights import safetensors_header

    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": ["0", "8"]}}).encode()
    path = tmp_path / "model.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + bytes(8))
    with pytest.raises(CorruptFileError, match="bad safetensors header entry"):
        safetensors_header(path)


def test_huge_lora_alpha_is_refused(tiny_llava_rlhf, tmp_path):
    from factedge.convert.merge import read_adapter

    adapter = tmp_path / "adapter"
    shutil.copytree(Path(tiny_llava_rlhf.root) / "rlhf_lora_adapter_model", adapter)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**cfg, "lora_alpha": 1e300}))
    with pytest.raises(ConfigError, match="lora_alpha"):
        read_adapter(adapter)


def test_a_fifo_in_the_adapter_folder_does_not_hang(tiny_llava_rlhf, tmp_path):
    import os

    root = tmp_path / "rlhf"
    shutil.copytree(tiny_llava_rlhf.root, root, symlinks=True)
    os.mkfifo(root / "rlhf_lora_adapter_model" / "adapter_notes")
    ckpt = load_checkpoint(root)  # the FIFO is not a weights file: it is neither read nor hashed
    from factedge.convert.bundle import source_hashes

    assert all("adapter_notes" not in p for p in source_hashes(ckpt))


def test_duplicate_quants_and_shared_batch_outputs_are_refused(tmp_path):
    from factedge.convert.batch import read_batch
    from factedge.convert.bundle import ConvertOptions

    with pytest.raises(ConfigError, match="Q8_0 is listed twice"):
        ConvertOptions(quants=["Q8_0", "q8_0"]).validated()
    batch = tmp_path / "batch.toml"
    batch.write_text('[[checkpoint]]\nsrc = "a"\nout = "out/b"\n[[checkpoint]]\nsrc = "c"\nout = "out/./b"\n')
    with pytest.raises(ConfigError, match="checkpoint #2 writes to .* as checkpoint #1 does"):
        read_batch(batch)


def test_missing_file_is_still_an_input_error(tmp_path):
    with pytest.raises(InputError):
        load_checkpoint(tmp_path / "nope")
