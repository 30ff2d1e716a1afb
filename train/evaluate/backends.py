"""Who answers the benchmark: a bundle through the edge runtime, or the PyTorch reference.

Both answer (image, question) greedily as a fresh single-turn Vicuna v1 chat (edge/prompt.py, the one
template) and keep the timings, so a table can show quality and tokens/s side by side. Only
`TorchBackend` imports torch, and only when constructed: the bundle path runs on a base install.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Protocol, Sequence

from factedge.edge.errors import ConfigError


@dataclass
class Generation:
    text: str
    tokens: list[int]
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int = 0  # positions evaluated for the prompt (reused KV not counted)
    prompt_s: float = 0.0
    generate_s: float = 0.0
    image_s: float = 0.0


@dataclass
class Speed:
    """Running totals over a benchmark run; tokens/s is generation (decode) speed."""

    items: int = 0
    generated_tokens: int = 0
    generate_s: float = 0.0
    prompt_tokens: int = 0
    prompt_s: float = 0.0
    image_s: float = 0.0
    load_s: float = 0.0

    def add(self, g: Generation) -> None:
        self.items += 1
        self.generated_tokens += len(g.tokens)
        self.generate_s += g.generate_s
        self.prompt_tokens += g.prompt_tokens
        self.prompt_s += g.prompt_s
        self.image_s += g.image_s

    def to_dict(self) -> dict:
        return {"items": self.items, "generated_tokens": self.generated_tokens, "generate_s": self.generate_s,
                "tokens_per_s": self.generated_tokens / self.generate_s if self.generate_s else 0.0,
                "prompt_tokens": self.prompt_tokens, "prompt_s": self.prompt_s,
                "prompt_tokens_per_s": self.prompt_tokens / self.prompt_s if self.prompt_s else 0.0,
                "image_encode_s": self.image_s, "load_s": self.load_s}


Job = tuple[Path, str]  # (image, question)
ItemProgress = Callable[[int, int], None]  # (answered, total)


class Backend(Protocol):
    label: str

    def answer(self, image: Path, question: str, max_tokens: int) -> Generation: ...

    def answer_many(self, jobs: Sequence[Job], max_tokens: int, progress: ItemProgress | None = None) -> list[Generation]:
        """Every job's answer, in job order (an edge backend decodes several at once)."""

    def speed(self) -> dict: ...

    def describe(self) -> dict: ...

    def close(self) -> None: ...


@dataclass
class EdgeOptions:
    threads: int = 0
    n_gpu_layers: int = 0
    n_ctx: int = 2048
    # keep the KV prefix (system prompt + image) between items on the same image; exact because
    # n_batch <= 32 makes llama.cpp's numerics independent of how the prompt is split
    reuse_prefix: bool = True
    image_cache: int = 8
    parallel: int = 4  # questions decoded together (edge/batch.py); 1: one at a time on one ChatSession


