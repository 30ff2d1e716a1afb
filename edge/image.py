"""Image input: decode anything a user hands us, then LLaVA's pad-to-square + CLIP resize.

Both runtimes (llama.cpp and the PyTorch reference) must see the *same* pixels, so the resize is done
here, once, exactly as HF `CLIPImageProcessor` (PIL backend) does for LLaVA with
`image_aspect_ratio="pad"`: `expand2square` with the mean colour, shortest edge -> `image_size` with
PIL BICUBIC, centre crop. llama.cpp then receives an `image_size`-square RGB image, which its llava
preprocessing copies unchanged (same size -> no resize) and only normalises. The pad is applied for
every layout, llava-hf included (its own LlavaProcessor centre-crops non-square images instead), so
one image means one set of pixels whatever checkpoint it is run through.

Decoding policy (documented because it changes pixels):
- EXIF orientation is applied (`ImageOps.exif_transpose`), as a photo viewer shows the image;
- transparency (RGBA, LA, palette with a transparent index) is composited over WHITE, as HF's
  `convert_to_rgb` does, so llava-hf processors and factedge agree;
- grayscale, palette, CMYK, YCbCr... are converted to RGB by Pillow; 16-bit grayscale is scaled to 8 bit;
- animated images (GIF, APNG, WebP) use their first frame;
- images over `MAX_PIXELS` (decompression bombs), files over `MAX_FILE_BYTES` (checked before
  reading), FIFOs and devices, and anything Pillow cannot decode raise InputError.
No torch here: this module is part of the edge runtime.
"""

from __future__ import annotations

import base64
import binascii
import io
import stat
import struct
import warnings
import zlib
from functools import lru_cache
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from factedge.edge.errors import InputError

ImageSource = Union[str, Path, bytes, bytearray, memoryview, Image.Image, np.ndarray]

LLAVA_PAD_COLOR = (122, 116, 104)  # int(255 * CLIP mean), LLaVA's expand2square background
MAX_PIXELS = 64 * 1024 * 1024  # 64 Mpx: far above any camera photo, far below a bomb's claimed size
MAX_FILE_BYTES = 64 << 20  # an image file over 64 MiB is refused before it is read
_ALPHA_BACKGROUND = (255, 255, 255, 255)

# What Pillow raises on bad input besides OSError (UnidentifiedImageError, truncated files): plugins
# leak ValueError/SyntaxError/EOFError/struct.error/zlib.error/IndexError on malformed headers.
_DECODE_ERRORS = (
    OSError,
    ValueError,
    SyntaxError,
    EOFError,
    IndexError,
    struct.error,
    zlib.error,
    Image.DecompressionBombError,
    Image.DecompressionBombWarning,
    NotImplementedError,  # a format Pillow knows but cannot decode (some TIFF compressions, ...)
    TypeError,
    KeyError,
    MemoryError,
)


def _bytes_from_data_uri(uri: str) -> bytes:
    header, sep, payload = uri.partition(",")
    if not sep:
        raise InputError("malformed data: URI (no comma)")
    try:
        if header.endswith(";base64"):
            return base64.b64decode(payload, validate=True)
        from urllib.parse import unquote_to_bytes

        return unquote_to_bytes(payload)
    except (binascii.Error, ValueError) as exc:
        raise InputError(f"malformed data: URI ({exc})") from exc


def _open(src: ImageSource) -> tuple[Image.Image, Path | None]:
    """A PIL image (maybe lazy) and the path to blame in errors."""
    if isinstance(src, Image.Image):
        return src, None
    if isinstance(src, np.ndarray):
        return _from_array(src), None
    if isinstance(src, (bytes, bytearray, memoryview)):
        return Image.open(io.BytesIO(bytes(src))), None
    if isinstance(src, str) and src.startswith("data:"):
        return Image.open(io.BytesIO(_bytes_from_data_uri(src))), None
    if isinstance(src, (str, Path)):
        path = Path(src)
        return Image.open(io.BytesIO(_read_bounded(path))), path
    raise InputError(f"unsupported image source type {type(src).__name__}")


def _read_bounded(path: Path) -> bytes:
    """The bytes of a regular file no larger than MAX_FILE_BYTES: the size is checked before reading,
    and a FIFO or device is refused rather than read (it could block or never end)."""
    try:
        info = path.stat()
    except FileNotFoundError:
        raise InputError("image file not found", path) from None
    except OSError as exc:
        raise InputError(f"cannot read image: {exc.strerror or exc}", path) from exc
    if not stat.S_ISREG(info.st_mode):
        raise InputError("not a regular file", path)
    if info.st_size > MAX_FILE_BYTES:
        raise InputError(f"image file is {info.st_size} bytes, over the {MAX_FILE_BYTES} byte limit", path)
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise InputError(f"cannot read image: {exc.strerror or exc}", path) from exc
    if len(data) > MAX_FILE_BYTES:  # it grew while we read it
        raise InputError(f"image file is over the {MAX_FILE_BYTES} byte limit", path)
    return data


def _from_array(arr: np.ndarray) -> Image.Image:
    if arr.dtype != np.uint8:
        raise InputError(f"image array must be uint8, got {arr.dtype}")
    if arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4)):
        return Image.fromarray(np.ascontiguousarray(arr))  # uint8: L, RGB or RGBA by shape
    raise InputError(f"image array must be HxW or HxWx3 (or HxWx4), got shape {arr.shape}")


