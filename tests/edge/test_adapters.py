"""Runtime LoRA switching: scale 0 is the base model alone, scale 1 the adapter from the start, the
image is encoded once across a comparison, and `factedge ask --compare-adapters` shows both.

Needs the patched native build; skipped without it.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from factedge.edge.errors import ConfigError

MAX_TOKENS = 8
Q1, Q2 = "What is in this picture?", "And what colour is it?"


@pytest.fixture(scope="module")
def bundle(make_bundle, tiny_llava_rlhf):
    return make_bundle(tiny_llava_rlhf, lora_mode="adapter")


def _open(bundle, with_adapter: bool):
    from factedge.edge.bundle import open_bundle
    from factedge.edge.sampling import SamplingOptions
    from factedge.edge.vision_model import ModelOptions, VisionModel

    files = open_bundle(bundle)
    assert files.adapter is not None
    return VisionModel.open(model=files.model, mmproj=files.mmproj, adapter=files.adapter if with_adapter else None,
                           options=ModelOptions(n_ctx=64, threads=1, sampling=SamplingOptions(max_tokens=MAX_TOKENS)))


@pytest.fixture(scope="module")
def tuned(bundle):
    with _open(bundle, True) as vc:
        yield vc


@pytest.fixture(scope="module")
def base(bundle):
    with _open(bundle, False) as vc:
        yield vc


@pytest.fixture
def session():
    """Exact-numerics sessions (f32 KV, batches of <= 32 rows), as in test_chat."""
    from factedge.edge.chat import ChatSession, SessionOptions

    made = []

    def make(vision):
        s = ChatSession(vision, SessionOptions(n_ctx=512, kv_type="f32", n_batch=32))
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


def _image(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (90, 120, 3), dtype=np.uint8)


def test_compare_equals_base_alone_and_adapter_from_start(session, tuned, base, monkeypatch):
    from factedge.edge.adapters import adapter_scale, compare_adapters

    img = _image()
    calls = []
    real = tuned.encoder.encode
    monkeypatch.setattr(tuned.encoder, "encode", lambda rgb: calls.append(1) or real(rgb))
    s = session(tuned)
    result = compare_adapters(s, Q1, img)
    assert len(calls) == 1  # one encode for both answers
    assert (result.base.stats.images_encoded, result.adapter.stats.images_reused) == (1, 1)
    assert adapter_scale(s) == 1.0 and s.turns == []  # the session is left as it was

    alone = session(base).ask(Q1, img)  # a model opened without the adapter
    assert result.base.tokens == alone.tokens and result.base.text == alone.text
    from_start = session(tuned).ask(Q1, img)  # the adapter applied since the context was made
    assert result.adapter.tokens == from_start.tokens and result.adapter.text == from_start.text
    assert len(result.base.tokens) == len(result.adapter.tokens) == MAX_TOKENS
    assert result.base.tokens != result.adapter.tokens  # the tiny adapter does change the answer


def test_switch_mid_chat_keeps_history_and_images(session, tuned, base, monkeypatch):
    from factedge.edge.adapters import set_adapter

    img = _image(1)
    s = session(tuned)
    a1 = s.ask(Q1, img)
    set_adapter(s, 0.0)
    assert s.ctx.n_past == 0 and len(s.turns) == 1  # KV forgotten, history kept
    a2 = s.ask(Q2)
    assert a2.stats.prompt_reused == 0 and a2.stats.images_encoded == 0  # all re-evaluated, image not re-encoded
    ref = session(base)
    ref.add_turn(Q1, a1.text, img)
    assert a2.tokens == ref.ask(Q2).tokens

    half = session(tuned)
    set_adapter(half, 0.5)
    mid = half.ask(Q1, img).tokens
    set_adapter(half, 1.0)
    half.reset()
    assert half.ask(Q1, img).tokens == a1.tokens and half.last_answer.stats.images_reused == 1
    assert mid != a1.tokens and mid != session(base).ask(Q1, img).tokens  # 0.5 is neither end

    for bad in (-0.1, 1.5):
        with pytest.raises(ConfigError):
            set_adapter(s, bad)
    with pytest.raises(ConfigError):
        set_adapter(session(base), 1.0)  # no adapter loaded


def test_ask_compare_adapters_cli(bundle, tmp_path, capsys):
    from factedge.edge.cli import run

    png = tmp_path / "img.png"
    Image.fromarray(_image(2)).save(png)
    args = ["ask", Q1, "--model", str(bundle), "--image", str(png), "--compare-adapters", "--max-tokens",
            str(MAX_TOKENS), "--threads", "1"]
    assert run(args + ["--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    b, a = got["base"], got["adapter"]
    assert got["question"] == Q1 and got["scale"] == 1.0
    assert (b["stats"]["images_encoded"], a["stats"]["images_encoded"], a["stats"]["images_reused"]) == (1, 0, 1)
    assert len(b["tokens"]) == len(a["tokens"]) == MAX_TOKENS and b["tokens"] != a["tokens"]

    assert run(args + ["--stats"]) == 0
    out, err = capsys.readouterr()
    head = out.splitlines()[0]
    assert head.startswith("base (SFT)") and "| adapter x1 (RLHF)" in head
    assert b["answer"].split()[0] in out and a["answer"].split()[0] in out
    assert "base: image encode" in err and "adapter: image encode 0.00 s" in err


def test_compare_needs_an_adapter(session, base):
    from factedge.edge.adapters import compare_adapters

    with pytest.raises(ConfigError):
        compare_adapters(session(base), Q1, _image())


def test_side_by_side_wraps_two_columns():
    from factedge.edge.ask_cli import side_by_side

    text = side_by_side(("left", "one two three four five six"), ("right", "x"), width=43)
    lines = text.splitlines()
    assert lines[0] == f"{'left':<20} | right" and len(lines) == 4
    assert all(len(line) <= 43 for line in lines)