class EdgeBackend:
    """A bundle (one quant) through VisionModel + ChatSession: image embeddings reused across items."""

    def __init__(self, bundle: Path, quant: str | None = None, *, threads: int = 0, n_gpu_layers: int = 0,
                 options: EdgeOptions | None = None):
        from factedge.edge.chat import ChatSession, SessionOptions
        from factedge.edge.vision_model import ModelOptions, VisionModel

        self.options = options or EdgeOptions(threads=threads, n_gpu_layers=n_gpu_layers)
        o = self.options
        self.bundle = Path(bundle)
        self.vision = VisionModel.open(self.bundle, quant=quant,
                                      options=ModelOptions(n_ctx=o.n_ctx, threads=o.threads, n_gpu_layers=o.n_gpu_layers,
                                                          mmproj_on_gpu=o.n_gpu_layers != 0))
        try:
            self.session = ChatSession(self.vision, SessionOptions(n_ctx=o.n_ctx, n_batch=32 if o.reuse_prefix else 512,
                                                                   image_cache=o.image_cache))
        except BaseException:
            self.vision.close()
            raise
        self.quant = self.vision.files.quant
        self.label = f"{self.bundle.name}:{self.quant}"
        self._speed = Speed(load_s=self.vision.load_s)
        self._batch = None  # the BatchSession of answer_many, made on first use

    def answer(self, image: Path, question: str, max_tokens: int) -> Generation:
        from factedge.edge.sampling import SamplingOptions

        if self.options.reuse_prefix:
            self.session.turns.clear()  # a fresh chat; the KV cache keeps what the new prompt shares
        else:
            self.session.reset()
        a = self.session.ask(question, image, SamplingOptions(temperature=0.0, max_tokens=max_tokens))
        s = a.stats
        g = Generation(a.text, list(a.tokens), a.finish_reason, s.prompt_tokens, s.prompt_s, s.generate_s,
                       s.image_encode_s)
        self._speed.add(g)
        return g

    def answer_many(self, jobs: Sequence[Job], max_tokens: int, progress: ItemProgress | None = None) -> list[Generation]:
        """Through the batch engine when `parallel` > 1 (the same tokens as `answer`: n_batch 32 both
        ways), else one by one. Speed then counts decode seconds, not each answer's overlapping wall time."""
        if self.options.parallel <= 1:
            return one_by_one(self, jobs, max_tokens, progress)
        from factedge.edge.batch import BatchOptions, BatchSession, Request
        from factedge.edge.sampling import SamplingOptions

        o = self.options
        if self._batch is None:
            self._batch = BatchSession(self.vision, BatchOptions(parallel=o.parallel, seq_ctx=o.n_ctx // 2,
                                                                 n_batch=32 if o.reuse_prefix else 512,
                                                                 image_cache=o.image_cache))
        stats, before = self._batch.stats, replace(self._batch.stats)
        sampling = SamplingOptions(temperature=0.0, max_tokens=max_tokens)
        out: list[Generation | None] = [None] * len(jobs)
        for done, outcome in enumerate(self._batch.run(Request(q, image, sampling) for image, q in jobs), 1):
            if outcome.error is not None:
                raise outcome.error
            a = outcome.answer
            out[outcome.index] = Generation(a.text, list(a.tokens), a.finish_reason, a.stats.prompt_tokens,
                                            a.stats.prompt_s, 0.0, a.stats.image_encode_s)
            if progress:
                progress(done, len(jobs))
        for g in out:
            self._speed.add(g)
        self._speed.generate_s += stats.decode_s - before.decode_s
        return out

    def speed(self) -> dict:
        return self._speed.to_dict()

    def describe(self) -> dict:
        f = self.vision.files
        return {"kind": "edge", "label": self.label, "bundle": str(self.bundle), "quant": self.quant,
                "model_file": f.model.name, "size_bytes": f.model.stat().st_size,
                "mmproj_file": f.mmproj.name if f.mmproj else None,
                "mmproj_bytes": f.mmproj.stat().st_size if f.mmproj else 0,
                "adapter_file": f.adapter.name if f.adapter else None}

    def close(self) -> None:
        if self._batch is not None:
            self._batch.close()
        self.session.close()
        self.vision.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class TorchBackend:
    """The PyTorch reference (convert.reference.TorchLlava), greedy, with LLaVA's tokenisation."""

    def __init__(self, checkpoint_path: Path, adapter: str | None = "peft", *, vision_tower: Path | None = None,
                 threads: int = 0, dtype: str = "float32", image_cache: int = 8):
        import torch

        from factedge.convert.layouts import load_checkpoint
        from factedge.convert.reference import TorchLlava
        from factedge.convert.chat_template import gguf_chat_template
        from factedge.convert.vocab_read import hf_tokenizer
        from factedge.edge.chat_format import detect_format

        if adapter not in (None, "peft", "merged"):
            raise ConfigError(f"adapter must be peft, merged or none, not {adapter!r}")
        if threads > 0:
            torch.set_num_threads(threads)
        start = time.perf_counter()
        self.path = Path(checkpoint_path)
        ckpt = load_checkpoint(self.path, vision_tower=vision_tower)
        adapter = adapter if ckpt.adapter_dir is not None else None
        self.ref = TorchLlava.from_checkpoint(ckpt, adapter=adapter, dtype=getattr(torch, dtype))
        self.tokenizer = hf_tokenizer(ckpt.tokenizer_dir)
        self.fmt = detect_format(gguf_chat_template(Path(ckpt.tokenizer_dir)))  # what its GGUF will say
        self.adapter = adapter
        self.label = f"pytorch{' (' + adapter + ')' if adapter else ''}"
        self._images: OrderedDict[str, object] = OrderedDict()
        self._image_cache = image_cache
        self._speed = Speed(load_s=time.perf_counter() - start)

    def _segments(self, image: Path, question: str, stats: Generation) -> list:
        from factedge.edge.prompt import single_turn, split_at_images

        pieces = split_at_images(single_turn(question, fmt=self.fmt),
                                 lambda text, bos: self.tokenizer(text, add_special_tokens=bos).input_ids)
        key = str(Path(image).resolve())
        if key not in self._images:
            start = time.perf_counter()
            self._images[key] = self.ref.image_embeddings(image)
            stats.image_s = time.perf_counter() - start
            while len(self._images) > self._image_cache:
                self._images.popitem(last=False)
        self._images.move_to_end(key)
        return [self._images[key] if p is None else p for p in pieces]

    def answer(self, image: Path, question: str, max_tokens: int) -> Generation:
        import torch

        from factedge.convert.reference import CACHE_KW

        g = Generation("", [], "length")
        segments = self._segments(image, question, g)
        eos = self.ref.ckpt.text.eos_token_id
        with torch.inference_mode():
            embeds = self.ref.input_embeddings(segments)
            start = time.perf_counter()
            out = self.ref.lm(inputs_embeds=embeds, use_cache=True)
            g.prompt_tokens, g.prompt_s = int(embeds.shape[1]), time.perf_counter() - start
            start = time.perf_counter()
            while len(g.tokens) < max_tokens:
                token = int(out.logits[0, -1].float().argmax())
                if token == eos:
                    g.finish_reason = "stop"
                    break
                g.tokens.append(token)
                if len(g.tokens) == max_tokens:
                    break
                out = self.ref.lm(input_ids=torch.tensor([[token]]), use_cache=True,
                                  **{CACHE_KW: getattr(out, CACHE_KW)})
            g.generate_s = time.perf_counter() - start
        g.text = self.tokenizer.decode(g.tokens, skip_special_tokens=True).strip()
        self._speed.add(g)
        return g

    def answer_many(self, jobs: Sequence[Job], max_tokens: int, progress: ItemProgress | None = None) -> list[Generation]:
        return one_by_one(self, jobs, max_tokens, progress)

    def speed(self) -> dict:
        return self._speed.to_dict()

    def describe(self) -> dict:
        return {"kind": "torch", "label": self.label, "checkpoint": str(self.path), "adapter": self.adapter,
                "quant": "PyTorch", "size_bytes": None}

    def close(self) -> None:
        self._images.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def one_by_one(backend, jobs: Sequence[Job], max_tokens: int, progress: ItemProgress | None) -> list[Generation]:
    """`answer_many` for a backend that answers one question at a time."""
    out = []
    for image, question in jobs:
        out.append(backend.answer(image, question, max_tokens))
        if progress:
            progress(len(out), len(jobs))
    return out


def parse_model_spec(spec: str) -> tuple[Path, str | None]:
    """"BUNDLE" or "BUNDLE:QUANT" (the quant after the last colon, when BUNDLE:QUANT is not itself a folder)."""
    spec = spec.strip()
    if Path(spec).is_dir() or ":" not in spec:
        return Path(spec), None
    path, quant = spec.rsplit(":", 1)
    if not quant or "/" in quant or "\\" in quant:
        return Path(spec), None
    return Path(path), quant
