"""Vision-tower pretraining: per-patch targets hand-checked; only the tower's layers up to the feature
layer change, the file keeps its tensor names, and a short run learns colours well above chance."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from factedge.train.base.base_model import small_spec
from factedge.train.base.vision_pretrain import VisionPretrain, Vocab, read_layer_only, pretrain_tower_folder, patch_targets
from factedge.train.world.scene import Obj, Scene, WorldConfig


def test_patch_targets_by_hand():
    vocab = Vocab.of(WorldConfig())
    scene = Scene((Obj("triangle", "blue", "large", 0.15, 0.15), Obj("circle", "red", "small", 0.85, 0.5)), "grey")
    got = patch_targets(scene, 7, vocab).reshape(7, 7, 3)
    # 7 patches a side: centres of columns/rows 0-1 fall in grid cell 0, 2-4 in cell 1, 5-6 in cell 2
    blue_triangle = (1 + vocab.colors.index("blue"), 1 + vocab.shapes.index("triangle"), 1 + vocab.sizes.index("large"))
    red_circle = (1 + vocab.colors.index("red"), 1 + vocab.shapes.index("circle"), 1 + vocab.sizes.index("small"))
    expected = np.zeros((7, 7, 3), np.int64)
    expected[0:2, 0:2] = blue_triangle
    expected[2:5, 5:7] = red_circle
    assert np.array_equal(got, expected)


@pytest.fixture(scope="module")
def pretrained(small_base, tmp_path_factory):
    """A copy of the small base's CLIP folder, pretrained for 120 steps."""
    import json

    from factedge.convert.layouts import resolve_vision_tower

    torch.set_num_threads(1)
    cfg_path = small_base / "config.json"
    tower = resolve_vision_tower(json.loads(cfg_path.read_text()), cfg_path, None)
    folder = tmp_path_factory.mktemp("tower") / tower.name
    shutil.copytree(tower, folder)
    before = _weights(folder)
    metrics = pretrain_tower_folder(folder, small_spec().vision, WorldConfig(), VisionPretrain(steps=120, batch_size=16))
    return folder, before, _weights(folder), metrics


def _weights(folder):
    st = folder / "model.safetensors"
    if st.is_file():
        return load_file(st)
    return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)


def test_only_the_read_layers_change(pretrained):
    folder, before, after, _ = pretrained
    assert set(before) == set(after)  # same names: the real CLIP layout
    assert not (folder / "pytorch_model.bin").exists()
    spec = small_spec().vision
    read = spec.num_layers + 1 + spec.feature_layer  # layers whose output reaches hidden_states[feature_layer]
    changed = {k for k in before if not torch.equal(before[k].float(), after[k].float())}
    for k in before:
        if k.startswith("text_model.") or k.startswith("vision_model.post_layernorm"):
            assert k not in changed, k
        elif ".encoder.layers." in k:
            layer = int(k.split(".encoder.layers.")[1].split(".")[0])
            assert (k in changed) == (layer < read), k
    assert "vision_model.embeddings.patch_embedding.weight" in changed


def test_truncated_tower_reads_the_same_layer():
    """Pretraining runs the tower only up to the read layer: that layer's output must be exactly the
    full tower's hidden_states[feature_layer], and the later layers must come back afterwards."""
    from transformers import CLIPVisionModel

    from factedge.convert.reference import vision_config

    spec = dataclasses.replace(small_spec().vision, num_layers=3)
    torch.manual_seed(0)
    model = CLIPVisionModel(vision_config(spec)).eval()
    pixels = torch.randn(2, 3, spec.image_size, spec.image_size)
    with torch.no_grad():
        full = model(pixel_values=pixels, output_hidden_states=True).hidden_states
        with read_layer_only(model, spec.feature_layer) as layer:
            assert layer == 2 and len(model.encoder.layers) == 2
            short = model(pixel_values=pixels, output_hidden_states=True).hidden_states
    assert len(model.encoder.layers) == 3
    assert torch.equal(short[layer], full[spec.feature_layer])


def test_learns_colours_above_chance(pretrained):
    *_, metrics = pretrained
    # 4 colours: chance on occupied patches is 0.25; 120 small steps reach well above it
    assert metrics["color_accuracy"] > 0.45, metrics
    assert np.isfinite(metrics["loss"])


def test_base_key_depends_on_pretraining():
    spec = small_spec()
    other = dataclasses.replace(spec, vision_pretrain=VisionPretrain(steps=10))
    assert spec.key() != other.key()
