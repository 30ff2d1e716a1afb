"""Owned handles over the patched llama.cpp: model, context, LoRA adapter (the image encoder, over
libmtmd, is edge/image_encoder.py on the same base).

Each class checks every native pointer it gets, raises a typed error naming the file, and frees what
it owns (explicitly through `close()` or a `with` block; `__del__` as a last resort). Everything above
this module (sessions, verify, the CLI) speaks numpy arrays and token ids, never ctypes.
"""

from __future__ import annotations

import ctypes
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

import numpy as np

from factedge.edge.errors import ConfigError, InputError, NativeError
from factedge.edge.gguf_preflight import preflight
from factedge.edge.native import load_llama_cpp
from factedge.edge.owned_handle import OwnedHandle
from factedge.edge.threadpool import ThreadPool, usable_cpus

_llama = load_llama_cpp()
import llama_cpp.mtmd_cpp as _mtmd  # noqa: E402  (bound to our libraries by load_llama_cpp)

# native log lines are kept (not printed): the last ones go into error messages
_LOG_TAIL: deque[str] = deque(maxlen=40)


@_llama.llama_log_callback
def _log_to_tail(level, text, user_data):  # pragma: no cover - called from C
    _LOG_TAIL.append(text.decode("utf-8", "replace"))


_llama.llama_log_set(_log_to_tail, ctypes.c_void_p(0))
_mtmd.mtmd_log_set(_log_to_tail, ctypes.c_void_p(0))
_mtmd.mtmd_helper_log_set(_log_to_tail, ctypes.c_void_p(0))
_llama.llama_backend_init()


def native_log_tail(n: int = 8) -> str:
    """The last native log lines, joined on one line (for error messages)."""
    return " | ".join(line.strip() for line in list(_LOG_TAIL)[-n:] if line.strip())


def require_file(path: Path, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} not found", path)
    return path


class Model(OwnedHandle):
    """A llama.cpp language model (GGUF), memory-mapped."""

    def __init__(self, path: Path, *, n_gpu_layers: int = 0, vocab_only: bool = False):
        self.path = require_file(path, "model GGUF")
        template = preflight(self.path, "vocab" if vocab_only else "model").metadata.get("tokenizer.chat_template")
        self.chat_template: str | None = template if isinstance(template, str) else None  # edge.chat_format
        params = _llama.llama_model_default_params()
        params.n_gpu_layers = n_gpu_layers
        params.vocab_only = vocab_only
        ptr = _llama.llama_model_load_from_file(str(self.path).encode(), params)
        if not ptr:
            raise InputError(f"llama.cpp cannot load this model ({native_log_tail()})", self.path)
        self._own(ptr)
        self.vocab = _llama.llama_model_get_vocab(ptr)
        self.n_embd = _llama.llama_model_n_embd(ptr)
        self.n_vocab = _llama.llama_vocab_n_tokens(self.vocab)
        self.n_ctx_train = _llama.llama_model_n_ctx_train(ptr)  # positions the model was trained on

    def _free(self) -> None:
        _llama.llama_model_free(self._ptr)

    @property
    def ptr(self):
        return self._live()

    def tokenize(self, text: str, *, add_bos: bool = False, special: bool = True) -> list[int]:
        self._live()
        data = text.encode("utf-8")
        cap = len(data) + 8
        buf = (_llama.llama_token * cap)()
        n = _llama.llama_tokenize(self.vocab, data, len(data), buf, cap, add_bos, special)
        if n < 0:
            cap = -n
            buf = (_llama.llama_token * cap)()
            n = _llama.llama_tokenize(self.vocab, data, len(data), buf, cap, add_bos, special)
        return list(buf[:n])

    def piece(self, token: int) -> bytes:
        self._live()
        if not 0 <= token < self.n_vocab:
            raise InputError(f"token id {token} is outside the vocabulary (0..{self.n_vocab - 1})", self.path)
        buf = ctypes.create_string_buffer(64)
        n = _llama.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, True)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = _llama.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, True)
        return buf.raw[:n]

    def detokenize(self, tokens: Sequence[int]) -> str:
        return b"".join(self.piece(t) for t in tokens).decode("utf-8", "replace")

    def is_eog(self, token: int) -> bool:
        self._live()
        return bool(_llama.llama_vocab_is_eog(self.vocab, token))


