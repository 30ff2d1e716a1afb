"""Many one-turn questions through one model at once: several sequences in one llama.cpp context.

Many questions share work: the system prompt, an image's prompt, an image's encoding, and (when the
exact answers are not required) the reading of the weights for one token of every sequence. So
`BatchSession` keeps up to `parallel` questions in flight in one context, one sequence id each. A question that
finishes frees its sequence for the next (continuous batching). Each sequence has a KV stream of its
own (`seq_ctx` positions), and what questions share is evaluated once and copied, not recomputed:
- the system prompt before the image ("<system> USER: "), kept on a sequence of its own;
- "<system> USER: <image>" for the last `image_prefixes` images (LRU), so the questions about one image
  (POPE asks six) evaluate only their own text;
- each distinct image is encoded once (edge/image_cache.py).

Greedy answers are the one-at-a-time path's (`VisionModel.ask`) token for token: every prompt is fed
with the same decodes as a fresh ChatSession (one per segment, the same n_batch), a sequence's cells
stay in position order in its own stream, and (`exact`, the default) each generation step is decoded
one sequence per llama.cpp call. `exact=False` decodes every live sequence in one call: the weights
are read once per step for all of them (the gain grows with the memory-bound share: small on a 2-core
CPU, large on a GPU), but llama.cpp computes several rows with other kernels (gemm, multi-stream flash
attention), so an answer may differ from the one-at-a-time one where two tokens nearly tie.
tests/edge/test_batch.py checks the identity; bench/speed/batch_speed.py measures both modes.
"""

from __future__ import annotations

import heapq
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Sequence

from factedge.edge.answer import Answer, TurnStats
from factedge.edge.context_owner import ContextOwner
from factedge.edge.errors import ConfigError, ContextFullError, FactedgeError
from factedge.edge.image import ImageSource
from factedge.edge.image_cache import ChatImage, ImageCache
from factedge.edge.prompt import Conversation, Turn, prompt_pieces, require_images
from factedge.edge.runtime import MAX_SEQ, Context, ContextOptions
from factedge.edge.sampling import Sampler, SamplingOptions
from factedge.edge.text_stream import TextStream

if TYPE_CHECKING:
    from factedge.edge.vision_model import VisionModel


@dataclass
class BatchOptions:
    parallel: int = 4  # questions decoded together (sequences in the context)
    seq_ctx: int = 1024  # positions one question may use: prompt (image rows included) + answer
    n_batch: int = 512  # as SessionOptions.n_batch: the prompt decodes of the one-at-a-time path
    kv_type: str = "f16"
    image_cache: int = 16  # distinct image embeddings kept (LRU)
    image_prefixes: int = 4  # "<system> USER: <image>" prompts kept in the KV pool for later questions (LRU)
    exact: bool = True  # one sequence per generation decode: the one-at-a-time answers; False: all in one call
    system: str | None = None  # None: the model's default system prompt

    def check(self) -> "BatchOptions":
        if not 1 <= self.parallel < MAX_SEQ:
            raise ConfigError(f"parallel must be in [1, {MAX_SEQ - 1}], not {self.parallel}")
        ContextOptions(n_ctx=self.seq_ctx, n_batch=self.n_batch, kv_type=self.kv_type).check()
        if self.image_cache < 0 or not 0 <= self.image_prefixes < MAX_SEQ - self.parallel:
            raise ConfigError(f"image_cache must be >= 0 and image_prefixes in [0, {MAX_SEQ - self.parallel - 1}]")
        return self


@dataclass
class Request:
    """One question, with the chat before it when there is one (a server's client sends its history)."""

    question: str
    image: ImageSource | list[ImageSource] | None = None  # a list: several images in this turn
    sampling: SamplingOptions | None = None  # None: the VisionModel's sampling options
    system: str | None = None  # None: BatchOptions.system
    history: Sequence[tuple[str, str, Sequence[ImageSource]]] = ()  # earlier (user, assistant, images) turns
    on_piece: Callable[[str], None] | None = None  # called with each piece of answer text as it is decoded
    cancel: threading.Event | None = None  # set it to stop the answer where it is (finish_reason "cancelled")


