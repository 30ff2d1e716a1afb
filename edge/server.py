"""A small OpenAI-compatible HTTP server (stdlib only) over one loaded VisionModel.

`/v1/models` and `/v1/chat/completions` (JSON or SSE). With `parallel` 1, one generation at a time
runs on the model (a lock, KV prefix reuse across requests); with `parallel` N, up to N requests are
decoded together by the batch engine (edge/batch_worker.py). Either way at most `max_queue` more
requests wait and later ones get 429 at once, so no client hangs on an unbounded queue. Loopback by
default; an optional Bearer key; bodies over `max_request_bytes` get 413.
The server never prints (the http.server log goes to `log`, default silent); serve_cli talks.

Clients are untrusted. Images come inline (data: URIs); local paths only inside folders the user
exposed (`allow_dirs`, see edge.image_access). A `Host` that is neither an IP literal, localhost, nor
a name the user allowed gets 421, and a POST body that is not `application/json` gets 415: together
they keep a web page from reaching the server through the browser (DNS rebinding, simple cross-site
POSTs). Every socket read and write times out (`socket_timeout_s`), connections beyond
`max_connections` are refused with 503 at once, and any unexpected failure answers 500 without a
traceback, so no client can hold a thread forever or learn the server's internals.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import socket
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable

from factedge.edge.chat import ChatSession, SessionOptions
from factedge.edge.errors import ClosedError, ConfigError, FactedgeError, InputError
from factedge.edge.image_access import ImageAccess
from factedge.edge.batch import BatchOptions
from factedge.edge.batch_worker import BatchWorker, QueueFull
from factedge.edge.openai_api import (batch_request, chunk, completion, completion_meta, create_chat_completion,
                                      last_chunk, model_id)
from factedge.edge.vision_model import VisionModel

_PARAMS = ("max_tokens", "temperature", "top_p", "top_k", "stop", "seed", "repeat_penalty")
_DRAIN_LIMIT = 16 << 20  # an oversized body is read (and dropped) up to this, so the 413 reaches the client


def error_body(message: str, kind: str = "server_error", code: str | None = None) -> dict:
    """An OpenAI-style error object (a response body, or one event of a stream that already began)."""
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


_BUSY_BODY = json.dumps(error_body("too many open connections", code="too_many_connections")).encode()
_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
         b"Content-Length: %d\r\n\r\n" % len(_BUSY_BODY)) + _BUSY_BODY


@dataclass
class ServerOptions:
    host: str = "127.0.0.1"
    port: int = 8080  # 0: an ephemeral port (see ChatServer.port)
    api_key: str | None = None
    max_request_bytes: int = 32 << 20  # images arrive as data: URIs
    max_queue: int = 4  # requests allowed to wait while one generates
    queue_timeout_s: float = 300.0  # a waiting request gives up with 503 after this
    session: SessionOptions | None = None  # the server's ChatSession (KV prefix reuse across requests)
    allow_dirs: tuple[Path, ...] = ()  # folders whose image files clients may name (none: data: URIs only)
    allowed_hosts: tuple[str, ...] = ()  # Host names accepted besides IP literals and localhost
    socket_timeout_s: float = 30.0  # each read or write on a client socket
    max_connections: int = 32  # open connections; more are refused with 503
    parallel: int = 1  # requests decoded together (1: one at a time on a ChatSession)
    seq_ctx: int = 2048  # with parallel > 1: positions each request may use (history, images, answer)
    exact: bool = True  # with parallel > 1: BatchOptions.exact (one-at-a-time answers)

    def check(self) -> "ServerOptions":
        if self.max_request_bytes < 1 or self.max_queue < 0 or not self.queue_timeout_s > 0:
            raise ConfigError("max_request_bytes must be >= 1, max_queue >= 0 and queue_timeout_s > 0")
        if not 0 < self.socket_timeout_s <= 3600 or not 1 <= self.max_connections <= 4096:
            raise ConfigError("socket_timeout_s must be in (0, 3600] and max_connections in [1, 4096]")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be in 0..65535, not {self.port}")
        if self.parallel > 1:
            BatchOptions(parallel=self.parallel, seq_ctx=self.seq_ctx).check()
        elif self.parallel < 1:
            raise ConfigError(f"parallel must be >= 1, not {self.parallel}")
        return self


class HTTPError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.code = status, message, kind, code


def http_error(exc: FactedgeError) -> HTTPError:
    """What a client is told about a library error: its request's fault (400) or ours (500)."""
    if isinstance(exc, (InputError, ConfigError)):
        return HTTPError(400, exc.one_line(), code=type(exc).__name__)
    return HTTPError(500, exc.one_line(), "server_error", type(exc).__name__)


