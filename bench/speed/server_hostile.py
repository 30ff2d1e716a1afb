"""The server under hostile clients: a burst of concurrent clients, and stalled (slow-loris) connections.

    python -m bench.speed.server_hostile [--bundle DIR] [--clients 16] [--requests 5] [--stalled 8]

Part 1: `--clients` threads each send `--requests` chat completions at once; every one must get an
answer (200, or 429/503 when the queue is full), never a reset or a hang; prints the status counts
and the latency percentiles. Part 2: `--stalled` connections send half a request and go silent
against a server with a 2 s socket timeout and max_connections equal to them; one more connection
must get 503 at once, a normal request after the timeout must get 200, and every stalled socket must
be closed by the server. Ratios and times are printed side by side in one run; nothing is asserted
against a clock. Without --bundle the tiny llava-hf bundle of bench/speed/soak.py is used.
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import threading
import time
from collections import Counter
from pathlib import Path

from bench.common import ROOT
from bench.speed.soak import ensure_bundle


def _post(port: int, i: int) -> tuple[int | str, float]:
    start = time.perf_counter()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        body = json.dumps({"max_tokens": 8, "messages": [{"role": "user", "content": f"Count to {i}."}]})
        conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
        status = conn.getresponse().status
        conn.close()
    except OSError as exc:
        status = type(exc).__name__
    return status, time.perf_counter() - start


def burst(vision, clients: int, requests: int, parallel: int = 1, max_queue: int = 4) -> None:
    from factedge.edge.server import ChatServer, ServerOptions, start_in_thread

    srv = ChatServer(vision, ServerOptions(port=0, parallel=parallel, max_queue=max_queue, seq_ctx=512))
    thread = start_in_thread(srv)
    results: list[tuple[int | str, float]] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients)

    def client(c: int) -> None:
        barrier.wait()
        for r in range(requests):
            out = _post(srv.port, c * requests + r)
            with lock:
                results.append(out)

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    after = _post(srv.port, 0)[0]
    srv.shutdown(), srv.server_close(), thread.join(10)
    lat = sorted(t for _, t in results)
    counts = Counter(s for s, _ in results)
    print(f"burst (parallel {parallel}, max_queue {max_queue}): {clients} clients x {requests} requests in {wall:.1f} s: "
          + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items(), key=str))
          + f"; latency p50 {lat[len(lat) // 2]:.2f} s, max {lat[-1]:.2f} s; a request afterwards: {after}")


def stalled(vision, n: int, timeout_s: float = 2.0) -> None:
    from factedge.edge.server import ChatServer, ServerOptions, start_in_thread

    srv = ChatServer(vision, ServerOptions(port=0, socket_timeout_s=timeout_s, max_connections=n))
    thread = start_in_thread(srv)
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", srv.port), timeout=30)
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\n{")
        socks.append(s)
    time.sleep(0.2)
    t0 = time.perf_counter()
    extra = socket.create_connection(("127.0.0.1", srv.port), timeout=30)
    refused = extra.recv(64).split(b"\r\n")[0].decode()
    refused_s = time.perf_counter() - t0
    extra.close()
    closed_at = []
    for s in socks:
        s.recv(4096)  # returns when the server answers (408-less close) or closes
        closed_at.append(time.perf_counter() - t0)
        s.close()
    served = _post(srv.port, 1)[0]
    srv.shutdown(), srv.server_close(), thread.join(10)
    print(f"stalled: {n} half-sent requests (socket timeout {timeout_s:g} s, max_connections {n}): one more "
          f"connection got '{refused}' in {refused_s * 1000:.0f} ms; the stalled ones were closed after "
          f"{min(closed_at):.2f}-{max(closed_at):.2f} s; a normal request then: {served}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=5)
    parser.add_argument("--stalled", type=int, default=8)
    parser.add_argument("--parallel", type=lambda v: [int(x) for x in v.split(",")], default=[1],
                        help="burst once per value: requests decoded together (serve --parallel)")
    parser.add_argument("--max-queue", type=int, default=4)
    args = parser.parse_args()
    from factedge.edge.vision_model import ModelOptions, VisionModel

    bundle = args.bundle or ensure_bundle(ROOT / ".cache" / "bench" / "soak-bundle")
    with VisionModel.open(bundle, options=ModelOptions(n_ctx=1024)) as vision:
        for n in args.parallel:
            burst(vision, args.clients, args.requests, n, args.max_queue)
        stalled(vision, args.stalled)


if __name__ == "__main__":
    main()
