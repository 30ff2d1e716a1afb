"""A damaged or forged GGUF is refused with a one-line error before llama.cpp sees it.

Each case below crashes llama.cpp when handed over as is (a GGML_ASSERT abort, a division by zero,
or a null tensor dereferenced at the first image): the file is patched in place the way a bit flip
or a hostile edit would, and must be refused by name. Objects used after close() raise ClosedError.

Needs the patched native build; skipped without it.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest

from factedge.edge.errors import ClosedError, ConfigError, CorruptFileError
from factedge.edge.gguf_preflight import preflight

_FMT = {4: "<I", 5: "<i", 10: "<Q"}


def patch_key(path, key: str, value: int) -> None:
    """Overwrite the integer value of metadata `key` in place (same type, same size)."""
    data = bytearray(path.read_bytes())
    name = key.encode()
    at = data.find(struct.pack("<Q", len(name)) + name)
    assert at > 0, key
    at += 8 + len(name)
    (vtype,) = struct.unpack_from("<I", data, at)
    struct.pack_into(_FMT[vtype], data, at + 4, value)
    path.write_bytes(bytes(data))


def replace_bytes(path, old: bytes, new: bytes, count: int = 1) -> None:
    assert len(old) == len(new)
    data = path.read_bytes()
    assert old in data, old
    path.write_bytes(data.replace(old, new, count))


@pytest.fixture(scope="module")
def bundle(make_bundle, tiny_llava_rlhf):
    return make_bundle(tiny_llava_rlhf, name="tiny-rlhf", quants=[], mmproj_types=["f16"])


MMPROJ_CASES = {
    "patch_size 0": lambda p: patch_key(p, "clip.vision.patch_size", 0),
    "patch_size not dividing": lambda p: patch_key(p, "clip.vision.patch_size", 13),
    "image_size 0": lambda p: patch_key(p, "clip.vision.image_size", 0),
    "embedding_length 0": lambda p: patch_key(p, "clip.vision.embedding_length", 0),
    "head_count 0": lambda p: patch_key(p, "clip.vision.attention.head_count", 0),
    "block_count huge": lambda p: patch_key(p, "clip.vision.block_count", 10**6),
    "block_count beyond the stored layers": lambda p: patch_key(p, "clip.vision.block_count", 3),
    "flipped byte in a tensor name": lambda p: replace_bytes(p, b"v.blk.1.attn_q.weight", b"v.blk.1.attn_q.weighu"),
    "flipped byte in the projector name": lambda p: replace_bytes(p, b"mm.0.weight", b"mm.0.weighT"),
}
MODEL_CASES = {
    "block_count 0": lambda p: patch_key(p, "llama.block_count", 0),
    "embedding_length 0": lambda p: patch_key(p, "llama.embedding_length", 0),
    "head_count 0": lambda p: patch_key(p, "llama.attention.head_count", 0),
    "head_count_kv not dividing": lambda p: patch_key(p, "llama.attention.head_count_kv", 3),
    "duplicate vocab token": lambda p: replace_bytes(p, b"<0x01>", b"<0x00>"),
    "bos id outside the vocab": lambda p: patch_key(p, "tokenizer.ggml.bos_token_id", 40000),
    "flipped byte in a tensor name": lambda p: replace_bytes(p, b"blk.1.ffn_up.weight", b"blk.1.ffn_up.weighT"),
}


@pytest.mark.parametrize("case", sorted(MMPROJ_CASES))
def test_tampered_mmproj_is_refused(bundle, tmp_path, case):
    path = tmp_path / "mmproj.gguf"
    shutil.copy(bundle / "mmproj-f16.gguf", path)
    preflight(path, "mmproj")  # the original passes
    MMPROJ_CASES[case](path)
    with pytest.raises(CorruptFileError, match="refused before loading") as info:
        preflight(path, "mmproj")
    assert info.value.path == path


@pytest.mark.parametrize("case", sorted(MODEL_CASES))
def test_tampered_model_is_refused(bundle, tmp_path, case):
    path = tmp_path / "model.gguf"
    shutil.copy(bundle / "model-f16.gguf", path)
    preflight(path, "model")
    MODEL_CASES[case](path)
    with pytest.raises(CorruptFileError, match="refused before loading"):
        preflight(path, "model")


def test_the_cli_gives_one_line_not_a_crash(bundle, tmp_path, png_file):
    """The same damage through `factedge ask` in a child process: exit code 2, one line, no signal."""
    model, mmproj = tmp_path / "model.gguf", tmp_path / "mmproj.gguf"
    shutil.copy(bundle / "model-f16.gguf", model)
    shutil.copy(bundle / "mmproj-f16.gguf", mmproj)
    replace_bytes(mmproj, b"v.blk.1.attn_q.weight", b"v.blk.1.attn_q.weighu")
    code = "import sys; from factedge.edge.cli import main; sys.argv[0] = 'factedge'; main()"
    proc = subprocess.run([sys.executable, "-c", code, "ask", "--model", str(model), "--mmproj", str(mmproj),
                           "--image", str(png_file), "hi"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"factedge: error: {mmproj}: refused before loading: tensor v.blk.1")


@pytest.fixture(scope="module")
def png_file(tmp_path_factory):
    from PIL import Image

    path = tmp_path_factory.mktemp("png") / "x.png"
    Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(path)
    return path


def test_closed_objects_raise_instead_of_crashing(bundle, png_file):
    from factedge.edge.chat import ChatSession, SessionOptions
    from factedge.edge.sampling import SamplingOptions
    from factedge.edge.vision_model import ModelOptions, VisionModel

    vision = VisionModel.open(bundle, options=ModelOptions(n_ctx=512, sampling=SamplingOptions(max_tokens=2)))
    session = ChatSession(vision, SessionOptions(n_ctx=512))
    stream = session.stream("Hello")
    session.close()
    with pytest.raises(ClosedError):
        list(stream)
    with pytest.raises(ClosedError):
        session.ask("Again?")
    vision.close()
    vision.close()  # twice is fine
    with pytest.raises(ClosedError):
        vision.ask("What is it?", png_file)
    with pytest.raises(ClosedError):
        vision.model.tokenize("hi")
    with pytest.raises(ClosedError):
        vision.encoder.encode(np.zeros((224, 224, 3), np.uint8))


@pytest.mark.parametrize("options, words", [
    (dict(n_ctx=1), "n_ctx"), (dict(n_ctx=0), "n_ctx"), (dict(adapter_scale=float("nan")), "adapter scale"),
    (dict(adapter_scale=1e30), "adapter scale"), (dict(threads=-3), "n_threads"),
])
def test_bad_runtime_options_are_refused_before_loading(bundle, options, words):
    from factedge.edge.vision_model import ModelOptions, VisionModel

    with pytest.raises(ConfigError, match=words):
        VisionModel.open(bundle, options=ModelOptions(**options))