class ChatServer(ThreadingHTTPServer):
    """ThreadingHTTPServer holding the model, its ChatSession, the generation lock and the queue."""

    daemon_threads = True
    request_queue_size = 64  # listen backlog: a burst of clients waits for accept() instead of being reset

    def __init__(self, chat: VisionModel, options: ServerOptions | None = None, *, model: str | None = None,
                 log: Callable[[str], None] | None = None):
        self.options = (options or ServerOptions()).check()
        self.chat = chat
        self.model_name = model or model_id(chat)
        self.log = log
        o = self.options
        self.worker = BatchWorker(chat, BatchOptions(parallel=o.parallel, seq_ctx=o.seq_ctx, exact=o.exact),
                                  max_queue=o.max_queue) if o.parallel > 1 else None
        # the one-at-a-time path's session (none with the batch worker: its KV cache would sit unused)
        self.session = None if self.worker else ChatSession(chat, o.session or SessionOptions(n_ctx=chat.options.n_ctx))
        self.image_access = ImageAccess.exposing(self.options.allow_dirs)
        self.lock = threading.Lock()
        self.slots = threading.BoundedSemaphore(self.options.max_queue + 1)  # running + waiting
        self.connections = threading.BoundedSemaphore(self.options.max_connections)
        if ":" in self.options.host:  # an IPv6 literal such as ::1
            self.address_family = socket.AF_INET6
        try:
            super().__init__((self.options.host, self.options.port), _Handler)
        except OSError as exc:
            for part in (self.session, self.worker):
                if part is not None:
                    part.close()
            raise ConfigError(f"cannot listen on {self.options.host}:{self.options.port}: {exc.strerror or exc}") from exc

    @property
    def port(self) -> int:
        return self.server_address[1]

    def process_request(self, request, client_address) -> None:
        """One thread per connection, up to max_connections; past that a 503 and the socket closed."""
        if not self.connections.acquire(blocking=False):
            try:
                request.settimeout(1.0)
                request.sendall(_BUSY)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.connections.release()

    def handle_error(self, request, client_address) -> None:
        """An exception that escaped a handler: logged (when logging), never printed with a traceback."""
        if self.log:
            import sys

            self.log(f"{client_address[0]} connection error: {sys.exc_info()[1]!r}")

    def server_close(self) -> None:
        super().server_close()
        if self.worker is not None:
            self.worker.close()
        with self.lock:  # wait for a running generation before freeing its KV cache
            if self.session is not None:
                self.session.close()


def start_in_thread(server: ChatServer) -> threading.Thread:
    """Serve in a daemon thread (tests, notebooks); stop with server.shutdown(); server.server_close()."""
    thread = threading.Thread(target=server.serve_forever, name="factedge-server", daemon=True)
    thread.start()
    return thread


