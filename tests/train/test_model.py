"""LlavaForTraining: loads every layout, splices images where LLaVA does, matches the converter's
PyTorch reference (convert.reference.TorchLlava) logit for logit, and pads either side alike."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from factedge.convert.layouts import load_checkpoint
from factedge.convert.reference import TorchLlava
from factedge.convert.verify import sample_images
from factedge.edge.errors import InputError
from factedge.train.model import IGNORE_INDEX, IMAGE_TOKEN_INDEX, load_for_training, next_token_targets

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def eager(small_base):
    return load_for_training(small_base, attn_implementation="eager")


@pytest.fixture(scope="module")
def prompt(eager):
    tok = eager.tokenizer
    head = tok("A chat. USER:").input_ids
    tail = tok("\nWhat shapes are there? ASSISTANT:", add_special_tokens=False).input_ids
    return head, tail


def test_logits_equal_torch_reference(small_base, eager, prompt):
    """Same checkpoint, same prompt with an image: max |logit diff| < 1e-5 (eager attention, fp32)."""
    ref = TorchLlava.from_checkpoint(load_checkpoint(small_base))
    head, tail = prompt
    image = sample_images(64)[0][1]
    want = ref.logits([head, image, tail])
    spliced = eager.splice([head + [IMAGE_TOKEN_INDEX] + tail], eager.embed_images([image]))
    with torch.no_grad():
        got = eager(spliced)[0].numpy()
    assert got.shape == want.shape == (len(head) + 16 + len(tail), 32000)
    assert np.abs(got - want).max() < 1e-5
    np.testing.assert_array_equal(eager.image_embeds(eager.pixel_values([image]))[0].detach().numpy(),
                                  ref.image_embeddings(image))


def test_splice_places_images_and_labels(eager, prompt):
    head, tail = prompt
    n = eager.tokens_per_image
    emb = torch.arange(2 * n * eager.hidden_size, dtype=torch.float32).reshape(2, n, eager.hidden_size)
    ids = [head + [IMAGE_TOKEN_INDEX] + tail, [IMAGE_TOKEN_INDEX] + tail[:3]]
    labels = [[IGNORE_INDEX] * (len(head) + 1 + len(tail) - 2) + tail[-2:], [IGNORE_INDEX] + tail[:3]]
    for side in ("right", "left"):
        sp = eager.splice(ids, emb, padding_side=side, labels=labels)
        length = len(head) + n + len(tail)
        assert sp.inputs_embeds.shape == (2, length, eager.hidden_size)
        short = n + 3
        off = 0 if side == "right" else length - short
        # sample 0: image rows right after the head tokens
        assert torch.equal(sp.inputs_embeds[0, len(head):len(head) + n], emb[0])
        assert torch.equal(sp.token_index[0, :len(head) + 2], torch.tensor(list(range(len(head) + 1)) + [len(head) + n]))
        # sample 1: image first, then 3 tokens; padding on the chosen side
        assert torch.equal(sp.inputs_embeds[1, off:off + n], emb[1])
        assert sp.attention_mask[1].sum() == short and sp.attention_mask[1, off] == 1
        assert sp.position_ids[1, off:off + short].tolist() == list(range(short))
        assert sp.token_index[1].tolist()[:4] == [off, off + n, off + n + 1, off + n + 2]
        assert sp.token_index[1, 4:].eq(-1).all()
        assert sp.labels[1].tolist().count(IGNORE_INDEX) == length - 3  # image rows + padding
        assert sp.labels[1, off + n:off + short].tolist() == tail[:3]
        assert sp.labels[0, -2:].tolist() == tail[-2:] and sp.labels[0, :-2].eq(IGNORE_INDEX).all()
        mask, targets = next_token_targets(sp.labels)
        assert targets.tolist() == tail[-2:] + tail[:3]
        assert mask[0].nonzero().flatten().tolist() == [length - 3, length - 2]


def test_left_right_padding_same_logits(eager, prompt):
    head, tail = prompt
    image = sample_images(64)[1][1]
    emb = eager.embed_images([image, image])
    ids = [head + [IMAGE_TOKEN_INDEX] + tail, [IMAGE_TOKEN_INDEX] + tail[:4]]
    with torch.no_grad():
        right = eager.splice(ids, emb, padding_side="right")
        left = eager.splice(ids, emb, padding_side="left")
        lr, ll = eager(right), eager(left)
        alone = eager(eager.splice(ids[1:], emb[1:]))[0]
    short = eager.tokens_per_image + 4
    assert (lr[1, :short] - ll[1, -short:]).abs().max() < 1e-4
    assert (lr[1, :short] - alone).abs().max() < 1e-4
    assert (lr[0] - ll[0]).abs().max() < 1e-4
    at = right.attention_mask.bool() & (torch.rand(right.attention_mask.shape, generator=torch.Generator().manual_seed(0)) < 0.3)
    with torch.no_grad():
        assert torch.equal(eager(right, logits_at=at), lr[at])


def test_feature_cache_computes_each_image_once(fresh_model, monkeypatch):
    model = fresh_model()
    images = [img for _, img in sample_images(64)[:2]]
    calls = []
    original = model._vision_features
    monkeypatch.setattr(model, "_vision_features", lambda px: calls.append(len(px)) or original(px))
    first = model.embed_images(images, keys=["a", "b"])
    again = model.embed_images([images[1], images[0]], keys=["b", "a"])
    assert calls == [2] and torch.equal(first.flip(0), again)
    pix = model.pixel_values(images)
    model.image_embeds(pix)  # keyed by the pixels' hash
    model.image_embeds(pix)
    assert calls == [2, 2]
    model.feature_cache = None
    assert torch.allclose(model.embed_images(images), first)


def test_llava_rlhf_base_is_the_sft_model(tiny_llava_rlhf):
    """LLaVA-RLHF: the sft_model is the base; its rlhf adapter is NOT applied (trainers add theirs)."""
    model = load_for_training(tiny_llava_rlhf.root, attn_implementation="eager")
    ref = TorchLlava.from_checkpoint(load_checkpoint(tiny_llava_rlhf.root), adapter=None)
    ids = model.tokenizer("Hello there, general").input_ids
    with torch.no_grad():
        got = model(model.splice([ids], None))[0].numpy()
    assert np.abs(got - ref.logits([ids])).max() < 1e-5
    assert not hasattr(model.lm, "peft_config")
    assert model.vision_tower_dir == tiny_llava_rlhf.clip_dir.resolve()


def test_bad_batches(eager, prompt):
    head, _ = prompt
    emb = torch.zeros(1, eager.tokens_per_image, eager.hidden_size)
    with pytest.raises(InputError, match="2 image tokens"):
        eager.splice([[IMAGE_TOKEN_INDEX, 5, IMAGE_TOKEN_INDEX]], emb)
    with pytest.raises(InputError, match="no image embeddings"):
        eager.splice([[IMAGE_TOKEN_INDEX, 5]], None)
    with pytest.raises(InputError, match="out of range"):
        eager.splice([[32000]], None)
    with pytest.raises(InputError, match="same lengths"):
        eager.splice([head], None, labels=[head[:-1]])
