"""The persistent ggml thread pool every Context attaches (edge/threadpool.py).

It exists for speed only (bench/speed/edge_speed.py: decode 0.89x llama-mtmd-cli without it, 1.02x with),
so what is tested is that it changes nothing else: the same logits and greedy tokens as ggml's
per-graph threads, and a clean life cycle.
"""

from __future__ import annotations

import numpy as np
import pytest

from factedge.edge.errors import ConfigError


@pytest.fixture(scope="module")
def model(make_bundle, tiny_llava_hf):
    from factedge.edge.runtime import Model

    with Model(make_bundle(tiny_llava_hf) / "model-Q8_0.gguf") as m:
        yield m


def _run(ctx, ids):
    logits = ctx.feed([ids], all_logits=True)
    return logits, ctx.greedy([[int(np.argmax(logits[-1]))]], 12, stop_at_eog=False)


@pytest.mark.parametrize("threads", [1, 2])
def test_pool_gives_the_logits_and_tokens_of_per_graph_threads(model, threads):
    from factedge.edge.runtime import Context, ContextOptions
    from factedge.edge.threadpool import ThreadPool

    ids = model.tokenize("USER: What shapes are there? ASSISTANT:", add_bos=True)
    options = ContextOptions(n_ctx=256, n_threads=threads)
    with Context(model, options) as pooled:
        assert pooled._pool.n_threads == threads
        with_pool = _run(pooled, ids)
    with Context(model, options) as plain:
        ThreadPool.detach(plain.ptr)  # back to ggml's threads started per graph
        without = _run(plain, ids)
    assert np.array_equal(with_pool[0], without[0])  # bit for bit: the pool only schedules
    assert with_pool[1] == without[1] and len(with_pool[1]) == 12


def test_a_paused_pool_wakes_for_the_next_decode_with_the_same_numbers(model):
    """pause() between decodes (what a session does before encoding an image) changes nothing: ggml
    resumes the pool at the next graph, and the logits and greedy tokens are bit for bit the same."""
    from factedge.edge.runtime import Context, ContextOptions

    ids = model.tokenize("USER: What shapes are there? ASSISTANT:", add_bos=True)
    options = ContextOptions(n_ctx=256, n_threads=2)
    with Context(model, options) as ctx:
        straight = _run(ctx, ids)
    with Context(model, options) as ctx:
        ctx.pause_workers()  # before any graph, and again between them
        logits = ctx.feed([ids], all_logits=True)
        ctx.pause_workers()
        ctx._pool.pause()  # twice in a row is a no-op
        tokens = ctx.greedy([[int(np.argmax(logits[-1]))]], 12, stop_at_eog=False)
    assert np.array_equal(logits, straight[0]) and tokens == straight[1]


def test_sessions_pause_their_pool_before_each_image_encode(make_bundle, tiny_llava_hf, tmp_path, monkeypatch):
    """ChatSession and BatchSession both let their own idle workers sleep before libmtmd encodes (the
    polling workers otherwise slow every encode that follows an answer); a cached image does not."""
    from PIL import Image

    from factedge.edge.batch import BatchSession, Request
    from factedge.edge.chat import ChatSession
    from factedge.edge.runtime import Context
    from factedge.edge.vision_model import ModelOptions, VisionModel

    calls = []
    real = Context.pause_workers
    monkeypatch.setattr(Context, "pause_workers", lambda self: calls.append(self) or real(self))
    image = tmp_path / "red.png"
    Image.new("RGB", (40, 40), (200, 30, 30)).save(image)
    with VisionModel.open(make_bundle(tiny_llava_hf), quant="Q8_0", options=ModelOptions(threads=2)) as vision:
        with ChatSession(vision) as chat:
            chat.ask("What is it?", image)
            chat.ask("And now?", image)  # the same picture again: from the cache, no encode
            assert calls == [chat.ctx]
        calls.clear()
        with BatchSession(vision) as batch:
            batch.answer_all([Request("What is it?", image), Request("Again?", image)])
            assert calls == [batch.ctx]


def test_many_contexts_open_and_close_cleanly(model):
    from factedge.edge.runtime import Context, ContextOptions

    ids = model.tokenize("USER: Hi ASSISTANT:", add_bos=True)
    first = None
    for _ in range(20):  # a leaked or double-freed pool crashes or hangs here
        with Context(model, ContextOptions(n_ctx=128, n_threads=2)) as ctx:
            out = ctx.feed([ids])[-1]
        first = out if first is None else first
        assert np.array_equal(out, first)


@pytest.mark.parametrize("n", [0, -1, 513])
def test_pool_size_out_of_range_is_refused_before_native_code(n):
    from factedge.edge.threadpool import ThreadPool

    with pytest.raises(ConfigError, match="1 to 512 threads"):
        ThreadPool(n)