END = object()  # what a `serve` source returns when no request will come any more
# Rows per generation decode in exact mode. Several rows in one llama.cpp call are computed by other
# kernels than one row: ggml's repacked Q4_K/Q4_0 matmul switches to a gemm at 4 rows, and CPU flash
# attention over two sequences' streams moved logits by ~1.8 on a random 1B Q4_K_M with image prompts
# (BENCHMARKS.md, "Many questions at once"). One row per call is the one-question path's arithmetic.
EXACT_ROWS = 1


@dataclass
class Outcome:
    """One request's result, in completion order: an answer, or the error that refused it."""

    index: int  # the request's position in the input
    answer: Answer | None = None
    error: FactedgeError | None = None


@dataclass
class BatchStats:
    """Totals over a session's life: where the time went (prompts vs batched decode steps)."""

    prompt_s: float = 0.0
    prompt_positions: int = 0  # evaluated (shared positions not counted)
    decode_s: float = 0.0
    decode_steps: int = 0
    generated_tokens: int = 0

    @property
    def decode_tps(self) -> float:
        """Aggregate generation speed: tokens of all sequences per second of decoding."""
        return self.generated_tokens / self.decode_s if self.decode_s else 0.0


@dataclass
class _Live:
    """A question being answered on sequence `seq`."""

    index: int
    request: Request
    seq: int
    pos: int  # the next free position of the sequence
    sampling: SamplingOptions
    sampler: Sampler
    stats: TurnStats
    text: TextStream
    tokens: list[int] = field(default_factory=list)
    started: float = 0.0


