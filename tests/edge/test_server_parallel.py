"""`factedge serve --parallel N`: concurrent clients are decoded together and each gets the answer a
one-at-a-time call gives (JSON and SSE, images, history, system prompt); the queue is bounded; a
cancelled or abandoned request frees its sequence; closing answers everyone.

Needs the patched native build; skipped without it.
"""

from __future__ import annotations

import base64
import io
import threading

import numpy as np
import pytest
from PIL import Image

openai = pytest.importorskip("openai")

MAX = 8  # rlhf_vision (tests/edge/conftest.py) generates at most 8 tokens


def _uri(seed: int) -> str:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _conversations() -> list[list[dict]]:
    def ask(text, seed=None):
        parts = [{"type": "text", "text": text}]
        if seed is not None:
            parts.insert(0, {"type": "image_url", "image_url": {"url": _uri(seed)}})
        return {"role": "user", "content": parts}

    return [[ask("What is in this picture?", 1)], [ask("Describe it.", 2)], [ask("Hello there")],
            [{"role": "system", "content": "You answer briefly."}, ask("What colour dominates?", 1)],
            [ask("What is this?", 3), {"role": "assistant", "content": "A picture."}, ask("And its colours?")],
            [ask("Is there a circle?", 2)]]


@pytest.fixture(scope="module")
def server(rlhf_vision):
    from factedge.edge.server import ChatServer, ServerOptions, start_in_thread

    srv = ChatServer(rlhf_vision, ServerOptions(port=0, parallel=3, seq_ctx=1024, max_queue=8, queue_timeout_s=60))
    thread = start_in_thread(srv)
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(10)


def _client(server):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="none", max_retries=0, timeout=60)


def test_concurrent_clients_get_the_one_at_a_time_answers(server, rlhf_vision):
    from factedge.edge.openai_api import create_chat_completion

    convs = _conversations()
    want = [create_chat_completion(rlhf_vision, c, temperature=0, max_tokens=MAX) for c in convs]
    got: dict[int, object] = {}

    def one(i):
        got[i] = _client(server).chat.completions.create(model="m", messages=convs[i], temperature=0, max_tokens=MAX)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(convs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for i, w in enumerate(want):
        assert got[i].choices[0].message.content == w["choices"][0]["message"]["content"]
        assert got[i].choices[0].finish_reason == w["choices"][0]["finish_reason"]
        assert got[i].usage.prompt_tokens == w["usage"]["prompt_tokens"]
        assert got[i].usage.completion_tokens == w["usage"]["completion_tokens"] > 0
    assert server.worker.session.stats.decode_steps > 0


def test_streaming_through_the_batch(server, rlhf_vision):
    from factedge.edge.openai_api import create_chat_completion

    conv = _conversations()[0]
    want = create_chat_completion(rlhf_vision, conv, temperature=0, max_tokens=MAX)
    chunks = list(_client(server).chat.completions.create(model="m", messages=conv, temperature=0, max_tokens=MAX,
                                                          stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want["choices"][0]["message"]["content"]
    assert chunks[-1].choices[0].finish_reason == want["choices"][0]["finish_reason"]


def test_bad_request_is_400_and_the_server_goes_on(server):
    bad = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]
    with pytest.raises(openai.BadRequestError):
        _client(server).chat.completions.create(model="m", messages=bad, max_tokens=4)
    ok = _client(server).chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    assert ok.choices[0].finish_reason in ("stop", "length")


def test_worker_queue_cancel_and_close(rlhf_vision):
    from factedge.edge.batch import BatchOptions, Request
    from factedge.edge.batch_worker import BatchWorker, QueueFull
    from factedge.edge.sampling import SamplingOptions

    long = SamplingOptions(max_tokens=600)
    worker = BatchWorker(rlhf_vision, BatchOptions(parallel=1, seq_ctx=1024), max_queue=1)
    try:
        running, waiting = worker.submit(Request("one", sampling=long)), worker.submit(Request("two", sampling=long))
        with pytest.raises(QueueFull):
            worker.submit(Request("three"))
        waiting.abandon()  # gives up before it starts: answered at once, its place in the queue freed
        assert "before it started" in str(waiting.result(timeout=1).error) and not waiting.started.is_set()
        assert running.started.wait(60)
        running.cancel.set()
        out = running.result(timeout=60)
        assert out.answer.finish_reason == "cancelled" and len(out.answer.tokens) < 600
        again = worker.submit(Request("Hello", sampling=SamplingOptions(max_tokens=MAX))).result(timeout=60)
        assert again.error is None and len(again.answer.tokens) > 0  # the sequence was freed
        in_flight = worker.submit(Request("four", sampling=long))
    finally:
        worker.close()
    assert in_flight.result(timeout=10) is not None  # closing answered it (cancelled or closed), no hang
