"""The OpenAI-compatible server: the `openai` client gets exactly create_chat_completion's answer (JSON
and SSE, image as data URI and as path); key, size, JSON and queue limits answer with the right status
and an OpenAI-style error body, and the server stays up. Loopback only, ephemeral port.

Needs the patched native build; skipped without it.
"""

from __future__ import annotations

import base64
import http.client
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


openai = pytest.importorskip("openai")

KEY = "test-key"
MAX = 8  # rlhf_vision (tests/edge/conftest.py) generates at most 8 tokens
EXACT = {"n_ctx": 1024, "kv_type": "f32", "n_batch": 32}  # batch-shape independent numerics (see test_chat)
QUESTION = "What is in this picture?"


@pytest.fixture(scope="module")
def vision(rlhf_vision):
    return rlhf_vision


@pytest.fixture(scope="module")
def server(vision, image_file):
    from factedge.edge.chat import SessionOptions
    from factedge.edge.server import ChatServer, ServerOptions, start_in_thread

    srv = ChatServer(vision, ServerOptions(port=0, api_key=KEY, max_request_bytes=1 << 20, max_queue=1,
                                           queue_timeout_s=30, session=SessionOptions(**EXACT),
                                           allow_dirs=(image_file.parent,)))
    assert srv.server_address[0] == "127.0.0.1"
    thread = start_in_thread(srv)
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(10)


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    arr = np.zeros((64, 96, 3), np.uint8)
    arr[..., 2] = 180
    arr[10:50, 20:70] = np.random.default_rng(5).integers(0, 255, (40, 50, 3), dtype=np.uint8)
    path = tmp_path_factory.mktemp("img") / "blue.png"
    Image.fromarray(arr).save(path)
    return path


def client(server, **kw):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key=KEY, max_retries=0,
                         timeout=60, **kw)


def messages(url: str) -> list:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": QUESTION}]}]


def direct(vision, msgs):
    from factedge.edge.chat import SessionOptions
    from factedge.edge.openai_api import create_chat_completion

    return create_chat_completion(vision, msgs, temperature=0, max_tokens=MAX, session_options=SessionOptions(**EXACT))


def raw(server, method, path, body: bytes | None = None, headers: dict | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        conn.request(method, path, body=body, headers={"Authorization": f"Bearer {KEY}",
                                                       "Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def test_models_lists_the_bundle(server):
    models = client(server).models.list()
    assert [m.id for m in models.data] == ["tiny-rlhf"]


@pytest.mark.parametrize("as_uri", [True, False], ids=["data-uri", "path"])
def test_completion_equals_direct_call(server, vision, image_file, as_uri):
    msgs = messages(data_uri(image_file) if as_uri else str(image_file))
    want = direct(vision, msgs)
    got = client(server).chat.completions.create(model="tiny-rlhf", messages=msgs, temperature=0, max_tokens=MAX)
    assert got.choices[0].message.content == want["choices"][0]["message"]["content"]
    assert got.choices[0].finish_reason == want["choices"][0]["finish_reason"]
    assert got.usage.prompt_tokens == want["usage"]["prompt_tokens"] > 256
    assert got.usage.completion_tokens == want["usage"]["completion_tokens"] > 0
    assert got.object == "chat.completion" and got.model == "tiny-rlhf"


def test_streaming_equals_direct_call(server, vision, image_file):
    msgs = messages(data_uri(image_file))
    want = direct(vision, msgs)
    stream = client(server).chat.completions.create(model="tiny-rlhf", messages=msgs, temperature=0,
                                                    max_tokens=MAX, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want["choices"][0]["message"]["content"]
    assert chunks[-1].choices[0].finish_reason == want["choices"][0]["finish_reason"]
    # the wire format: SSE data lines ending with [DONE]
    body = json.dumps({"messages": msgs, "stream": True, "temperature": 0, "max_tokens": MAX}).encode()
    status, data = raw(server, "POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    events = data.decode().split("\n\n")
    assert status == 200 and events[-2] == "data: [DONE]" and events[-1] == ""
    assert all(e.startswith("data: {") for e in events[:-2])


def error_of(data: bytes) -> dict:
    err = json.loads(data)["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def test_wrong_or_missing_key_is_401(server):
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="wrong", max_retries=0).models.list()
    status, data = raw(server, "GET", "/v1/models", headers={"Authorization": ""})
    assert status == 401 and error_of(data)["type"] == "authentication_error"
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode()
    status, _ = raw(server, "POST", "/v1/chat/completions", body, {"Authorization": "Bearer nope"})
    assert status == 401


def test_oversized_body_is_413(server):
    body = json.dumps({"messages": [{"role": "user", "content": "x" * (2 << 20)}]}).encode()
    status, data = raw(server, "POST", "/v1/chat/completions", body)
    assert status == 413 and "limit" in error_of(data)["message"]


@pytest.mark.parametrize("body, words", [
    (b"{not json", "malformed JSON"),
    (b"[1, 2]", "object"),
    (json.dumps({"messages": "hi"}).encode(), "messages"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}).encode(), "temperature"),
    (json.dumps({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}]}).encode(), "offline"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "n": 2}).encode(), "n=1"),
])
def test_bad_requests_are_400(server, body, words):
    status, data = raw(server, "POST", "/v1/chat/completions", body)
    assert status == 400, data
    assert words in error_of(data)["message"]
    with pytest.raises(openai.BadRequestError):
        client(server).chat.completions.create(model="m", messages=[{"role": "assistant", "content": "x"}])


