"""Image embeddings keyed by the bytes the encoder sees, so an image is encoded once however given.

The key is a sha256 of the prepared pixels (path, bytes, PIL image or array alike); embeddings are kept
in a small LRU. A chat keeps the images its history holds on top of the cache (`ChatImage` objects are
passed through); the batch engine asks the cache for each request's image.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np

from factedge.edge.answer import TurnStats
from factedge.edge.errors import ConfigError
from factedge.edge.image import ImageSource, load_image, prepare_image

if TYPE_CHECKING:
    from factedge.edge.vision_model import VisionModel


@dataclass(frozen=True, eq=False)
class ChatImage:
    key: str  # sha256 of the prepared pixels
    embedding: np.ndarray  # [n_tokens, n_embd]


class ImageCache:
    """`size` embeddings kept (LRU); `encode` counts encoded vs reused images into a TurnStats."""

    def __init__(self, vision: "VisionModel", size: int, before_encode: Callable[[], None] | None = None):
        """`before_encode`: called before each encode, e.g. the session's Context.pause_workers."""
        if size < 0:
            raise ConfigError("image_cache must be >= 0")
        self.vision, self.size, self._before_encode = vision, size, before_encode
        self._images: OrderedDict[str, ChatImage] = OrderedDict()

    def encode(self, source: ImageSource | ChatImage, stats: TurnStats) -> ChatImage:
        if isinstance(source, ChatImage):
            return source
        if self.vision.encoder is None:
            raise ConfigError("this model was opened without an mmproj; it cannot take images")
        pixels = prepare_image(load_image(source), self.vision.image_size)
        key = hashlib.sha256(repr(pixels.shape).encode() + pixels.tobytes()).hexdigest()
        if key in self._images:
            self._images.move_to_end(key)
            stats.images_reused += 1
            return self._images[key]
        if self._before_encode is not None:
            self._before_encode()
        start = time.perf_counter()
        image = ChatImage(key, self.vision.encoder.encode(pixels))
        stats.image_encode_s += time.perf_counter() - start
        stats.images_encoded += 1
        self._images[key] = image
        while len(self._images) > self.size:
            self._images.popitem(last=False)
        return image
