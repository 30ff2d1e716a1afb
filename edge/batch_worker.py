"""A BatchSession on a thread of its own, fed from other threads: the server's engine.

HTTP handler threads `submit` requests and get a `Ticket`; the worker thread admits them into the
batch as sequences free up (up to `parallel` decoded together) and streams each answer's text back
through its ticket. At most `max_queue` requests wait beyond those being decoded; `submit` refuses
more at once (QueueFull), so no client waits on an unbounded queue. A client that goes away cancels
its ticket, and its sequence is freed at the next step.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from typing import TYPE_CHECKING, Iterator

from factedge.edge.batch import END, BatchOptions, BatchSession, Outcome, Request
from factedge.edge.errors import ClosedError, FactedgeError

if TYPE_CHECKING:
    from factedge.edge.vision_model import VisionModel


class QueueFull(FactedgeError):
    """More requests than `parallel + max_queue` are in the worker."""


class Ticket:
    """One submitted request: its text pieces as they are decoded, then its Outcome."""

    def __init__(self, request: Request):
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self.cancel = threading.Event()
        self.started = threading.Event()  # admitted into the batch (its prompt is being evaluated)
        request.on_piece = self._events.put
        request.cancel = self.cancel
        self.request = request
        self.index = -1  # set by BatchWorker.submit
        self.outcome: Outcome | None = None
        self._withdraw = lambda: None  # set by BatchWorker.submit

    def abandon(self) -> None:
        """The client is gone: a waiting request leaves the queue now, a running one stops at the next step."""
        self.cancel.set()
        self._withdraw()

    def events(self, timeout: float | None = None) -> Iterator[str]:
        """The answer's text pieces; `self.outcome` is set when this ends. A wait longer than `timeout`
        for the next piece cancels the request and raises TimeoutError."""
        while True:
            try:
                item = self._events.get(timeout=timeout)
            except queue.Empty:
                self.abandon()
                raise TimeoutError("no answer piece within the timeout") from None
            if isinstance(item, Outcome):
                self.outcome = item
                return
            yield item

    def result(self, timeout: float | None = None) -> Outcome:
        for _ in self.events(timeout):
            pass
        return self.outcome

    def _finish(self, outcome: Outcome) -> None:
        self._events.put(outcome)


class BatchWorker:
    """`submit` from any thread; one thread runs the batch loop; `close` stops it."""

    def __init__(self, vision: "VisionModel", options: BatchOptions | None = None, *, max_queue: int = 4):
        self.session = BatchSession(vision, options)
        self.capacity = self.session.options.parallel + max_queue
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._waiting: deque[Ticket] = deque()
        self._tickets: dict[int, Ticket] = {}  # submitted and not yet finished, by index
        self._next = 0
        self._closing = False
        self._thread = threading.Thread(target=self._work, name="factedge-batch", daemon=True)
        self._thread.start()

    def submit(self, request: Request) -> Ticket:
        ticket = Ticket(request)
        with self._lock:
            if self._closing:
                raise ClosedError("the batch worker is closed")
            if len(self._tickets) >= self.capacity:
                raise QueueFull(f"{len(self._tickets)} requests are already being answered or waiting")
            self._tickets[self._next] = ticket
            ticket.index = self._next
            ticket._withdraw = lambda: self._withdraw(ticket)
            self._next += 1
            self._waiting.append(ticket)
            self._wake.notify()
        return ticket

    def _withdraw(self, ticket: Ticket) -> None:
        with self._lock:
            if ticket in self._waiting:
                self._waiting.remove(ticket)
                self._finish(Outcome(ticket.index, error=FactedgeError("cancelled before it started")))

    def _take(self, wait: bool):
        """The next waiting request for the batch loop (blocking only when nothing is being decoded)."""
        with self._lock:
            while True:
                if self._closing:
                    return END
                if self._waiting:
                    ticket = self._waiting.popleft()
                    ticket.started.set()
                    return ticket.index, ticket.request
                if not wait:
                    return None
                self._wake.wait()

    def _finish(self, outcome: Outcome) -> None:
        ticket = self._tickets.pop(outcome.index, None)
        if ticket is not None:
            ticket._finish(outcome)

    def _work(self) -> None:
        try:
            for outcome in self.session.serve(self._take):
                with self._lock:
                    self._finish(outcome)
        except BaseException as exc:  # noqa: BLE001 - every waiting client must hear of it
            error = exc if isinstance(exc, FactedgeError) else FactedgeError(f"the batch loop failed: {exc!r}")
            with self._lock:
                self._closing = True
                for index in list(self._tickets):
                    self._finish(Outcome(index, error=error))

    def close(self) -> None:
        """Stop taking requests, let the loop end (answers in flight are cancelled), free the context."""
        with self._lock:
            self._closing = True
            for ticket in self._tickets.values():
                ticket.cancel.set()
            self._wake.notify_all()
        self._thread.join()
        with self._lock:  # anything the loop never reached
            for index in list(self._tickets):
                self._finish(Outcome(index, error=ClosedError("the server is closing")))
        self.session.close()