class LoraAdapter(OwnedHandle):
    """A GGUF LoRA adapter loaded against one base model (applied per context with a scale)."""

    def __init__(self, model: Model, path: Path):
        self.path = require_file(path, "LoRA adapter GGUF")
        preflight(self.path, "adapter")
        self.model = model
        ptr = _llama.llama_adapter_lora_init(model.ptr, str(self.path).encode())
        if not ptr:
            raise InputError(f"llama.cpp rejects this adapter for {model.path.name} ({native_log_tail()})", self.path)
        self._own(ptr)

    def _free(self) -> None:
        _llama.llama_adapter_lora_free(self._ptr)

    def _depends_on(self):
        return (self.model,)

    @property
    def ptr(self):
        return self._live()


# a segment of a prompt: token ids, or image embeddings [n_tokens, n_embd] float32
Segment = Union[Sequence[int], np.ndarray]


_KV_TYPES = {"f32": 0, "f16": 1, "q8_0": 8}


@dataclass
class ContextOptions:
    n_ctx: int = 2048
    n_batch: int = 512
    n_threads: int = 0  # 0: llama.cpp's default (4), capped at the CPUs this process may use
    kv_type: str = "f16"  # KV cache precision; "f32" for exact parity checks
    flash_attn: bool | None = None  # None: llama.cpp decides; False for exact parity checks
    n_seq: int = 1  # sequences decoded together (edge/batch.py); each gets n_ctx / n_seq positions of its own

    def check(self) -> "ContextOptions":
        """Bounds llama.cpp asserts on (or crashes past) instead of returning an error."""
        if not MIN_CTX <= self.n_ctx <= MAX_CTX:
            raise ConfigError(f"n_ctx must be in [{MIN_CTX}, {MAX_CTX}], not {self.n_ctx}")
        if not 1 <= self.n_batch <= MAX_CTX or not 0 <= self.n_threads <= 1024:
            raise ConfigError(f"n_batch must be in [1, {MAX_CTX}] and n_threads in [0, 1024]")
        if not 1 <= self.n_seq <= MAX_SEQ:
            raise ConfigError(f"n_seq must be in [1, {MAX_SEQ}], not {self.n_seq}")
        if self.kv_type not in _KV_TYPES:
            raise ConfigError(f"kv_type must be one of {', '.join(_KV_TYPES)}, not {self.kv_type!r}")
        return self


MAX_SEQ = 256  # llama.cpp's LLAMA_MAX_SEQ: a sequence id past it aborts the process
MIN_CTX, MAX_CTX = 16, 1 << 24  # a prompt needs a few positions; past 16 Mi the KV size overflows int32 math


