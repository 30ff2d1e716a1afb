"""The conversation: a context on a loaded VisionModel, the KV reuse, the image cache and the one
generation loop (`factedge ask`, `chat`, `serve`, adapter comparison, the demo and eval all go
through it; `VisionModel.ask` is a one-turn ChatSession). Each turn evaluates only what is new.

The KV cache is described position by position (a token id, or an image content hash and row), so a
new turn keeps the longest common prefix with the freshly rendered prompt and feeds only the rest:
KV reuse is an optimisation that never changes the answer for the same prompt ids. Images are keyed
by a hash of their prepared pixels and kept in a small LRU, so an image is encoded once however given.
The prompt is always rendered from the whole history by `edge.prompt` (the one template), except
that a generated answer is spliced in as the token ids it was generated as, not re-tokenised: the
model need not generate the tokenizer's own spelling of its text (" rx" + "ed" vs " rxed"), which would
end the common prefix inside the previous answer and re-evaluate it. The ids are used only when they
spell exactly " " + the answer text (trailing whitespace or a cut stop string trimmed off), so the
prompt text is always the template's and only the answer's spelling may differ from a fresh session's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Hashable, Iterator, Sequence

import numpy as np

from factedge.edge.answer import Answer, TurnStats
from factedge.edge.context_owner import ContextOwner
from factedge.edge.errors import ClosedError, ConfigError, ContextFullError, FactedgeError, InputError
from factedge.edge.image import ImageSource
from factedge.edge.image_cache import ChatImage, ImageCache
from factedge.edge.prompt import Conversation, Turn, prompt_pieces, require_images
from factedge.edge.runtime import Context, ContextOptions, LoraAdapter
from factedge.edge.sampling import Sampler, SamplingOptions
from factedge.edge.text_stream import TextStream

if TYPE_CHECKING:  # the model imports this module for its one-turn ask; only the type comes back
    from factedge.edge.vision_model import VisionModel

OVERFLOW = ("error", "drop_oldest")


@dataclass
class SessionOptions:
    system: str | None = None  # None: the model's default (Vicuna's for LLaVA, its template's otherwise)
    n_ctx: int = 4096
    kv_type: str = "f16"
    n_batch: int = 512  # llama.cpp's numerics depend on the batch shape above 32 rows; <= 32 is exact
    overflow: str = "error"  # "error": raise ContextFullError | "drop_oldest": forget whole oldest turns
    image_cache: int = 4  # image embeddings kept (LRU) beyond those the history holds
    sampling: SamplingOptions | None = None  # None: the VisionModel's sampling options

    def check(self) -> "SessionOptions":
        if self.overflow not in OVERFLOW:
            raise ConfigError(f"overflow must be one of {', '.join(OVERFLOW)}, not {self.overflow!r}")
        if self.image_cache < 0:
            raise ConfigError("image_cache must be >= 0")
        ContextOptions(n_ctx=self.n_ctx, n_batch=self.n_batch, kv_type=self.kv_type).check()  # one set of bounds
        return self


@dataclass
class ChatTurn:
    user: str
    images: list[ChatImage] = field(default_factory=list)
    assistant: str | None = None
    stats: TurnStats | None = None
    answer_ids: list[int] | None = None  # generated ids spelling " " + assistant, as fed to the KV cache


class ChatSession(ContextOwner):
    """A multi-turn LLaVA chat on a VisionModel's model, encoder and adapter, with its own KV cache."""

    def __init__(self, vision: "VisionModel", options: SessionOptions | None = None):
        self.vision = vision
        self.options = (options or SessionOptions()).check()
        self.model = vision.model
        self.ctx = Context(self.model, ContextOptions(n_ctx=self.options.n_ctx, n_batch=self.options.n_batch,
                                                      n_threads=vision.options.threads, kv_type=self.options.kv_type))
        self.adapter_scale = vision.options.adapter_scale if vision.adapter else 0.0  # 0: the base model
        if vision.adapter:
            self.ctx.set_adapters([(vision.adapter, self.adapter_scale)])
        self.turns: list[ChatTurn] = []
        self._kv: list[Hashable] = []  # what each KV position holds: token id or (image key, row)
        self._epoch = 0  # bumped whenever the KV cache is rewound: an older stream stops generating
        self._images = ImageCache(vision, self.options.image_cache, self.ctx.pause_workers)
        self.last_answer: Answer | None = None

    # -- history -------------------------------------------------------------------------------

    def add_turn(self, user: str, assistant: str, image: ImageSource | Sequence[ImageSource] | None = None) -> None:
        """Append a finished turn without evaluating anything (to restore or replay a chat)."""
        self.turns.append(ChatTurn(user, self._encode_all(_as_list(image), TurnStats()), assistant))

    def reset(self) -> None:
        """Forget the history and the KV cache (image embeddings stay cached)."""
        self.turns.clear()
        self._truncate_kv(0)

    def set_adapter(self, adapter: LoraAdapter | None, scale: float) -> None:
        """Apply `adapter` at `scale` to this session's context (None or scale 0: the base model).

        The KV cache holds activations of the old weights, so it is forgotten from position 0; the
        history and the image embeddings stay (a LoRA on the LM leaves CLIP and the projector alone)."""
        self.ctx.set_adapters([(adapter, scale)] if adapter is not None and scale > 0 else [])
        self._truncate_kv(0)
        self.adapter_scale = scale if adapter is not None else 0.0

    @property
    def kv_tokens(self) -> tuple[Hashable, ...]:
        """What each KV-cache position holds: a token id, or (image key, embedding row)."""
        return tuple(self._kv)

    def pop(self) -> ChatTurn:
        """Remove the last turn; the KV cache keeps only what the remaining history shares."""
        if not self.turns:
            raise InputError("the chat has no turn to pop")
        turn = self.turns.pop()
        self._truncate_kv(_common_prefix(self._kv, self._render(self.turns)[0]))
        return turn

    def edit(self, turn_index: int, new_text: str, image: ImageSource | Sequence[ImageSource] | None = None,
             sampling: SamplingOptions | None = None) -> Answer:
        """Replace turn `turn_index`'s question (keeping its images unless given), drop the turns after
        it, and answer again."""
        if not -len(self.turns) <= turn_index < len(self.turns):
            raise InputError(f"no turn {turn_index} in a chat of {len(self.turns)} turns")
        before = list(self.turns)
        images = self.turns[turn_index].images if image is None else image
        del self.turns[turn_index:]
        try:
            return self.ask(new_text, images, sampling)
        except FactedgeError:  # refused (bad image, context full): the history is as it was
            self.turns[:] = before
            raise

    # -- asking --------------------------------------------------------------------------------

    def ask(self, text: str, image: ImageSource | Sequence[ImageSource] | None = None,
            sampling: SamplingOptions | None = None) -> Answer:
        for _ in self.stream(text, image, sampling):
            pass
        return self.last_answer

    def stream(self, text: str, image: ImageSource | Sequence[ImageSource] | None = None,
               sampling: SamplingOptions | None = None) -> Iterator[str]:
        """Evaluate the new prompt now; the returned iterator generates the answer piece by piece.

        The turn enters the history now; its answer is filled in when the iterator finishes (closed
        early: what was generated so far). A later ask/pop/edit/reset ends an unfinished stream."""
        if self.closed:
            raise ClosedError("this chat session is closed")
        sampling = (sampling or self.options.sampling or self.vision.options.sampling).check()
        stats = TurnStats(load_s=self.vision.load_s)
        turn = ChatTurn(text, self._encode_all(_as_list(image), stats), stats=stats)
        keys, segments = self._fit(turn, sampling.max_tokens, stats)
        self._evaluate(keys, segments, stats)
        self.turns.append(turn)
        return self._generate(turn, sampling, stats, self._epoch)

    # -- internals -----------------------------------------------------------------------------

    def _encode_all(self, sources: list, stats: TurnStats) -> list[ChatImage]:
        if sources and self.vision.encoder is None:
            raise ConfigError("this model was opened without an mmproj; it cannot take images")
        return [self._images.encode(src, stats) for src in sources]

    @property
    def system(self) -> str | None:
        """The system prompt in use: the one set, else the model's format's default."""
        return self.vision.chat_format.system_prompt(self.options.system)

    def _render(self, turns: list[ChatTurn], pending: ChatTurn | None = None) -> tuple[list, list]:
        """(per-position keys, feedable segments) of the prompt for these turns (+ a pending one)."""
        all_turns = turns + ([pending] if pending else [])
        done = [Turn(t.user, t.assistant or "", len(t.images)) for t in turns]  # "": an abandoned stream
        conv = Conversation(self.options.system, done + ([Turn(pending.user, None, len(pending.images))] if pending else []),
                            self.vision.chat_format)
        pieces = self._tokenize(conv.text(), self._spliced(done, turns))
        images = [im for t in all_turns for im in t.images]
        require_images(pieces, len(images))
        keys: list[Hashable] = []
        segments: list = []
        it = iter(images)
        for piece in pieces:
            if piece is None:
                im = next(it)
                keys.extend((im.key, row) for row in range(im.embedding.shape[0]))
                segments.append(im.embedding)
            else:
                keys.extend(piece)
                segments.append(piece)
        return keys, segments

    def _spliced(self, done: list[Turn], turns: list[ChatTurn]) -> list[tuple[int, int, list[int]]]:
        """(start, end, ids): spans of the prompt text that are generated answers with known ids.

        A turn's answer starts right after the prompt that asked it ("... ASSISTANT:"); its ids spell
        what the template writes before the answer (Vicuna's separator space) and the answer, and end
        before the turn's closing token ("</s>", "<|im_end|>")."""
        spans, fmt = [], self.vision.chat_format
        for i, t in enumerate(turns):
            if t.answer_ids:
                asked = Conversation(self.options.system, done[:i] + [replace(done[i], assistant=None)], fmt).text()
                spans.append((len(asked), len(asked) + len(fmt.answer_lead) + len(done[i].assistant), t.answer_ids))
        return spans

    def _tokenize(self, text: str, spliced: list[tuple[int, int, list[int]]]) -> list[list[int] | None]:
        """Token-id pieces (None = an image) of the prompt text, known answer ids spliced in.

        The text around an answer is cut at "ASSISTANT:" and at the special "</s>" that follows: llama.cpp
        splits its text at special tokens anyway, so only the answer's own spelling can differ from
        tokenising the whole text (the template's ':' and ' ' never merge into one SPM piece)."""
        pieces, pos = [], 0
        for start, end, ids in spliced + [(len(text), len(text), [])]:
            pieces += prompt_pieces(text[pos:start], self.model.tokenize, bos=pos == 0)
            if ids:
                pieces.append(list(ids))
            pos = end
        return pieces

    def _fit(self, pending: ChatTurn, reserve: int, stats: TurnStats) -> tuple[list, list]:
        """Render the prompt with room for `reserve` new tokens, applying the overflow policy.

        drop_oldest forgets whole oldest turns; their images move on to the next turn when that one
        has none (later questions are usually about that image), and are given up only last."""
        n_ctx = self.ctx.n_ctx
        turns = list(self.turns)
        keys, segments = self._render(turns, pending)
        if len(keys) + reserve <= n_ctx:
            return keys, segments
        if self.options.overflow == "error":
            raise ContextFullError(f"the chat needs {len(keys)} prompt + {reserve} answer positions "
                                   f"but the context holds {n_ctx}")
        own, carried, dropped = list(pending.images), list(pending.images), 0
        while len(keys) + reserve > n_ctx:
            if turns:
                gone = turns.pop(0)
                dropped += 1
                if turns and gone.images and not turns[0].images:
                    turns[0] = replace(turns[0], images=list(gone.images))
                elif not turns and gone.images and not own:
                    carried = list(gone.images)
            elif carried != own:
                carried = own
            else:
                raise ContextFullError(f"one turn needs {len(keys)} prompt + {reserve} answer positions "
                                       f"but the context holds {n_ctx}")
            pending.images = carried
            keys, segments = self._render(turns, pending)
        self.turns[:] = turns
        stats.dropped_turns = dropped
        return keys, segments

    def _evaluate(self, keys: list, segments: list, stats: TurnStats) -> None:
        """Keep the common prefix in the KV cache (never splitting an image), feed the rest."""
        keep = min(_common_prefix(self._kv, keys), len(keys) - 1)  # >= 1 position fed: fresh logits
        while keep > 0 and isinstance(keys[keep], tuple) and keys[keep][1] > 0:  # inside an image
            keep -= 1
        self._truncate_kv(keep)
        rest, pos = [], 0
        for seg in segments:
            n = seg.shape[0] if isinstance(seg, np.ndarray) else len(seg)
            if pos + n > keep:
                rest.append(seg[max(keep - pos, 0):])
            pos += n
        start = time.perf_counter()
        try:
            self.ctx.feed(rest)
        except BaseException:
            self._truncate_kv(0)
            raise
        stats.prompt_s = time.perf_counter() - start
        self._kv = list(keys)
        stats.prompt_total, stats.prompt_reused, stats.prompt_tokens = len(keys), keep, len(keys) - keep

    def _truncate_kv(self, keep: int) -> None:
        self._epoch += 1
        self.ctx.reset(keep=keep)
        del self._kv[keep:]

    def _generate(self, turn: ChatTurn, sampling: SamplingOptions, stats: TurnStats, epoch: int) -> Iterator[str]:
        sampler = Sampler(sampling, self.model.n_vocab)
        text = TextStream(sampling.stop)
        tokens: list[int] = []
        fed: list[int] = []
        reason = "length"
        start = time.perf_counter()
        try:
            while len(tokens) < sampling.max_tokens and self.ctx.n_past < self.ctx.n_ctx and self._epoch == epoch:
                tok = sampler.sample(self.ctx.ptr)
                if self.model.is_eog(tok):
                    reason = "stop"
                    break
                tokens.append(tok)
                piece = text.push(self.model.piece(tok))
                if text.stopped:
                    reason = "stop"
                    break
                self.ctx.step(tok)
                self._kv.append(tok)
                fed.append(tok)
                if piece:
                    yield piece
            tail = text.finish()
            if tail:
                yield tail
        finally:
            sampler.close()
            stats.generate_s = time.perf_counter() - start
            stats.generated_tokens = len(tokens)
            turn.assistant = text.text.strip()
            turn.answer_ids = _spelling(fed, turn.assistant, self.model.piece)
            if self._epoch == epoch:  # a stale stream does not overwrite the newer turn's answer
                self.last_answer = Answer(turn.assistant, tokens, stats, reason)


def _as_list(image) -> list:
    if image is None:
        return []
    if isinstance(image, (list, tuple)):
        return list(image)
    return [image]


def _spelling(ids: list[int], answer: str, piece) -> list[int] | None:
    """The longest prefix of `ids` whose pieces spell exactly " " + `answer` (None: none does).

    Generation may feed more than the answer keeps (whitespace stripped, part of a stop string): those
    ids are left out, so the next prompt reads "ASSISTANT: <answer></s>" as the template writes it.
    A first token without a leading space ("ASSISTANT:rx", seen from random tiny models, not from a
    trained LLaVA's "▁The") gives None: its text differs from the template's, so it is re-tokenised."""
    target, acc, best = (" " + answer).encode("utf-8"), b"", None
    for k, tok in enumerate(ids, 1):
        acc += piece(tok)
        if not target.startswith(acc):
            break
        if len(acc) == len(target):
            best = k
    return ids[:best] if best else None


def _common_prefix(a: Sequence, b: Sequence) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
