"""A LLaVA-family model loaded once: language model, image encoder, LoRA adapter. No context.

`VisionModel` opens a bundle (or explicit files, checked to pair) and holds what every conversation
on it shares; the conversations themselves (`edge.chat.ChatSession`) own a context, the KV reuse,
the image cache and the one generation loop. `VisionModel.ask` is a one-turn conversation, kept
open between calls (reset each time, no image kept) so a loop of one-shot questions does not
allocate a KV cache per question.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from factedge.edge.answer import Answer
from factedge.edge.bundle import BundleFiles, check_files, open_bundle
from factedge.edge.chat_format import ChatFormat, detect_format, named_format
from factedge.edge.errors import ConfigError
from factedge.edge.image import ImageSource
from factedge.edge.prompt import prompt_pieces, single_turn
from factedge.edge.image_encoder import ImageEncoder
from factedge.edge.runtime import ContextOptions, LoraAdapter, Model
from factedge.edge.sampling import SamplingOptions


@dataclass
class ModelOptions:
    n_ctx: int = 4096  # the default context of conversations on this model
    threads: int = 0
    n_gpu_layers: int = 0
    mmproj_on_gpu: bool = False
    adapter_scale: float = 1.0
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    chat_format: str | None = None  # a name in edge.chat_format.FORMATS; None: the GGUF's own template

    def check(self) -> "ModelOptions":
        """NaN fails every comparison, so each bound is written as `lo <= x <= hi`."""
        if not 0.0 <= self.adapter_scale <= 1.0:
            raise ConfigError(f"adapter scale must be in [0, 1], not {self.adapter_scale}")
        if not -1 <= self.n_gpu_layers < 1 << 20:
            raise ConfigError(f"n_gpu_layers must be -1 (all) or a count >= 0, not {self.n_gpu_layers}")
        ContextOptions(n_ctx=self.n_ctx, n_threads=self.threads).check()
        self.sampling.check()
        return self


def model_format(model: Model, name: str | None) -> ChatFormat:
    """The conversation format: the one named, else the one the GGUF's chat template renders like
    (errors name the file: a template is part of the model)."""
    if name is not None:
        return named_format(name)
    try:
        return detect_format(model.chat_template)
    except ConfigError as exc:
        raise ConfigError(exc.reason, model.path) from None


class VisionModel:
    """One model + mmproj (+ adapter), loaded once and shared by any number of ChatSessions."""

    def __init__(self, files: BundleFiles, options: ModelOptions | None = None):
        self.options = (options or ModelOptions()).check()
        self.files = files
        start = time.perf_counter()
        self.model = Model(files.model, n_gpu_layers=self.options.n_gpu_layers)
        self.encoder = ImageEncoder(files.mmproj, self.model, use_gpu=self.options.mmproj_on_gpu,
                                    n_threads=self.options.threads) if files.mmproj else None
        self.adapter = LoraAdapter(self.model, files.adapter) if files.adapter else None
        self.chat_format = model_format(self.model, self.options.chat_format)
        self.load_s = time.perf_counter() - start
        self._image_size = mmproj_image_size(files.mmproj) if files.mmproj else None
        self._one_shot = None  # the conversation `ask` reuses (made on first use)

    @property
    def image_size(self) -> int | None:
        """The square size the mmproj takes images at (None when opened without an mmproj)."""
        return self._image_size

    @classmethod
    def open(cls, bundle: Path | None = None, *, model: Path | None = None, mmproj: Path | None = None,
             adapter: Path | None = None, quant: str | None = None,
             options: ModelOptions | None = None) -> "VisionModel":
        if bundle is not None:
            if model is not None:
                raise ConfigError("give a bundle or model=, not both")
            return cls(open_bundle(bundle, quant=quant), options)
        if model is None:
            raise ConfigError("give a bundle folder or model= (and mmproj= for images)")
        files = BundleFiles(Path(model), Path(mmproj) if mmproj else None, Path(adapter) if adapter else None)
        check_files(files)
        return cls(files, options)

    def ask(self, question: str, image: ImageSource | None = None, sampling: SamplingOptions | None = None) -> Answer:
        """A one-turn chat: the same prompt ids and generation as a fresh ChatSession's first turn."""
        from factedge.edge.chat import ChatSession, SessionOptions

        if self._one_shot is None or self._one_shot.closed:
            self._one_shot = ChatSession(self, SessionOptions(n_ctx=self.options.n_ctx, image_cache=0))
        self._one_shot.reset()
        return self._one_shot.ask(question, image, sampling)

    def prompt_ids(self, question: str, n_images: int = 1) -> list[list[int] | None]:
        """The token-id pieces a one-turn chat feeds (None where an image goes): `edge.prompt`'s one
        tokenisation, shared with ChatSession."""
        return prompt_pieces(single_turn(question, n_images, self.chat_format), self.model.tokenize)

    def close(self) -> None:
        if self._one_shot is not None:
            self._one_shot.close()
        for part in (self.adapter, self.encoder, self.model):
            if part is not None:
                part.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def mmproj_image_size(path: Path) -> int:
    """clip.vision.image_size of an mmproj GGUF (header only)."""
    from factedge.edge.inspect import describe_gguf

    size = describe_gguf(path).metadata.get("clip.vision.image_size")
    if not size:
        raise ConfigError("mmproj has no clip.vision.image_size", path)
    return int(size)