class Context(OwnedHandle):
    """A decoding context over a Model: feeds tokens and image embeddings, returns logits."""

    def __init__(self, model: Model, options: ContextOptions | None = None):
        self.options = (options or ContextOptions()).check()
        model_ptr = model.ptr  # ClosedError for a closed model, before the thread pool is made
        self.model = model
        params = _llama.llama_context_default_params()
        params.n_ctx = self.options.n_ctx
        params.n_batch = self.options.n_batch
        params.n_ubatch = self.options.n_batch
        if self.options.n_threads > 0:
            params.n_threads = params.n_threads_batch = self.options.n_threads
        else:  # llama.cpp's default (4), but never more threads than CPUs: pool workers poll
            params.n_threads = params.n_threads_batch = min(params.n_threads, usable_cpus())
        params.type_k = params.type_v = _KV_TYPES[self.options.kv_type]
        # one KV stream per sequence (not llama.cpp's unified pool): a sequence's cells stay in position
        # order, as in a one-sequence context, so its attention sums in the same order and gives the same
        # numbers (in a shared pool, cells freed by one sequence are reused out of order by the others)
        params.n_seq_max = self.options.n_seq
        params.kv_unified = False
        if self.options.flash_attn is not None:
            params.flash_attn_type = int(self.options.flash_attn)
        params.no_perf = False  # keep llama.cpp's own decode timers (`perf`): a few clock reads per decode
        pool = ThreadPool(params.n_threads)  # one persistent pool for decodes and prompt batches (threadpool.py)
        ptr = _llama.llama_init_from_model(model_ptr, params)
        if not ptr:
            pool.close()
            raise NativeError(f"cannot create a llama.cpp context ({native_log_tail()})", model.path)
        self._pool = pool
        self._own(ptr)
        pool.attach(ptr)
        self.n_past = 0
        self._one = None  # the 1-token batch `step` reuses for every generated token

    def _free(self) -> None:
        if self._one is not None:
            _llama.llama_batch_free(self._one)
            self._one = None
        _llama.llama_free(self._ptr)
        self._pool.close()  # after the context: it may compute until freed

    def _depends_on(self):
        return (self.model,)

    def pause_workers(self) -> None:
        """Let this context's idle thread pool sleep until its next decode (ThreadPool.pause: call it
        before other CPU work, from the thread that decodes on this context)."""
        self._live()
        self._pool.pause()

    @property
    def ptr(self):
        return self._live()

    @property
    def n_ctx(self) -> int:
        return _llama.llama_n_ctx(self._live())

    def set_adapters(self, adapters: Sequence[tuple[LoraAdapter, float]]) -> None:
        """Apply these LoRA adapters with these scales (empty: the base model)."""
        n = len(adapters)
        arr = (_llama.llama_adapter_lora_p_ctypes * max(n, 1))(*[a.ptr for a, _ in adapters])
        scales = (ctypes.c_float * max(n, 1))(*[s for _, s in adapters])
        if _llama.llama_set_adapters_lora(self._live(), arr if n else None, n, scales if n else None) != 0:
            raise NativeError(f"cannot apply LoRA adapters ({native_log_tail()})", self.model.path)

    def reset(self, keep: int = 0) -> None:
        """Forget every position from `keep` on (0: the whole KV cache)."""
        mem = _llama.llama_get_memory(self._live())
        if keep == 0:
            _llama.llama_memory_clear(mem, True)
        else:
            _llama.llama_memory_seq_rm(mem, 0, keep, -1)
        self.n_past = keep

    def _decode(self, tokens: Sequence[int] | None, embd: np.ndarray | None, want_logits: bool, *,
                seq: int = 0, pos: int | None = None) -> np.ndarray:
        """Feed tokens or embeddings to sequence `seq` from position `pos` (None: n_past, which then
        advances; only sequence 0's n_past is tracked here, edge/batch.py tracks the others)."""
        self._live()
        at = self.n_past if pos is None else pos
        n = len(tokens) if tokens is not None else embd.shape[0]
        if embd is not None and (embd.ndim != 2 or embd.shape[1] != self.model.n_embd):
            raise InputError(f"image embeddings of shape {tuple(embd.shape)} do not fit the model's n_embd "
                             f"{self.model.n_embd}", self.model.path)
        if tokens is not None and any(not 0 <= t < self.model.n_vocab for t in tokens):
            raise InputError(f"a token id is outside the vocabulary (0..{self.model.n_vocab - 1})", self.model.path)
        if at + n > self.n_ctx:
            raise InputError(f"prompt needs {at + n} positions but the context holds {self.n_ctx}")
        out: list[np.ndarray] = []
        step = self.options.n_batch
        for start in range(0, n, step):
            m = min(step, n - start)
            batch = _llama.llama_batch_init(m, embd.shape[1] if embd is not None else 0, 1)
            try:
                if embd is not None:
                    chunk = np.ascontiguousarray(embd[start : start + m], dtype=np.float32)
                    ctypes.memmove(batch.embd, chunk.ctypes.data, chunk.nbytes)
                for i in range(m):
                    if tokens is not None:
                        batch.token[i] = tokens[start + i]
                    batch.pos[i] = at + start + i
                    batch.n_seq_id[i] = 1
                    batch.seq_id[i][0] = seq
                    batch.logits[i] = 1 if want_logits else int(start + i == n - 1)
                batch.n_tokens = m
                rc = _llama.llama_decode(self._ptr, batch)
                if rc != 0:
                    raise NativeError(f"llama_decode failed with {rc} ({native_log_tail()})", self.model.path)
                if pos is None:
                    self.n_past += m
                rows = range(m) if want_logits else ([m - 1] if start + m == n else [])
                for i in rows:
                    ptr = _llama.llama_get_logits_ith(self._ptr, i)
                    out.append(np.ctypeslib.as_array(ptr, shape=(self.model.n_vocab,)).copy())
            finally:
                _llama.llama_batch_free(batch)
        return np.stack(out) if out else np.zeros((0, self.model.n_vocab), np.float32)

    def perf(self, reset: bool = False) -> dict[str, float]:
        """llama.cpp's own timers since the last reset (what `llama-mtmd-cli --perf` prints): prompt
        batches (`p_eval`) and single-token decodes (`eval`), so speed can be compared on one counter."""
        data = _llama.llama_perf_context(self._live())
        out = {"p_eval_ms": data.t_p_eval_ms, "n_p_eval": data.n_p_eval, "eval_ms": data.t_eval_ms, "n_eval": data.n_eval}
        if reset:
            _llama.llama_perf_context_reset(self._ptr)
        return out

    def step(self, token: int) -> None:
        """Decode one generated token. Its logits stay in the context for the sampler: nothing is
        copied out and no batch is allocated, which is all the per-token work left to Python."""
        self._live()
        if not 0 <= token < self.model.n_vocab:
            raise InputError(f"token id {token} is outside the vocabulary (0..{self.model.n_vocab - 1})", self.model.path)
        if self.n_past + 1 > self.n_ctx:
            raise InputError(f"generation needs {self.n_past + 1} positions but the context holds {self.n_ctx}")
        if self._one is None:
            self._one = _llama.llama_batch_init(1, 0, 1)
        one = self._one
        one.token[0], one.pos[0], one.n_seq_id[0], one.logits[0] = token, self.n_past, 1, 1
        one.seq_id[0][0] = 0
        one.n_tokens = 1
        rc = _llama.llama_decode(self._ptr, one)
        if rc != 0:
            raise NativeError(f"llama_decode failed with {rc} ({native_log_tail()})", self.model.path)
        self.n_past += 1

    def feed_seq(self, seq: int, pos: int, segments: Sequence[Segment]) -> int:
        """`feed` into sequence `seq` from position `pos` (the same decodes, so the same numbers); the last
        logits stay in the context for the sampler (index -1). Returns the next free position."""
        for seg in segments:
            self._decode_segment(seg, False, seq=seq, pos=pos)
            pos += len(seg)
        return pos

    def _decode_segment(self, seg: Segment, want_logits: bool, **where) -> np.ndarray:
        """A segment to `_decode`: float rows are image embeddings, anything else token ids."""
        if isinstance(seg, np.ndarray) and np.issubdtype(seg.dtype, np.floating):
            return self._decode(None, seg, want_logits, **where)
        return self._decode([int(t) for t in seg], None, want_logits, **where)

    def step_rows(self, rows: Sequence[tuple[int, int, int]]) -> None:
        """One decode of (sequence, position, token) rows, every row's logits kept for the sampler
        (row i at index i): one generated token for each of several sequences at once. llama.cpp
        computes consecutive sequence ids together (3, 4, 5), so give the rows in sequence order."""
        self._live()
        if any(not 0 <= tok < self.model.n_vocab for _, _, tok in rows):
            raise InputError(f"a token id is outside the vocabulary (0..{self.model.n_vocab - 1})", self.model.path)
        batch = _llama.llama_batch_init(len(rows), 0, 1)
        try:
            for i, (seq, pos, tok) in enumerate(rows):
                batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = tok, pos, 1, 1
                batch.seq_id[i][0] = seq
            batch.n_tokens = len(rows)
            rc = _llama.llama_decode(self._ptr, batch)
            if rc != 0:
                raise NativeError(f"llama_decode failed with {rc} ({native_log_tail()})", self.model.path)
        finally:
            _llama.llama_batch_free(batch)

    def seq_copy(self, src: int, dst: int) -> None:
        """Make sequence `dst` a copy of all of `src` (its KV stream copied, nothing recomputed)."""
        _llama.llama_memory_seq_cp(_llama.llama_get_memory(self._live()), src, dst, 0, -1)

    def seq_forget(self, seq: int) -> None:
        """Drop every position of sequence `seq` (cells another sequence shares stay)."""
        _llama.llama_memory_seq_rm(_llama.llama_get_memory(self._live()), seq, -1, -1)

    def feed(self, segments: Sequence[Segment], *, all_logits: bool = False) -> np.ndarray:
        """Evaluate segments in order; logits for every position, or only the last one."""
        outs = []
        for i, seg in enumerate(segments):
            outs.append(self._decode_segment(seg, all_logits or i == len(segments) - 1))
        logits = np.concatenate([o for o in outs if len(o)], axis=0)
        return logits if all_logits else logits[-1:]

    def greedy(self, segments: Sequence[Segment], n_tokens: int, *, stop_at_eog: bool = True) -> list[int]:
        """Greedy continuation: argmax at every step (the reference decoding for parity checks)."""
        logits = self.feed(segments)[-1]
        out: list[int] = []
        for _ in range(n_tokens):
            tok = int(np.argmax(logits))
            if stop_at_eog and self.model.is_eog(tok):
                break
            out.append(tok)
            logits = self._decode([tok], None, False)[-1]
        return out
