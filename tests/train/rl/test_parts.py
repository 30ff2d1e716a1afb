"""The RL pieces under the loop: logit filtering, the sampler's stopping and KV cache, prompts and batch order."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from factedge.edge.errors import ConfigError, InputError
from factedge.train.rl.data import batch_indices, load_prompts, steps_for
from factedge.train.rl.generate import draw, filter_logits, sample

NEG = float("-inf")


# ---------------------------------------------------------------- filtering
def test_filter_logits_hand_worked():
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    assert filter_logits(x).tolist() == [[1.0, 2.0, 3.0, 4.0]]  # paper settings: no filtering
    assert filter_logits(x, temperature=2.0).tolist() == [[0.5, 1.0, 1.5, 2.0]]
    assert filter_logits(x, top_k=2).tolist() == [[NEG, NEG, 3.0, 4.0]]
    p = torch.tensor([[0.1, 0.2, 0.3, 0.4]]).log()
    # sorted 0.4, 0.3, 0.2, 0.1; mass before each: 0, 0.4, 0.7, 0.9 -> top-p 0.5 keeps 0.4 and 0.3
    kept = filter_logits(p, top_p=0.5)
    assert torch.isinf(kept).tolist() == [[True, True, False, False]]
    assert torch.isinf(filter_logits(p, top_p=0.35)).tolist() == [[True, True, True, False]]
    with pytest.raises(ConfigError):
        filter_logits(x, temperature=0.0)


def test_draw_inverse_cdf():
    gen = torch.Generator().manual_seed(0)
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5], [0.0, 0.0, 1.0, 0.0]])
    got = torch.stack([draw(probs, gen) for _ in range(400)])
    assert set(got[:, 0].tolist()) == {1, 3} and set(got[:, 1].tolist()) == {2}  # never a 0-probability token
    assert 150 < int((got[:, 0] == 1).sum()) < 250  # ~half each (binomial sd 10)
    again = torch.stack([draw(probs, torch.Generator().manual_seed(0)) for _ in range(1)])
    assert torch.equal(again[0], got[0])  # a function of the generator state only


# ---------------------------------------------------------------- stopping, with a scripted model
class ScriptedLM:
    """Emits script[b][step] with certainty (logit 0 vs -1e9); records the attention masks it saw."""

    def __init__(self, script: list[list[int]], vocab: int = 10):
        self.script, self.vocab, self.step, self.masks = script, vocab, 0, []

    def get_input_embeddings(self):
        return lambda tok: torch.zeros(*tok.shape, 2)

    def __call__(self, *, inputs_embeds, attention_mask, position_ids, use_cache, logits_to_keep, cache=None):
        self.masks.append(attention_mask.clone())
        logits = torch.full((len(self.script), 1, self.vocab), -1e9)
        for b, row in enumerate(self.script):
            logits[b, 0, row[min(self.step, len(row) - 1)]] = 0.0
        self.step += 1
        return SimpleNamespace(logits=logits, cache="kv")


class ScriptedModel:
    def __init__(self, lm):
        self.lm = lm

    def causal_lm(self):
        return self.lm

    def splice(self, ids, embeds, padding_side):
        assert padding_side == "left"
        width = max(len(x) for x in ids)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
        return SimpleNamespace(inputs_embeds=torch.zeros(len(ids), width, 2), attention_mask=mask,
                               position_ids=(mask.cumsum(1) - 1).clamp(min=0) * mask)


def test_sample_stops_at_eos_and_pads_finished_rows():
    lm = ScriptedLM([[5, 2, 6, 6, 6], [7, 7, 7, 7, 2]])  # EOS = 2
    out = sample(ScriptedModel(lm), [[1, 3], [1, 3, 4]], None, max_new_tokens=4, eos_id=2, pad_id=0)
    assert out.tokens == [[5, 2], [7, 7, 7, 7]]  # row 0 stops with its EOS; row 1 hits max_new_tokens
    assert out.has_eos == [True, False]
    assert [m.shape[1] for m in lm.masks] == [3, 4, 5, 6]  # the mask grows by one column per new token
    assert lm.masks[0].tolist() == [[0, 1, 1], [1, 1, 1]]  # left padding


def test_sample_ends_when_every_row_stopped():
    lm = ScriptedLM([[2], [4, 2]])
    out = sample(ScriptedModel(lm), [[1], [1]], None, max_new_tokens=50, eos_id=2, pad_id=0)
    assert out.tokens == [[2], [4, 2]] and out.has_eos == [True, True]
    assert lm.step == 2  # the prompt pass + one step, then both rows are done


# ---------------------------------------------------------------- the KV-cached loop = a full forward
def test_cached_greedy_matches_full_forward():
    from factedge.train.base.base_model import cached_base, small_spec
    from factedge.train.model import IMAGE_TOKEN_INDEX, load_for_training
    from PIL import Image

    torch.set_num_threads(1)
    model = load_for_training(cached_base(small_spec())).eval()
    images = [Image.new("RGB", (40, 30), (200, 30, 30)), Image.new("RGB", (30, 30), (20, 30, 230))]
    embeds = model.embed_images(images, keys=["red", "blue"])
    prompts = [[1, 450, IMAGE_TOKEN_INDEX, 1724, 338, 29973], [1, IMAGE_TOKEN_INDEX, 319]]  # different lengths
    out = sample(model, prompts, embeds, max_new_tokens=6, eos_id=2, pad_id=0, top_k=1)
    seqs = [p + t for p, t in zip(prompts, out.tokens)]
    with torch.no_grad():
        spliced = model.splice(seqs, embeds, padding_side="right")
        logits = model(spliced)
    for b, (p, t) in enumerate(zip(prompts, out.tokens)):
        where = spliced.token_index[b, len(p):len(p) + len(t)] - 1
        assert logits[b, where].argmax(-1).tolist() == t


# ---------------------------------------------------------------- prompts and batch order
def test_load_prompts_from_a_world(tmp_path):
    from factedge.train.world.export import write_world

    files = write_world(tmp_path / "w", 3, seed=0)
    items = load_prompts(files.ppo_prompts, facts_path=files.captions)
    raw = json.loads(files.ppo_prompts.read_text())
    facts = json.loads(files.captions.read_text())
    assert len(items) == len(raw)
    for it, r in zip(items, raw):
        assert it.image == files.images / r["image"] and it.image.is_file()
        assert it.question == r["conversations"][0]["value"] and it.qtype == r["type"]
        assert it.facts == tuple(facts[r["image"]]) and it.length_bonus == r.get("length_bonus", 1.0)
    assert load_prompts(files.ppo_prompts)[0].facts is None
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{**raw[0], "type": "essay"}]))
    with pytest.raises(InputError, match="unknown type"):
        load_prompts(bad, image_folder=files.images)
    bad.write_text(json.dumps([{**raw[0], "image": "elsewhere.png"}]))
    with pytest.raises(InputError):
        load_prompts(bad, image_folder=files.images, facts_path=files.captions)


def test_batch_order_is_a_function_of_seed_and_step():
    n, bs = 10, 3  # 3 full batches per epoch, 1 prompt dropped each epoch
    epoch0 = [batch_indices(n, bs, s, seed=7) for s in range(3)]
    flat = sum(epoch0, [])
    assert len(set(flat)) == 9 and all(0 <= i < n for i in flat)
    assert batch_indices(n, bs, 1, seed=7) == epoch0[1]  # no hidden state
    assert batch_indices(n, bs, 3, seed=7) != epoch0[0]  # next epoch, new shuffle
    assert batch_indices(n, bs, 0, seed=8) != epoch0[0]
    assert steps_for(10, 3, 4.0) == math.floor(10 * 4 / 3) and steps_for(10, 3, 4.0, max_steps=2) == 2
    with pytest.raises(ConfigError):
        steps_for(2, 3, 1.0)