class BatchSession(ContextOwner):
    """Answers one-turn questions on a VisionModel, up to `parallel` of them decoded together."""

    def __init__(self, vision: "VisionModel", options: BatchOptions | None = None):
        self.vision = vision
        self.options = (options or BatchOptions()).check()
        o = self.options
        self.model = vision.model
        self._prefix = self._image_prefix()
        self._prefix_seq = o.parallel  # a sequence of its own holds the shared prefix
        # then one sequence per kept image prompt: image key -> (sequence, positions)
        self._slots: OrderedDict[str, tuple[int, int]] = OrderedDict()
        if o.seq_ctx > self.model.n_ctx_train:  # llama.cpp would allow it; positions past it are untrained
            raise ConfigError(f"seq_ctx {o.seq_ctx} is more than the {self.model.n_ctx_train} positions the model "
                              "was trained on", self.model.path)
        n_seq = o.parallel + 1 + o.image_prefixes  # each a KV stream of n_ctx / n_seq positions
        self.ctx = Context(self.model, ContextOptions(n_ctx=n_seq * o.seq_ctx, n_batch=o.n_batch,
                                                      n_threads=vision.options.threads, kv_type=o.kv_type, n_seq=n_seq))
        if vision.adapter:
            self.ctx.set_adapters([(vision.adapter, vision.options.adapter_scale)])
        self._images = ImageCache(vision, o.image_cache, self.ctx.pause_workers)
        self._prefix_ready = False
        self.stats = BatchStats()

    def _image_prefix(self) -> list[int]:
        """The token ids before the image in every image question: "<BOS><system> USER: "."""
        text = Conversation(self.options.system, [Turn("?", None, 1)], self.vision.chat_format).text()
        return list(prompt_pieces(text, self.model.tokenize)[0] or [])

    # -- the public loop ------------------------------------------------------------------------

    def answer_all(self, requests: Iterable[Request]) -> list[Outcome]:
        """Every request's outcome, in input order."""
        return sorted(self.run(requests), key=lambda o: o.index)

    def run(self, requests: Iterable[Request]) -> Iterator[Outcome]:
        """Answer `requests`, yielding each outcome as it finishes (completion order). Requests are
        read lazily, so a long input (a folder, a JSONL file) is never held in memory at once."""
        items = enumerate(requests)
        return self.serve(lambda wait: next(items, END))

    def serve(self, take: Callable[[bool], "tuple[int, Request] | None | object"]) -> Iterator[Outcome]:
        """The loop behind `run`, fed by `take(wait)`: an (index, request) pair, None when nothing is
        waiting (asked with wait=False while other answers are being decoded) or END. A server's
        worker thread passes a queue here (edge/batch_worker.py)."""
        if self.ctx.closed:
            raise FactedgeError("this batch session is closed")
        live: list[_Live] = []
        free = list(range(self.options.parallel))  # a heap: the lowest free id first keeps live ids consecutive
        exhausted = False
        try:
            while True:
                while free and not exhausted:
                    item = take(not live)
                    if item is END:
                        exhausted = True
                        break
                    if item is None:
                        break
                    seq = heapq.heappop(free)
                    started = self._start(item[0], item[1], seq)
                    if isinstance(started, Outcome):  # refused, or finished at its first token
                        heapq.heappush(free, seq)
                        yield started
                    else:
                        live.append(started)
                if not live:
                    return
                live.sort(key=lambda s: s.seq)
                still: list[_Live] = []
                rows = EXACT_ROWS if self.options.exact else len(live)
                for group in (live[i:i + rows] for i in range(0, len(live), rows)):
                    step = time.perf_counter()
                    self.ctx.step_rows([(s.seq, s.pos, s.tokens[-1]) for s in group])
                    self.stats.decode_s += time.perf_counter() - step
                    self.stats.decode_steps += 1
                    for row, s in enumerate(group):  # sampled before the next group's decode replaces the logits
                        s.pos += 1
                        done = self._next_token(s, row)
                        if done is None:
                            still.append(s)
                        else:
                            self.ctx.seq_forget(s.seq)
                            heapq.heappush(free, s.seq)
                            yield done
                live = still
        finally:
            for s in live:  # closed early or failed: nothing of theirs stays in the KV pool
                s.sampler.close()
                self.ctx.seq_forget(s.seq)

    # -- one request ------------------------------------------------------------------------------

    def _start(self, index: int, request: Request, seq: int) -> _Live | Outcome:
        """Evaluate a request's prompt into `seq` and sample its first token."""
        stats = TurnStats(load_s=self.vision.load_s)
        try:
            sampling = (request.sampling or self.vision.options.sampling).check()
            segments = self._segments(request, stats)
            n = sum(_positions(s) for s in segments)
            if n + sampling.max_tokens > self.options.seq_ctx:
                raise ContextFullError(f"the question needs {n} prompt + {sampling.max_tokens} answer positions but "
                                       f"one sequence holds {self.options.seq_ctx} (seq_ctx)")
            start = time.perf_counter()
            stats.prompt_reused = self._feed(seq, segments)
            stats.prompt_s = time.perf_counter() - start
            stats.prompt_total, stats.prompt_tokens = n, n - stats.prompt_reused
            self.stats.prompt_s += stats.prompt_s
            self.stats.prompt_positions += stats.prompt_tokens
        except FactedgeError as error:
            self.ctx.seq_forget(seq)
            return Outcome(index, error=error)
        live = _Live(index, request, seq, n, sampling, Sampler(sampling, self.model.n_vocab), stats,
                     TextStream(sampling.stop), started=time.perf_counter())
        done = self._next_token(live, -1)
        if done is not None:
            self.ctx.seq_forget(seq)
        return live if done is None else done

    def _segments(self, request: Request, stats: TurnStats) -> list:
        """The prompt a fresh ChatSession would feed for this chat: token ids, ChatImage for images."""
        turns = [Turn(u, a, len(ims)) for u, a, ims in request.history]
        current = request.image if isinstance(request.image, list) else [] if request.image is None else [request.image]
        sources = [im for _, _, ims in request.history for im in ims] + current
        images = [self._images.encode(src, stats) for src in sources]
        turns.append(Turn(request.question, None, len(current)))
        system = self.options.system if request.system is None else request.system
        pieces = prompt_pieces(Conversation(system, turns, self.vision.chat_format).text(), self.model.tokenize)
        require_images(pieces, len(images))
        it = iter(images)
        return [next(it) if p is None else p for p in pieces]

    def _feed(self, seq: int, segments: list) -> int:
        """Evaluate the prompt into `seq`, taking what it shares from the kept sequences: the system
        prompt when it is the whole first segment, and "<system> USER: <image>" when that image's
        prompt is kept. Returns the positions reused."""
        if isinstance(segments[0], ChatImage) or list(segments[0]) != self._prefix or len(segments) < 2:
            self.ctx.feed_seq(seq, 0, _arrays(segments))
            return 0
        if not self._prefix_ready:
            self.ctx.feed_seq(self._prefix_seq, 0, [self._prefix])
            self._prefix_ready = True
        shared, end = self._prefix_seq, len(self._prefix)
        if isinstance(segments[1], ChatImage) and len(segments) > 2 and self.options.image_prefixes:
            shared, end = self._image_slot(segments[1])
            segments = segments[1:]
        self.ctx.seq_copy(shared, seq)
        self.ctx.feed_seq(seq, end, _arrays(segments[1:]))
        return end

    def _image_slot(self, image: ChatImage) -> tuple[int, int]:
        """(sequence, positions) holding "<system> USER: <image>", evaluated once per kept image."""
        if image.key in self._slots:
            self._slots.move_to_end(image.key)
            return self._slots[image.key]
        used = {seq for seq, _ in self._slots.values()}
        first = self._prefix_seq + 1
        free = [q for q in range(first, first + self.options.image_prefixes) if q not in used]
        if free:
            seq = free[0]
        else:  # the least recently used image gives its sequence up; sequences that copied it keep their cells
            seq = self._slots.popitem(last=False)[1][0]
            self.ctx.seq_forget(seq)
        self.ctx.seq_copy(self._prefix_seq, seq)
        end = self.ctx.feed_seq(seq, len(self._prefix), [image.embedding])
        self._slots[image.key] = (seq, end)
        return seq, end

    def _next_token(self, s: _Live, row: int) -> Outcome | None:
        """Sample from `row`'s logits; an Outcome when the answer is finished, else None (the token
        is fed with the next step). Mirrors ChatSession's generation loop token for token."""
        if len(s.tokens) >= s.sampling.max_tokens:
            return self._finish(s, "length")
        if s.request.cancel is not None and s.request.cancel.is_set():
            return self._finish(s, "cancelled")
        tok = s.sampler.sample(self.ctx.ptr, row)
        if self.model.is_eog(tok):
            return self._finish(s, "stop")
        s.tokens.append(tok)
        piece = s.text.push(self.model.piece(tok))
        if piece and s.request.on_piece is not None:
            s.request.on_piece(piece)
        if s.text.stopped:
            return self._finish(s, "stop")
        if len(s.tokens) >= s.sampling.max_tokens:
            return self._finish(s, "length")
        return None

    def _finish(self, s: _Live, reason: str) -> Outcome:
        s.sampler.close()
        tail = s.text.finish()
        if tail and s.request.on_piece is not None:
            s.request.on_piece(tail)
        s.stats.generate_s = time.perf_counter() - s.started
        s.stats.generated_tokens = len(s.tokens)
        self.stats.generated_tokens += len(s.tokens)
        return Outcome(s.index, Answer(s.text.text.strip(), s.tokens, s.stats, reason))


def _positions(segment) -> int:
    return segment.embedding.shape[0] if isinstance(segment, ChatImage) else len(segment)


def _arrays(segments: list) -> list:
    """Segments as Context.feed_seq takes them: token ids, or embeddings for an image."""
    return [s.embedding if isinstance(s, ChatImage) else s for s in segments]