class _Handler(BaseHTTPRequestHandler):
    server: ChatServer
    server_version = "factedge"

    def setup(self) -> None:
        self.timeout = self.server.options.socket_timeout_s  # StreamRequestHandler applies it to the socket
        super().setup()

    def log_message(self, format, *args) -> None:  # noqa: A002 (http.server's name)
        if self.server.log:
            self.server.log(f"{self.address_string()} {format % args}")

    # -- routing -------------------------------------------------------------------------------

    def do_GET(self) -> None:
        self._handle(lambda: self._models() if self.path.rstrip("/") == "/v1/models" else self._not_found())

    def do_POST(self) -> None:
        self._handle(lambda: self._completions() if self.path.rstrip("/") == "/v1/chat/completions"
                     else self._not_found())

    def _handle(self, route: Callable[[], None]) -> None:
        self._consumed = False  # whether the request body has been read
        try:
            self._check_host()
            self._authorize()
            route()
        except HTTPError as exc:
            self._send_error(exc)
        except (OSError, ClosedError):  # the client went away or timed out; the server is closing
            self.close_connection = True
        except Exception as exc:  # noqa: BLE001 - a bug must not drop the connection without a reply
            if self.server.log:
                self.server.log(f"internal error: {exc!r}")
            self._send_error(HTTPError(500, "internal server error", "server_error", "internal_error"))

    def _check_host(self) -> None:
        """Refuse a Host that a DNS-rebinding page would send (a name that is not ours)."""
        host = (self.headers.get("Host") or "").strip().lower()
        if not host:
            return
        name = host[1:].split("]", 1)[0] if host.startswith("[") else host.rsplit(":", 1)[0]
        try:
            ipaddress.ip_address(name)
            return
        except ValueError:
            pass
        if name in ("localhost", *(h.lower() for h in self.server.options.allowed_hosts)):
            return
        raise HTTPError(421, f"Host {name!r} is not accepted (start the server with --allow-host {name} to allow it)",
                        code="host_not_allowed")

    def _not_found(self) -> None:
        raise HTTPError(404, f"no route {self.command} {self.path}", code="not_found")

    def _authorize(self) -> None:
        key = self.server.options.api_key
        if key is None:
            return
        given = self.headers.get("Authorization", "")
        if not (given.startswith("Bearer ") and hmac.compare_digest(given[7:].strip().encode(), key.encode())):
            raise HTTPError(401, "missing or wrong API key (Authorization: Bearer KEY)",
                            "authentication_error", "invalid_api_key")

    # -- endpoints -----------------------------------------------------------------------------

    def _models(self) -> None:
        self._send_json(200, {"object": "list", "data": [
            {"id": self.server.model_name, "object": "model", "created": 0, "owned_by": "factedge"}]})

    def _completions(self) -> None:
        body = self._read_json()
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise HTTPError(400, "stream must be true or false", code="invalid_value")
        if body.get("n", 1) != 1:
            raise HTTPError(400, "only n=1 is supported", code="invalid_value")
        params = {k: body[k] for k in _PARAMS if body.get(k) is not None}
        if "max_tokens" not in params and body.get("max_completion_tokens") is not None:
            params["max_tokens"] = body["max_completion_tokens"]
        server = self.server
        if server.worker is not None:
            self._generate_batched(body.get("messages"), stream, params)
            return
        if not server.slots.acquire(blocking=False):
            raise HTTPError(429, "the server is busy (generation queue full); retry later", "rate_limit_error",
                            "queue_full")
        try:
            if not server.lock.acquire(timeout=server.options.queue_timeout_s):
                raise HTTPError(503, "timed out waiting for the model", "server_error", "queue_timeout")
            try:
                self._generate(body.get("messages"), stream, params)
            finally:
                server.lock.release()
        finally:
            server.slots.release()

    def _generate_batched(self, messages, stream: bool, params: dict) -> None:
        """Through the batch worker: queued (429 when full), decoded with the other requests in flight."""
        server = self.server
        try:
            ticket = server.worker.submit(batch_request(server.chat, messages, image_access=server.image_access,
                                                        **params))
        except QueueFull as exc:
            raise HTTPError(429, f"the server is busy ({exc.reason}); retry later", "rate_limit_error",
                            "queue_full") from exc
        except (InputError, ConfigError) as exc:
            raise http_error(exc) from exc
        wait = server.options.queue_timeout_s
        if not ticket.started.wait(wait):
            ticket.abandon()
            raise HTTPError(503, "timed out waiting for the model", "server_error", "queue_timeout")
        try:
            pieces = ticket.events(timeout=wait)
            first = next(pieces, None)  # the prompt is evaluated: its errors are still an HTTP status
            if first is None and ticket.outcome.error is not None:
                raise http_error(ticket.outcome.error)
            meta = completion_meta(server.model_name)
            if not stream:
                text = "".join([first or "", *pieces])
                if ticket.outcome.error is not None:
                    raise HTTPError(500, ticket.outcome.error.one_line(), "server_error", "generation_failed")
                self._send_json(200, completion(meta, text, ticket.outcome.answer))
                return
            self._start_stream()
            self._event(chunk(meta, {"role": "assistant", "content": ""}))
            if first is not None:
                self._event(chunk(meta, {"content": first}))
            for piece in pieces:
                self._event(chunk(meta, {"content": piece}))
            error = ticket.outcome.error
            self._event(last_chunk(meta, ticket.outcome.answer) if error is None else error_body(error.one_line()))
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except TimeoutError:
            raise HTTPError(503, "timed out waiting for the model", "server_error", "queue_timeout") from None
        finally:
            ticket.abandon()  # a client gone mid-answer frees its sequence; a finished one is unaffected

    def _start_stream(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True

    def _event(self, payload: dict) -> None:
        self.wfile.write(b"data: " + json.dumps(payload).encode() + b"\n\n")
        self.wfile.flush()

    def _generate(self, messages, stream: bool, params: dict) -> None:
        server = self.server
        try:
            result = create_chat_completion(server.chat, messages, stream=stream, model=server.model_name,
                                            session=server.session, image_access=server.image_access, **params)
        except FactedgeError as exc:
            raise http_error(exc) from exc
        if not stream:
            self._send_json(200, result)
            return
        try:
            self._start_stream()
            for piece in result:
                self._event(piece)
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except FactedgeError as exc:  # mid-stream: the status is sent; report in the stream
            self._event(error_body(exc.one_line()))
        finally:
            result.close()

    # -- plumbing ------------------------------------------------------------------------------

    def _read_json(self) -> dict:
        kind = self.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
        if kind != "application/json":
            raise HTTPError(415, f"Content-Type must be application/json, not {kind or 'missing'!r}",
                            code="unsupported_media_type")
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise HTTPError(411, "chunked bodies are not supported; send Content-Length")
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise HTTPError(411, "a Content-Length header is required") from None
        limit = self.server.options.max_request_bytes
        if length < 0:
            raise HTTPError(400, "Content-Length must not be negative")
        if length > limit:
            self._drain(length)
            raise HTTPError(413, f"request body of {length} bytes is over the {limit} byte limit",
                            code="request_too_large")
        self._consumed = True
        try:
            body = json.loads(self.rfile.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise HTTPError(400, f"malformed JSON body: {exc}", code="invalid_json") from exc
        except RecursionError:
            raise HTTPError(400, "malformed JSON body: nested too deeply", code="invalid_json") from None
        if not isinstance(body, dict):
            raise HTTPError(400, "the JSON body must be an object", code="invalid_json")
        return body

    def _drain(self, length: int) -> None:
        """Read and drop a body we refuse: closing on unread data would reset the socket under our reply."""
        self._consumed = True
        self.close_connection = True
        left = min(length, _DRAIN_LIMIT)
        while left > 0:
            got = self.rfile.read(min(left, 1 << 16))
            if not got:
                break
            left -= len(got)

    def _send_json(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _send_error(self, exc: HTTPError) -> None:
        if not self._consumed:
            try:
                self._drain(int(self.headers.get("Content-Length") or 0))
            except ValueError:
                self.close_connection = True
        try:
            self._send_json(exc.status, error_body(exc.message, exc.kind, exc.code))
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True


__all__ = ["ChatServer", "ServerOptions", "start_in_thread"]