def _check_size(img: Image.Image, max_pixels: int, path: Path | None) -> None:
    w, h = img.size
    if w <= 0 or h <= 0:
        raise InputError(f"image has an empty size {w}x{h}", path)
    if w * h > max_pixels:
        raise InputError(f"image is {w}x{h} = {w * h} pixels, over the {max_pixels} limit "
                         "(decompression bomb?)", path)


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB with alpha composited over white; 16-bit/float grayscale brought to 8 bits first."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # round(x / 257) in integers: (x + 128) // 257 is the same for 0 <= x (257 is odd, so no ties),
        # and needs 4 bytes a pixel where float64 needed 8 plus temporaries
        arr = np.clip(np.asarray(img), 0, 65535).astype(np.int32)
        arr += 128
        arr //= 257
        img = Image.fromarray(arr.astype(np.uint8))
    elif img.mode == "F":
        arr = np.asarray(img)
        img = Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8))
    has_alpha = "A" in img.getbands() or "transparency" in img.info
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _ALPHA_BACKGROUND)
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def load_image(src: ImageSource, *, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode `src` (path, bytes, data: URI, PIL image, uint8 array) into a loaded RGB PIL image.

    Raises InputError (with the path when there is one) for missing files, non-images, truncated
    files and images over `max_pixels`; never lets a decoder exception escape.
    """
    path = Path(src) if isinstance(src, (str, Path)) and not str(src).startswith("data:") else None
    try:
        with warnings.catch_warnings():
            # Pillow only warns between MAX_IMAGE_PIXELS and twice that; we refuse both.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img, path = _open(src)
            _check_size(img, max_pixels, path)
            if getattr(img, "is_animated", False):
                img.seek(0)
            img.load()
            img = ImageOps.exif_transpose(img)
            _check_size(img, max_pixels, path)
            return _to_rgb(img)
    except InputError as exc:
        if exc.path is None and path is not None:
            raise InputError(exc.reason, path) from exc
        raise
    except UnidentifiedImageError as exc:
        raise InputError("not an image Pillow can read", path) from exc
    except _DECODE_ERRORS as exc:
        raise InputError(f"cannot decode image: {exc}", path) from exc


def expand2square(img: Image.Image, pad_color: tuple[int, int, int] = LLAVA_PAD_COLOR) -> Image.Image:
    """LLaVA's pad-to-square: paste the image centred (floor offset) on a square of `pad_color`."""
    width, height = img.size
    if width == height:
        return img
    side = max(width, height)
    square = Image.new(img.mode, (side, side), pad_color)
    square.paste(img, ((side - width) // 2, (side - height) // 2))
    return square


def _resize_shortest_edge(img: Image.Image, size: int) -> Image.Image:
    """HF `get_resize_output_image_size(default_to_square=False)`: short side -> size, long side truncated."""
    width, height = img.size
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
    return img.resize((new_w, new_h), resample=Image.Resampling.BICUBIC)


def _center_crop(arr: np.ndarray, size: int) -> np.ndarray:
    height, width = arr.shape[:2]
    top, left = (height - size) // 2, (width - size) // 2
    if top < 0 or left < 0:  # cannot happen after a shortest-edge resize to `size`
        raise InputError(f"image {width}x{height} smaller than the crop {size}")
    return arr[top : top + size, left : left + size]


def prepare_image(
    img: ImageSource, image_size: int, pad_color: tuple[int, int, int] = LLAVA_PAD_COLOR
) -> np.ndarray:
    """uint8 (image_size, image_size, 3): expand2square, then CLIPImageProcessor's resize + crop."""
    if not (isinstance(img, Image.Image) and img.mode == "RGB"):
        img = load_image(img)
    square = expand2square(img, tuple(pad_color))
    resized = _resize_shortest_edge(square, image_size)
    arr = _center_crop(np.asarray(resized, dtype=np.uint8), image_size)
    return np.ascontiguousarray(arr)


def normalize(arr: np.ndarray, mean, std) -> np.ndarray:
    """float32 CHW pixel values, computed like HF: x * (1/255) in float64 -> float32, (x - mean) / std.
    A uint8 image has 256 values per channel, so those go through a table of the same arithmetic
    (bit-identical, ~4x faster: this runs on every image the tower pretraining draws)."""
    if arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == len(mean) == len(std):
        table = _normalize_table(tuple(float(m) for m in mean), tuple(float(s) for s in std))
        out = np.empty((arr.shape[2], *arr.shape[:2]), np.float32)
        for c in range(arr.shape[2]):
            np.take(table[c], arr[:, :, c], out=out[c])
        return out
    return normalize_arithmetic(arr, mean, std)


def normalize_arithmetic(arr: np.ndarray, mean, std) -> np.ndarray:
    scaled = (arr.astype(np.float64) * (1 / 255)).astype(np.float32)
    mean32 = np.asarray(mean, dtype=np.float32)
    std32 = np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(((scaled - mean32) / std32).transpose(2, 0, 1))


@lru_cache(maxsize=8)
def _normalize_table(mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """float32 [channels, 256]: `normalize_arithmetic` of every uint8 value, per channel."""
    values = np.broadcast_to(np.arange(256, dtype=np.uint8)[:, None], (256, len(mean)))
    return np.ascontiguousarray(normalize_arithmetic(values[None], mean, std)[:, 0, :])
