"""The server's clients are hostile: they read no local file the user did not expose (and cannot tell
which files exist), cannot reach it from a web page (Host, Content-Type), cannot hold a thread or a
connection slot forever, and get an answer (not a dropped connection or a traceback) for any input.

Needs the patched native build; skipped without it.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import socket
import threading
import time

import numpy as np
import pytest
from PIL import Image

from factedge.edge.image_access import ImageAccess, ImageAccessError, RemoteImageError


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    exposed, private = root / "exposed", root / "private"
    exposed.mkdir(), private.mkdir()
    arr = np.random.default_rng(3).integers(0, 255, (40, 40, 3), dtype=np.uint8)
    for folder in (exposed, private):
        Image.fromarray(arr).save(folder / "photo.png")
    (private / "notes.txt").write_text("secret")
    os.symlink(private / "photo.png", exposed / "link.png")
    return exposed, private


def start(vision, **options):
    from factedge.edge.server import ChatServer, ServerOptions, start_in_thread

    srv = ChatServer(vision, ServerOptions(port=0, **options))
    thread = start_in_thread(srv)
    return srv, thread


@pytest.fixture(scope="module")
def closed_server(rlhf_vision):
    srv, thread = start(rlhf_vision)
    yield srv
    srv.shutdown(), srv.server_close(), thread.join(10)


@pytest.fixture(scope="module")
def exposing_server(rlhf_vision, folders):
    srv, thread = start(rlhf_vision, allow_dirs=(folders[0],))
    yield srv
    srv.shutdown(), srv.server_close(), thread.join(10)


def post(srv, payload, headers=None, raw: bytes | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=60)
    try:
        body = raw if raw is not None else json.dumps(payload).encode()
        conn.request("POST", "/v1/chat/completions", body=body,
                     headers={"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"{}")
    finally:
        conn.close()


def ask_about(url: str) -> dict:
    return {"max_tokens": 2, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is it?"}]}]}


def test_image_access_rules(folders):
    exposed, private = folders
    assert ImageAccess().resolve("file:///anything.png") == "/anything.png"  # the library's caller is the user
    closed = ImageAccess.exposing(())
    for url in (str(private / "photo.png"), "file://" + str(private / "photo.png"), "photo.png",
                str(private / "missing.png")):
        with pytest.raises(ImageAccessError, match="not served") as info:
            closed.resolve(url)
        assert "missing" not in str(info.value)  # the same answer whether the file exists or not
    opened = ImageAccess.exposing((exposed,))
    assert opened.resolve(str(exposed / "photo.png")) == str(exposed / "photo.png")
    for url in (str(private / "photo.png"), str(exposed / "link.png"), str(exposed / ".." / "private" / "photo.png"),
                "photo.png"):
        with pytest.raises(ImageAccessError):
            opened.resolve(url)
    with pytest.raises(RemoteImageError):
        opened.resolve("https://example.com/a.png")
    assert opened.resolve("data:image/png;base64,AAAA").startswith("data:")


def test_closed_server_reads_no_local_file(closed_server, folders):
    _, private = folders
    answers = {post(closed_server, ask_about(url))[1]["error"]["message"]
               for url in (str(private / "photo.png"), str(private / "missing.png"), str(private / "notes.txt"),
                           "file://" + str(private / "photo.png"), "../photo.png")}
    assert len(answers) == 1 and "data: URI" in answers.pop()  # one answer for all: nothing to probe with


def test_exposed_folder_is_served_and_nothing_else(exposing_server, folders):
    exposed, private = folders
    status, body = post(exposing_server, ask_about(str(exposed / "photo.png")))
    assert status == 200, body
    for url in (str(private / "photo.png"), str(exposed / "link.png")):
        status, body = post(exposing_server, ask_about(url))
        assert status == 400 and "not inside a folder this server exposes" in body["error"]["message"]
    data = "data:image/png;base64," + base64.b64encode((private / "photo.png").read_bytes()).decode()
    assert post(exposing_server, ask_about(data))[0] == 200


@pytest.mark.parametrize("host, status", [("evil.example.com", 421), ("evil.example.com:8080", 421),
                                          ("localhost:1", 200), ("127.0.0.1", 200), ("[::1]:80", 200)])
def test_foreign_host_headers_are_refused(closed_server, host, status):
    conn = http.client.HTTPConnection("127.0.0.1", closed_server.port, timeout=30)
    conn.putrequest("GET", "/v1/models", skip_host=True)
    conn.putheader("Host", host)
    conn.endheaders()
    resp = conn.getresponse()
    assert resp.status == status
    conn.close()


def test_allowed_host_option(rlhf_vision):
    srv, thread = start(rlhf_vision, allowed_hosts=("factedge.lan",))
    try:
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
        conn.putrequest("GET", "/v1/models", skip_host=True)
        conn.putheader("Host", "factedge.lan:8080")
        conn.endheaders()
        assert conn.getresponse().status == 200
    finally:
        srv.shutdown(), srv.server_close(), thread.join(10)


@pytest.mark.parametrize("ctype", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data", ""])
def test_a_body_that_is_not_json_typed_is_415(closed_server, ctype):
    status, body = post(closed_server, {"messages": [{"role": "user", "content": "hi"}]}, {"Content-Type": ctype})
    assert status == 415 and body["error"]["code"] == "unsupported_media_type"


@pytest.mark.parametrize("raw, words", [
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "temperature": float("nan")}).encode(), "temperature"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "temperature": float("inf")}).encode(), "temperature"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**12}).encode(), "max_tokens"),
    (json.dumps(ask_about("data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\nnot really").decode())).encode(),
     "image"),
])
def test_hostile_bodies_get_a_400_answer(closed_server, raw, words):
    status, body = post(closed_server, None, raw=raw)
    assert status == 400, body
    assert words in body["error"]["message"]


def test_an_unexpected_failure_is_a_500_answer_not_a_dropped_connection(closed_server, monkeypatch):
    import factedge.edge.server as server_module

    def broken(*args, **kwargs):
        raise NotImplementedError("a decoder the test breaks on purpose")

    monkeypatch.setattr(server_module, "create_chat_completion", broken)
    status, body = post(closed_server, {"messages": [{"role": "user", "content": "hi"}]})
    assert status == 500 and body["error"]["message"] == "internal server error"  # no internals


def test_stalled_connections_time_out_and_cannot_exhaust_the_server(rlhf_vision):
    """Slow-loris: idle sockets are closed after socket_timeout_s; past max_connections a new one gets
    503 at once; when the stalled ones are gone the server answers again."""
    srv, thread = start(rlhf_vision, socket_timeout_s=1.0, max_connections=4)
    stalled = []
    try:
        for _ in range(4):
            sock = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and nothing more
            stalled.append(sock)
        time.sleep(0.2)
        extra = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
        reply = extra.recv(4096)
        assert reply.startswith(b"HTTP/1.1 503") and b"too_many_connections" in reply
        extra.close()
        start_wait = time.perf_counter()
        for sock in stalled:
            assert sock.recv(4096) == b""  # the server closed it
        assert time.perf_counter() - start_wait < 10
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
        conn.request("GET", "/v1/models")
        assert conn.getresponse().status == 200
        conn.close()
    finally:
        for sock in stalled:
            sock.close()
        srv.shutdown(), srv.server_close(), thread.join(10)


def test_sixteen_concurrent_clients_each_get_an_answer(closed_server):
    results: list[int] = []
    barrier = threading.Barrier(16)

    def one(i):
        barrier.wait()
        status, _ = post(closed_server, {"max_tokens": 2, "messages": [{"role": "user", "content": f"Hi {i}"}]})
        results.append(status)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(results) == 16 and set(results) <= {200, 429, 503} and 200 in results
