"""edge.image: pixels equal HF CLIPImageProcessor's after LLaVA's expand2square; decoding policy."""

from __future__ import annotations

import base64
import io
import struct
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

from factedge.edge.errors import InputError
from factedge.edge.image import LLAVA_PAD_COLOR, load_image, normalize, prepare_image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth gradients plus noise: bicubic resampling has something to do."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / max(width - 1, 1), y * 255 / max(height - 1, 1), (x + y) % 256], axis=-1)
    noisy = base + rng.normal(0, 20, base.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def _llava_expand2square(img: Image.Image, color) -> Image.Image:
    """LLaVA's own expand2square (llava/mm_utils.py), restated independently of edge.image."""
    w, h = img.size
    if w == h:
        return img
    if w > h:
        out = Image.new(img.mode, (w, w), color)
        out.paste(img, (0, (w - h) // 2))
    else:
        out = Image.new(img.mode, (h, h), color)
        out.paste(img, ((h - w) // 2, 0))
    return out


def _hf_pixels(img: Image.Image, size: int) -> np.ndarray:
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    proc = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    square = _llava_expand2square(img, tuple(int(m * 255) for m in proc.image_mean))
    return np.asarray(proc(images=square, return_tensors="np")["pixel_values"][0])


@pytest.mark.parametrize(
    "size,width,height",
    [(224, 224, 224), (224, 448, 448), (336, 336, 336), (336, 672, 672), (224, 300, 200), (224, 201, 333),
     (336, 640, 427), (336, 97, 150)],
)
def test_prepare_image_matches_hf_clip_processor(size, width, height):
    img = _photo(width, height, seed=width * height)
    ours = normalize(prepare_image(img, size), CLIP_MEAN, CLIP_STD)
    ref = _hf_pixels(img, size)
    assert ours.shape == ref.shape == (3, size, size)
    assert ours.dtype == np.float32
    assert float(np.abs(ours - ref).max()) <= 1e-6


def test_normalize_table_is_bit_identical_to_the_arithmetic():
    """uint8 images go through a per-channel table; float input (and any other shape) through the
    arithmetic. Both must give exactly the same float32 values: training weights depend on them."""
    rng = np.random.default_rng(7)
    arr = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    arr[0, :3] = [[0, 0, 0], [255, 255, 255], [128, 1, 254]]
    fast = normalize(arr, CLIP_MEAN, CLIP_STD)
    slow = normalize(arr.astype(np.float64), CLIP_MEAN, CLIP_STD)  # float input: the arithmetic path
    assert fast.dtype == slow.dtype == np.float32 and fast.shape == (3, 37, 53) and fast.flags.c_contiguous
    assert np.array_equal(fast, slow)
    # the values themselves, worked by hand for channel 0 at 0 and 255: (x/255 - mean) / std
    assert fast[0, 0, 0] == np.float32((np.float32(0.0) - np.float32(CLIP_MEAN[0])) / np.float32(CLIP_STD[0]))
    assert fast[0, 0, 1] == np.float32((np.float32(1.0) - np.float32(CLIP_MEAN[0])) / np.float32(CLIP_STD[0]))


def test_prepare_image_is_uint8_square_and_native_size_is_untouched():
    img = _photo(224, 224)
    out = prepare_image(img, 224)
    assert out.dtype == np.uint8 and out.shape == (224, 224, 3)
    assert np.array_equal(out, np.asarray(img))  # already model size: no resampling at all


def test_non_square_is_padded_with_the_mean_colour():
    img = Image.new("RGB", (200, 100), (10, 200, 30))
    out = prepare_image(img, 224)
    assert tuple(out[2, 112]) == LLAVA_PAD_COLOR  # top band is padding
    assert tuple(out[-3, 112]) == LLAVA_PAD_COLOR  # bottom band too
    assert tuple(out[112, 112]) == (10, 200, 30)
    custom = prepare_image(img, 224, pad_color=(0, 0, 0))
    assert tuple(custom[2, 112]) == (0, 0, 0)


def _exif_rotated_jpeg() -> bytes:
    """40x20 JPEG, left half red / right half blue, tagged 'rotate 90 CW to view' (orientation 6)."""
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = (255, 0, 0)
    arr[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()


def test_exif_orientation_is_applied(tmp_path):
    path = tmp_path / "rotated.jpg"
    path.write_bytes(_exif_rotated_jpeg())
    img = load_image(path)
    assert img.size == (20, 40) and img.mode == "RGB"
    arr = np.asarray(img).astype(int)
    # rotated 90 degrees clockwise: the left (red) half ends up on top
    assert arr[5, 10, 0] > 200 and arr[5, 10, 2] < 60
    assert arr[35, 10, 2] > 200 and arr[35, 10, 0] < 60


def test_palette_image_converts_to_its_colours():
    img = Image.new("P", (8, 8))
    img.putpalette([255, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 6))
    img.paste(1, (0, 0, 4, 8))
    out = np.asarray(load_image(img))
    assert tuple(out[0, 0]) == (0, 255, 0) and tuple(out[0, 7]) == (255, 0, 0)


def test_palette_transparency_composites_over_white():
    img = Image.new("P", (4, 4))
    img.putpalette([10, 20, 30, 40, 50, 60] + [0] * (256 * 3 - 6))
    img.paste(1, (0, 0, 2, 4))
    buf = io.BytesIO()
    img.save(buf, format="PNG", transparency=0)  # index 0 transparent
    out = np.asarray(load_image(buf.getvalue()))
    assert tuple(out[0, 3]) == (255, 255, 255)
    assert tuple(out[0, 0]) == (40, 50, 60)


@pytest.mark.parametrize("mode,value,alpha,expected", [
    ("LA", (100,), 0, (255, 255, 255)),
    ("LA", (100,), 255, (100, 100, 100)),
    ("LA", (100,), 128, (177, 177, 177)),
    ("RGBA", (200, 0, 0), 0, (255, 255, 255)),
    ("RGBA", (200, 0, 0), 255, (200, 0, 0)),
    ("RGBA", (0, 0, 0), 51, (204, 204, 204)),
])  # fmt: skip
def test_alpha_composites_over_white(mode, value, alpha, expected):
    img = Image.new(mode, (3, 3), value + (alpha,))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    out = np.asarray(load_image(buf.getvalue())).astype(int)
    assert np.abs(out[1, 1] - np.array(expected)).max() <= 1


def test_cmyk_jpeg_becomes_rgb():
    img = Image.new("CMYK", (6, 6), (0, 255, 255, 0))  # pure red in CMYK
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=100)
    out = load_image(buf.getvalue())
    assert out.mode == "RGB"
    r, g, b = np.asarray(out)[3, 3].astype(int)
    assert r > 230 and g < 30 and b < 30


def test_grayscale_and_16bit_grayscale():
    gray = load_image(np.full((5, 7), 77, np.uint8))
    assert gray.mode == "RGB" and gray.size == (7, 5) and tuple(np.asarray(gray)[0, 0]) == (77, 77, 77)
    buf = io.BytesIO()
    Image.fromarray(np.full((4, 4), 65535 // 2, np.uint16)).save(buf, format="PNG")
    out = np.asarray(load_image(buf.getvalue())).astype(int)
    assert np.abs(out[0, 0] - 127).max() <= 1


def test_animated_gif_uses_first_frame():
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    with Image.open(io.BytesIO(buf.getvalue())) as probe:
        assert probe.n_frames == 2
    out = np.asarray(load_image(buf.getvalue())).astype(int)
    assert out[4, 4, 0] > 240 and out[4, 4, 2] < 15


def test_numpy_rgb_and_data_uri_and_path_agree(tmp_path):
    img = _photo(30, 20)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    path = tmp_path / "x.png"
    path.write_bytes(buf.getvalue())
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    ref = np.asarray(img)
    for src in (np.asarray(img), path, str(path), buf.getvalue(), uri, img):
        assert np.array_equal(np.asarray(load_image(src)), ref), type(src)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height (8-bit RGB) with a tiny IDAT: a decompression-bomb header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def test_decompression_bomb_is_an_input_error_with_the_path(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header_only(100_000, 100_000))
    with pytest.raises(InputError) as info:
        load_image(path)
    assert info.value.path == path and "bomb" in str(info.value)
    # between our limit and Pillow's own: still refused, by our check
    path2 = tmp_path / "big.png"
    path2.write_bytes(_png_header_only(9000, 8000))
    with pytest.raises(InputError, match="pixels"):
        load_image(path2)
    with pytest.raises(InputError, match="pixels"):
        load_image(_photo(40, 40), max_pixels=1000)


@pytest.mark.parametrize("payload", [b"", b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\0" * 40, b"GIF89a\xff\xff"])
def test_garbage_bytes_are_input_errors(tmp_path, payload):
    with pytest.raises(InputError):
        load_image(payload)
    path = tmp_path / "garbage.jpg"
    path.write_bytes(payload)
    with pytest.raises(InputError) as info:
        load_image(path)
    assert info.value.path == path
    assert str(path) in str(info.value)


def test_truncated_png_is_an_input_error(tmp_path):
    buf = io.BytesIO()
    _photo(64, 64).save(buf, format="PNG")
    path = tmp_path / "cut.png"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(InputError) as info:
        load_image(path)
    assert info.value.path == path


def test_bad_sources_are_input_errors(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(InputError, match="uint8"):
        load_image(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(InputError, match="shape"):
        load_image(np.zeros((4, 4, 2), np.uint8))
    with pytest.raises(InputError, match="data: URI"):
        load_image("data:image/png;base64,@@@")
    with pytest.raises(InputError, match="unsupported"):
        load_image(12345)  # type: ignore[arg-type]


def test_edge_image_does_not_import_torch():
    import subprocess

    code = "import sys, factedge.edge.image; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# -- hostile files ---------------------------------------------------------------------------------


def test_a_fifo_is_refused_not_read(tmp_path):
    import os

    from factedge.edge.errors import InputError
    from factedge.edge.image import load_image

    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)  # reading it would block forever: no writer
    with pytest.raises(InputError, match="not a regular file"):
        load_image(fifo)


def test_an_oversized_file_is_refused_before_it_is_read(tmp_path, monkeypatch):
    import builtins

    from factedge.edge import image as image_module
    from factedge.edge.errors import InputError

    big = tmp_path / "big.png"
    with open(big, "wb") as fh:  # sparse: 2 GiB on paper, nothing on disk
        fh.truncate(2 << 30)
    opened = []
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda p, *a, **k: opened.append(p) or real_open(p, *a, **k))
    with pytest.raises(InputError, match="over the 67108864 byte limit"):
        image_module.load_image(big)
    assert big not in opened and str(big) not in opened


def test_a_decoder_that_cannot_decode_gives_an_input_error(tmp_path, monkeypatch):
    from PIL import Image

    from factedge.edge.errors import InputError
    from factedge.edge.image import load_image

    path = tmp_path / "x.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(path)

    def unsupported(self):
        raise NotImplementedError("compression 42 is not supported")  # what Pillow's TIFF plugin raises

    monkeypatch.setattr(Image.Image, "load", unsupported)
    with pytest.raises(InputError, match="cannot decode image: compression 42"):
        load_image(path)


def test_sixteen_bit_images_convert_exactly_as_before_in_integers():
    """(x + 128) // 257 equals round(x / 257) for every 16-bit value: the float path it replaced."""
    from PIL import Image

    from factedge.edge.image import load_image

    values = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    got = np.asarray(load_image(Image.fromarray(values)))[..., 0]  # mode I;16
    want = np.clip(np.round(values.astype(np.float64) / 257.0), 0, 255).astype(np.uint8)
    assert np.array_equal(got, want)