def test_full_queue_answers_429_and_server_recovers(server):
    """The model is busy (lock held): 1 request runs-or-waits, max_queue=1 more waits, the other 6 of 8
    get 429 at once; once the model is free the waiting ones get 200 and the server still answers."""
    results: list[tuple[int, float]] = []
    started = time.perf_counter()

    def one(i):
        try:
            client(server).chat.completions.create(model="m", messages=[{"role": "user", "content": f"Hi {i}"}],
                                                   max_tokens=4)
            results.append((200, time.perf_counter() - started))
        except openai.APIStatusError as exc:
            results.append((exc.status_code, time.perf_counter() - started))

    server.lock.acquire()
    try:
        threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        deadline = time.time() + 30
        while sum(1 for s, _ in results if s == 429) < 6 and time.time() < deadline:
            time.sleep(0.05)
        assert sorted(s for s, _ in results) == [429] * 6  # refused at once, while 2 still wait
    finally:
        server.lock.release()
    for t in threads:
        t.join(60)
    statuses = sorted(s for s, _ in results)
    assert statuses == [200, 200] + [429] * 6
    assert max(t for _, t in results) < 60
    after = client(server).chat.completions.create(model="m", messages=[{"role": "user", "content": "Hello"}],
                                                   max_tokens=2)
    assert after.choices[0].finish_reason in ("stop", "length")


def test_queue_timeout_is_503(server):
    old = server.options.queue_timeout_s
    server.options.queue_timeout_s = 0.3
    server.lock.acquire()
    try:
        body = json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode()
        start = time.perf_counter()
        status, data = raw(server, "POST", "/v1/chat/completions", body)
        assert status == 503 and time.perf_counter() - start < 10
        assert error_of(data)["code"] == "queue_timeout"
    finally:
        server.lock.release()
        server.options.queue_timeout_s = old


def test_unknown_route_is_404_and_options_checked(server, vision):
    from factedge.edge.errors import ConfigError
    from factedge.edge.server import ChatServer, ServerOptions

    status, data = raw(server, "GET", "/v1/nothing")
    assert status == 404 and error_of(data)["code"] == "not_found"
    with pytest.raises(ConfigError):
        ChatServer(vision, ServerOptions(port=0, max_queue=-1))
    with pytest.raises(ConfigError, match="cannot listen"):  # the port is taken by the running server
        ChatServer(vision, ServerOptions(port=server.port))


def test_serve_is_a_lazy_command():
    from factedge.edge.cli import LAZY_COMMANDS, SHORT_HELP, run

    assert LAZY_COMMANDS["serve"] == "factedge.edge.serve_cli:serve" and "serve" in SHORT_HELP
    assert run(["serve", "--help"]) == 0


def test_free_for_all_clients_get_an_answer_in_bounded_time(server):
    """8 clients at once, no help from the test: each gets 200 or 429/503 quickly; the server lives on."""
    results: list[int] = []
    barrier = threading.Barrier(8)

    def one(i):
        barrier.wait()
        try:
            client(server).chat.completions.create(model="m", messages=[{"role": "user", "content": f"Count {i}"}],
                                                   max_tokens=16)
            results.append(200)
        except openai.APIStatusError as exc:
            results.append(exc.status_code)

    start = time.perf_counter()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 8 and set(results) <= {200, 429, 503} and 200 in results
    assert time.perf_counter() - start < 60
    assert raw(server, "GET", "/v1/models")[0] == 200


def test_serve_command_starts_and_answers(server, tmp_path):
    """`factedge serve` on an ephemeral loopback port: it announces the port and lists the bundle."""
    import subprocess
    import sys

    bundle = server.chat.files.model.parent
    code = "import sys; from factedge.edge.cli import main; sys.argv[0] = 'factedge'; main()"
    proc = subprocess.Popen([sys.executable, "-c", code, "serve", "--model", str(bundle), "--port", "0",
                             "--n-ctx", "512", "--threads", "1"], stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        assert "serving tiny-rlhf on http://127.0.0.1:" in line, line
        port = int(line.rsplit(":", 1)[1].split("/")[0])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", "/v1/models")
        resp = conn.getresponse()
        assert resp.status == 200 and json.loads(resp.read())["data"][0]["id"] == "tiny-rlhf"
        conn.close()
    finally:
        proc.terminate()
        proc.wait(10)
