"""Ask a LLaVA-family GGUF about an image: the library behind `factedge ask`.

`VisionChat` opens a bundle (or explicit files), builds LLaVA's Vicuna v1 prompt with the image
where LLaVA puts it, encodes the image through libmtmd and generates with llama.cpp's samplers.
It reports the timings that matter on a laptop (load, image encode, prompt and generation speed).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from factedge.edge.bundle import BundleFiles, check_files, open_bundle
from factedge.edge.errors import ConfigError, InputError
from factedge.edge.image import ImageSource, load_image, prepare_image
from factedge.edge.prompt import count_images, prompt_pieces, single_turn
from factedge.edge.runtime import Context, ContextOptions, ImageEncoder, LoraAdapter, Model
from factedge.edge.sampling import Sampler, SamplingOptions
from factedge.edge.text_stream import TextStream


@dataclass
class ChatOptions:
    n_ctx: int = 4096
    threads: int = 0
    n_gpu_layers: int = 0
    mmproj_on_gpu: bool = False
    adapter_scale: float = 1.0
    sampling: SamplingOptions = field(default_factory=SamplingOptions)

    def check(self) -> "ChatOptions":
        """NaN fails every comparison, so each bound is written as `lo <= x <= hi`."""
        if not 0.0 <= self.adapter_scale <= 1.0:
            raise ConfigError(f"adapter scale must be in [0, 1], not {self.adapter_scale}")
        if not -1 <= self.n_gpu_layers < 1 << 20:
            raise ConfigError(f"n_gpu_layers must be -1 (all) or a count >= 0, not {self.n_gpu_layers}")
        ContextOptions(n_ctx=self.n_ctx, n_threads=self.threads).check()
        self.sampling.check()
        return self


@dataclass
class Stats:
    load_s: float = 0.0
    image_encode_s: float = 0.0
    prompt_tokens: int = 0
    prompt_s: float = 0.0
    generated_tokens: int = 0
    generate_s: float = 0.0

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / self.prompt_s if self.prompt_s else 0.0

    @property
    def generate_tps(self) -> float:
        return self.generated_tokens / self.generate_s if self.generate_s else 0.0


@dataclass
class Answer:
    text: str
    tokens: list[int]
    stats: Stats
    finish_reason: str  # "stop" (EOS or a stop string) | "length"


class VisionChat:
    """One model + mmproj (+ adapter) loaded once; each `ask` is an independent single-turn chat."""

    def __init__(self, files: BundleFiles, options: ChatOptions | None = None):
        self.options = (options or ChatOptions()).check()
        self.files = files
        start = time.perf_counter()
        self.model = Model(files.model, n_gpu_layers=self.options.n_gpu_layers)
        self.encoder = ImageEncoder(files.mmproj, self.model, use_gpu=self.options.mmproj_on_gpu,
                                    n_threads=self.options.threads) if files.mmproj else None
        self.adapter = LoraAdapter(self.model, files.adapter) if files.adapter else None
        self.ctx = Context(self.model, ContextOptions(n_ctx=self.options.n_ctx, n_threads=self.options.threads))
        if self.adapter:
            self.ctx.set_adapters([(self.adapter, self.options.adapter_scale)])
        self.load_s = time.perf_counter() - start
        self._image_size = _mmproj_image_size(files.mmproj) if files.mmproj else None

    @property
    def image_size(self) -> int | None:
        """The square size the mmproj takes images at (None when opened without an mmproj)."""
        return self._image_size

    @classmethod
    def open(cls, bundle: Path | None = None, *, model: Path | None = None, mmproj: Path | None = None,
             adapter: Path | None = None, quant: str | None = None,
             options: ChatOptions | None = None) -> "VisionChat":
        if bundle is not None:
            if model is not None:
                raise ConfigError("give a bundle or model=, not both")
            return cls(open_bundle(bundle, quant=quant), options)
        if model is None:
            raise ConfigError("give a bundle folder or model= (and mmproj= for images)")
        files = BundleFiles(Path(model), Path(mmproj) if mmproj else None, Path(adapter) if adapter else None)
        check_files(files)
        return cls(files, options)

    def ask(self, question: str, image: ImageSource | None = None,
            sampling: SamplingOptions | None = None) -> Answer:
        if image is not None and self.encoder is None:
            raise ConfigError("this model was opened without an mmproj; it cannot take images")
        sampling = sampling or self.options.sampling
        stats = Stats(load_s=self.load_s)
        pieces = self.prompt_ids(question, n_images=int(image is not None))
        if count_images(pieces) != int(image is not None):
            raise InputError("a question must not contain the image marker '<image>' itself "
                             "(the image is placed before the question; give it as the image)")
        segments = []
        for piece in pieces:
            if piece is None:
                start = time.perf_counter()
                pixels = prepare_image(load_image(image), self._image_size)
                segments.append(self.encoder.encode(pixels))
                stats.image_encode_s = time.perf_counter() - start
            else:
                segments.append(piece)
        self.ctx.reset()
        start = time.perf_counter()
        self.ctx.feed(segments)
        stats.prompt_s = time.perf_counter() - start
        stats.prompt_tokens = self.ctx.n_past
        tokens, text, reason = self._generate(sampling, stats)
        return Answer(text, tokens, stats, reason)

    def prompt_ids(self, question: str, n_images: int = 1) -> list[list[int] | None]:
        """The token-id pieces `ask` feeds (None where an image goes): the same ids a fresh
        ChatSession's first turn evaluates (`edge.prompt.prompt_pieces`, one tokenisation for both)."""
        return prompt_pieces(single_turn(question, n_images=n_images), self.model.tokenize)

    def _generate(self, sampling: SamplingOptions, stats: Stats) -> tuple[list[int], str, str]:
        sampler = Sampler(sampling, self.model.n_vocab)
        text = TextStream(sampling.stop)
        tokens: list[int] = []
        start = time.perf_counter()
        reason = "length"
        try:
            while len(tokens) < sampling.max_tokens:
                tok = sampler.sample(self.ctx.ptr)
                if self.model.is_eog(tok):
                    reason = "stop"
                    break
                tokens.append(tok)
                text.push(self.model.piece(tok))  # incremental: no re-decoding of the whole answer per token
                if text.stopped:
                    reason = "stop"
                    break
                self.ctx.step(tok)
        finally:
            sampler.close()
        stats.generate_s = time.perf_counter() - start
        stats.generated_tokens = len(tokens)
        text.finish()
        return tokens, text.text, reason

    def close(self) -> None:
        for part in (self.ctx, self.adapter, self.encoder, self.model):
            if part is not None:
                part.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _mmproj_image_size(path: Path) -> int:
    from factedge.edge.inspect import describe_gguf

    size = describe_gguf(path).metadata.get("clip.vision.image_size")
    if not size:
        raise ConfigError("mmproj has no clip.vision.image_size", path)
    return int(size)
