"""mmproj GGUF: read back with gguf-py, tensors equal the checkpoint's, metadata as clip.cpp reads it."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from factedge.convert.layouts import load_checkpoint
from factedge.convert.mmproj import write_mmproj
from factedge.convert.tensor_names import PROJECTOR_TENSORS, VISION_TENSORS, gguf_name
from factedge.edge.errors import ConfigError, MismatchError, NumericsError, OutputError


def _expected(ckpt) -> dict[str, torch.Tensor]:
    """GGUF name -> float32 torch tensor, straight from the checkpoint (post_layernorm and the layers
    after the feature layer left out)."""
    out = {}
    keep = ckpt.vision.num_layers + 1 + ckpt.vision.feature_layer
    for name, load in ckpt.vision_tensors():
        unused = name.startswith("encoder.layers.") and int(name.split(".")[2]) >= keep
        if not name.startswith("post_layernorm.") and not unused:
            out[gguf_name(name, VISION_TENSORS)] = load().float()
    for name, load in ckpt.projector_tensors():
        out[gguf_name(name, PROJECTOR_TENSORS)] = load().float()
    return out


@pytest.fixture(scope="module")
def hf_ckpt(tiny_llava_hf):
    return load_checkpoint(tiny_llava_hf.root)


def test_f32_tensors_exact_and_metadata(hf_ckpt, tmp_path, gguf_io):
    calls = []
    out = write_mmproj(hf_ckpt, tmp_path / "mmproj-f32.gguf", ftype="f32",
                       extra_kv={"factedge.source_sha256": "abc"}, progress=lambda *a: calls.append(a))
    tensors, types, fields = gguf_io.tensors(out), gguf_io.types(out), gguf_io.fields(out)
    expected = _expected(hf_ckpt)
    assert set(tensors) == set(expected)
    assert len(tensors) == 5 + 2 * 16 + 4  # embeddings+pre-LN, 16 per block (2 of 3 used), mlp projector
    assert not any(n.startswith("v.blk.2.") for n in tensors)  # hidden_states[-2]: last layer unused
    assert not any(".post_ln." in n for n in tensors)  # llama.cpp would apply it; LLaVA does not
    for name, ref in expected.items():
        assert tensors[name].shape == tuple(ref.shape), name
        assert np.array_equal(tensors[name], ref.numpy()), name
    assert set(types.values()) == {"F32"}
    assert len(calls) == len(tensors) and calls[-1][:2] == (len(tensors), len(tensors))

    assert fields["general.architecture"] == "clip"
    assert fields["general.type"] == "mmproj"
    assert fields["general.file_type"] == 0
    assert fields["clip.has_vision_encoder"] is True
    assert fields["clip.projector_type"] == "mlp"
    assert fields["clip.use_gelu"] is False  # quick_gelu
    v = hf_ckpt.vision
    assert fields["clip.vision.image_size"] == 224 and fields["clip.vision.patch_size"] == 14
    assert fields["clip.vision.embedding_length"] == 64
    assert fields["clip.vision.feed_forward_length"] == 128
    assert fields["clip.vision.projection_dim"] == 256
    assert fields["clip.vision.block_count"] == 2  # the layers stored are the layers run
    assert fields["clip.vision.attention.head_count"] == 4
    assert fields["clip.vision.attention.layer_norm_epsilon"] == pytest.approx(1e-5, rel=1e-6)
    assert np.allclose(fields["clip.vision.image_mean"], v.image_mean, rtol=0, atol=1e-7)
    assert np.allclose(fields["clip.vision.image_std"], v.image_std, rtol=0, atol=1e-7)
    assert fields["clip.vision.feature_layer"] == [2]  # hidden_states[2] == hidden_states[-2] of 3 layers
    assert fields["factedge.source_sha256"] == "abc"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left


def test_f16_weights_and_f32_vectors(hf_ckpt, tmp_path, gguf_io):
    out = write_mmproj(hf_ckpt, tmp_path / "mmproj-f16.gguf", ftype="f16")
    tensors, types, fields = gguf_io.tensors(out), gguf_io.types(out), gguf_io.fields(out)
    assert fields["general.file_type"] == 1
    for name, ref in _expected(hf_ckpt).items():
        ref = ref.numpy()
        if ref.ndim == 1:
            assert types[name] == "F32" and np.array_equal(tensors[name], ref), name
        else:
            assert types[name] == "F16", name
            rel = np.abs(tensors[name] - ref).max() / np.abs(ref).max()
            assert rel <= 1e-3, (name, rel)
    assert types["v.patch_embd.weight"] == "F16" and tensors["v.patch_embd.weight"].shape == (64, 3, 14, 14)


def test_linear_projector_rlhf_and_336px(tiny_llava_rlhf, tiny_llava, tmp_path, gguf_io):
    rlhf = load_checkpoint(tiny_llava_rlhf.root)  # bf16 sft weights, fp32 CLIP, linear projector
    out = write_mmproj(rlhf, tmp_path / "rlhf.gguf")
    tensors, fields = gguf_io.tensors(out), gguf_io.fields(out)
    assert fields["clip.projector_type"] == "linear"
    assert sorted(n for n in tensors if n.startswith("mm.")) == ["mm.0.bias", "mm.0.weight"]
    for name, ref in _expected(rlhf).items():
        assert np.array_equal(tensors[name], ref.numpy()), name  # bf16 -> f32 is exact

    big = load_checkpoint(tiny_llava.root)
    out = write_mmproj(big, tmp_path / "336.gguf", ftype="f16")
    tensors, fields = gguf_io.tensors(out), gguf_io.fields(out)
    assert fields["clip.vision.image_size"] == 336 and fields["clip.projector_type"] == "mlp"
    assert tensors["v.position_embd.weight"].shape == (577, 64)


def test_other_feature_layer_is_written_explicitly(hf_ckpt, tmp_path, gguf_io):
    last = dataclasses.replace(hf_ckpt, vision=dataclasses.replace(hf_ckpt.vision, feature_layer=-1))
    fields = gguf_io.fields(write_mmproj(last, tmp_path / "last.gguf"))
    assert fields["clip.vision.feature_layer"] == [3] and fields["clip.vision.block_count"] == 3
    legacy = gguf_io.fields(write_mmproj(hf_ckpt, tmp_path / "legacy.gguf", feature_layer_key=False))
    assert "clip.vision.feature_layer" not in legacy and legacy["clip.vision.block_count"] == 2
    first = dataclasses.replace(hf_ckpt, vision=dataclasses.replace(hf_ckpt.vision, feature_layer=1))
    assert gguf_io.fields(write_mmproj(first, tmp_path / "first.gguf"))["clip.vision.feature_layer"] == [1]
    with pytest.raises(ConfigError, match="out of range"):
        bad = dataclasses.replace(hf_ckpt, vision=dataclasses.replace(hf_ckpt.vision, feature_layer=-9))
        write_mmproj(bad, tmp_path / "bad.gguf")


def test_unconvertible_configs_are_config_errors(hf_ckpt, tmp_path):
    for change in ({"select_feature": "cls_patch"}, {"hidden_act": "relu"}):
        ckpt = dataclasses.replace(hf_ckpt, vision=dataclasses.replace(hf_ckpt.vision, **change))
        with pytest.raises(ConfigError):
            write_mmproj(ckpt, tmp_path / "x.gguf")
    with pytest.raises(ConfigError, match="unknown mmproj type .q4_0."):
        write_mmproj(hf_ckpt, tmp_path / "x.gguf", ftype="q4_0")
    assert not list(tmp_path.iterdir())


def _with_vision(ckpt, edit):
    original = ckpt._vision
    return dataclasses.replace(ckpt, _vision=lambda: iter(edit(list(original()))))


def test_tensor_mismatches_are_named_and_leave_nothing(hf_ckpt, tmp_path):
    missing = _with_vision(hf_ckpt, lambda ts: [t for t in ts if t[0] != "encoder.layers.1.self_attn.k_proj.bias"])
    with pytest.raises(MismatchError, match=r"layers\.1\.self_attn\.k_proj\.bias"):
        write_mmproj(missing, tmp_path / "a.gguf")
    extra = _with_vision(hf_ckpt, lambda ts: ts + [("encoder.layers.7.mlp.fc1.bias", lambda: torch.zeros(128))])
    with pytest.raises(MismatchError, match="not expected"):
        write_mmproj(extra, tmp_path / "b.gguf")
    wrong = _with_vision(hf_ckpt, lambda ts: [(n, (lambda: torch.zeros(2, 64)) if n == "encoder.layers.0.mlp.fc2.weight"
                                                  else f) for n, f in ts])
    with pytest.raises(MismatchError, match=r"fc2\.weight.*shape"):
        write_mmproj(wrong, tmp_path / "c.gguf")
    nan = _with_vision(hf_ckpt, lambda ts: [(n, (lambda: torch.full((64,), float("nan"))) if n == "pre_layrnorm.bias"
                                                else f) for n, f in ts])
    with pytest.raises(NumericsError, match="not finite"):
        write_mmproj(nan, tmp_path / "d.gguf")
    assert not list(tmp_path.iterdir())  # no partial or temp file


def test_write_failure_is_output_error_and_leaves_nothing(hf_ckpt, tmp_path, monkeypatch):
    import errno

    from factedge.convert import gguf_stream

    def disk_full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(gguf_stream.os, "replace", disk_full)
    with pytest.raises(OutputError, match="No space"):
        write_mmproj(hf_ckpt, tmp_path / "m.gguf")
    assert not list(tmp_path.iterdir())


def test_missing_folder_or_folder_target_is_output_error(hf_ckpt, tmp_path):
    with pytest.raises(OutputError):
        write_mmproj(hf_ckpt, tmp_path / "nope" / "m.gguf")
    (tmp_path / "dir.gguf").mkdir()
    with pytest.raises(OutputError):
        write_mmproj(hf_ckpt, tmp_path / "dir.gguf")


def test_q8_0_quantizes_encoder_matrices_with_ggml(hf_ckpt, tmp_path, gguf_io):
    out = write_mmproj(hf_ckpt, tmp_path / "mmproj-q8_0.gguf", ftype="q8_0")
    types, fields = gguf_io.types(out), gguf_io.fields(out)
    assert fields["general.file_type"] == 7  # MOSTLY_Q8_0
    assert types["v.blk.0.attn_q.weight"] == "Q8_0" and types["mm.0.weight"] == "Q8_0"
    assert types["v.patch_embd.weight"] == "F16" and types["v.position_embd.weight"] == "F16"
    assert types["v.blk.0.attn_q.bias"] == "F32"
    from gguf import GGUFReader
    from gguf.quants import dequantize

    t = next(t for t in GGUFReader(str(out)).tensors if t.name == "mm.0.weight")
    ref = dict(hf_ckpt.projector_tensors())["0.weight"]().float().numpy()
    got = dequantize(t.data, t.tensor_type).reshape(ref.shape)
    assert np.abs(got - ref).max() <= np.abs(ref).max() / 127 * 0.51  # half a q8_0 step at most
