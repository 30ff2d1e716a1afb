"""Converter-test helpers: checkpoint folders from the shared tiny fixtures, GGUF read-back.

The LLaMA vocab comes from the native build (installed with it) or $FACTEDGE_SPM_VOCAB.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest


def _native_vocab() -> Path | None:
    from factedge.edge.errors import NativeError
    from factedge.edge.native import spm_vocab

    try:
        return spm_vocab()
    except NativeError:
        return None


@pytest.fixture(scope="session")
def vocab_gguf() -> Path:
    path = _native_vocab() or Path(os.environ.get("FACTEDGE_SPM_VOCAB", ""))
    if not path.is_file():
        pytest.skip("LLaMA SPM vocab GGUF not available")
    return path


@pytest.fixture(scope="session")
def llava_hf_dir(tiny_llava_hf_sharded) -> Path:
    """llava-hf, two safetensors shards, 224 px (vocab padded to 32064)."""
    return Path(tiny_llava_hf_sharded.root)


@pytest.fixture(scope="session")
def llava_dir(tiny_llava) -> Path:
    """Original LLaVA-v1.5 (fp16 .bin shards, mlp2x_gelu, 336 px, CLIP folder beside it)."""
    return Path(tiny_llava.root)


@pytest.fixture(scope="session")
def rlhf_dir(tiny_llava_rlhf) -> Path:
    """LLaVA-RLHF root: sft_model/ (bf16, linear projector) + rlhf_lora_adapter_model/ (r 64, alpha 16)."""
    return Path(tiny_llava_rlhf.root)


def gguf_tensors(path: Path) -> dict[str, np.ndarray]:
    """name -> float32 array in torch order (F32/F16 as stored, BF16 widened)."""
    from gguf import GGMLQuantizationType as Q
    from gguf import GGUFReader

    out = {}
    for t in GGUFReader(path).tensors:
        shape = tuple(int(d) for d in reversed(t.shape))
        if t.tensor_type == Q.BF16:
            bits = np.asarray(t.data).view(np.uint16).astype(np.uint32) << 16
            out[t.name] = bits.view(np.float32).reshape(shape)
        else:
            out[t.name] = np.asarray(t.data).astype(np.float32).reshape(shape)
    return out


def gguf_fields(path: Path) -> dict:
    from gguf import GGUFReader

    return {k: f.contents() for k, f in GGUFReader(path).fields.items()}


def gguf_types(path: Path) -> dict[str, str]:
    from gguf import GGUFReader

    return {t.name: t.tensor_type.name for t in GGUFReader(path).tensors}


@pytest.fixture(scope="session")
def gguf_io() -> SimpleNamespace:
    """GGUF read-back helpers: .tensors(path), .fields(path), .types(path)."""
    return SimpleNamespace(tensors=gguf_tensors, fields=gguf_fields, types=gguf_types)


@pytest.fixture(scope="session")
def convert_and_verify():
    """`convert_and_verify(request, tmp_path_factory, options, n_greedy=32)` -> (checkpoint, bundle,
    verify report) for the tiny-checkpoint fixture `request.param`, converted with ConvertOptions(**options)."""
    return _convert_and_verify


def _convert_and_verify(request, tmp_path_factory, options: dict, n_greedy: int = 32):
    from factedge.convert.bundle import ConvertOptions, convert_checkpoint
    from factedge.convert.layouts import load_checkpoint
    from factedge.convert.verify import VerifyOptions, verify_bundle

    tiny = request.getfixturevalue(request.param)
    ckpt = load_checkpoint(tiny.root)
    out = tmp_path_factory.mktemp(request.param) / "bundle"
    convert_checkpoint(tiny.root, out, ConvertOptions(**options), ckpt=ckpt)
    _, report = verify_bundle(out, ckpt, VerifyOptions(n_greedy=n_greedy))
    return ckpt, out, report
