"""Shared tiny checkpoints for every wing's tests.

Each fixture returns a `factedge.train.base.tiny_cache.TinyCheckpoint` (fields: layout, root, model_dir,
clip_dir, adapter_dir, image_size, projector, seed; `Path(ckpt)` is `ckpt.root`). Builds are cached
under $FACTEDGE_TEST_CACHE (default /work/main/.cache/tests) keyed by the builder's source, so a
rerun reuses them. The LLaMA vocab comes from the native build (`factedge.edge.native.spm_vocab()`)
or from $FACTEDGE_SPM_VOCAB.
"""

from __future__ import annotations

from typing import Callable

import pytest

from factedge.train.base.tiny_cache import TinyCheckpoint, cached_tiny


@pytest.fixture(scope="session")
def tiny_build() -> Callable[..., TinyCheckpoint]:
    """Factory: `tiny_build(layout, image_size=224, projector=None, sharded=None, seed=0,
    adapter_format="bin")` -> cached TinyCheckpoint, for variants the named fixtures do not cover."""
    return cached_tiny


@pytest.fixture(scope="session")
def tiny_llava_hf() -> TinyCheckpoint:
    """llava-hf hub folder, one model.safetensors, 224 px, mlp2x_gelu."""
    return cached_tiny("llava-hf", image_size=224)


@pytest.fixture(scope="session")
def tiny_llava_hf_sharded() -> TinyCheckpoint:
    """Same weights as tiny_llava_hf, in two safetensors shards + model.safetensors.index.json."""
    return cached_tiny("llava-hf", image_size=224, sharded=True)


@pytest.fixture(scope="session")
def tiny_llava() -> TinyCheckpoint:
    """Original LLaVA-v1.5 folder (2 fp16 .bin shards), mlp2x_gelu, 336 px; CLIP in `clip_dir`."""
    return cached_tiny("llava", image_size=336, projector="mlp2x_gelu")


@pytest.fixture(scope="session")
def tiny_llava_linear() -> TinyCheckpoint:
    """Original LLaVA folder without mm_projector_type (linear projector), 224 px."""
    return cached_tiny("llava", image_size=224, projector="linear")


@pytest.fixture(scope="session")
def tiny_llava_rlhf() -> TinyCheckpoint:
    """LLaVA-RLHF root: sft_model/ (bf16, linear), rlhf_lora_adapter_model/ (.bin), CLIP, 224 px."""
    return cached_tiny("llava-rlhf", image_size=224)


@pytest.fixture(scope="session")
def native_tools():
    """The patched llama.cpp build (its folder); tests that need it skip cleanly without it."""
    from factedge.edge.errors import NativeError
    from factedge.edge.native import native_dir

    try:
        return native_dir()
    except NativeError as exc:
        pytest.skip(f"native llama.cpp build not available: {exc.reason}")


@pytest.fixture(scope="session")
def make_bundle(tmp_path_factory, native_tools):
    """`make_bundle(tiny, name=None, **ConvertOptions fields) -> bundle folder`, converted once per
    session for each distinct request (defaults: quants ["Q8_0"], no verification)."""
    from pathlib import Path

    from factedge.convert.bundle import ConvertOptions, convert_checkpoint

    made: dict = {}

    def make(tiny: TinyCheckpoint, name: str | None = None, **options) -> Path:
        key = (str(tiny.root), name, tuple(sorted((k, str(v)) for k, v in options.items())))
        if key not in made:
            out = tmp_path_factory.mktemp("bundle") / (name or Path(tiny.root).name)
            convert_checkpoint(Path(tiny.root), out, ConvertOptions(**{"quants": ["Q8_0"], "verify": False, **options}))
            made[key] = out
        return made[key]

    return make


@pytest.fixture(scope="session")
def tiny_llava_smol_hf() -> TinyCheckpoint:
    """llava-hf folder on SmolLM2 (real BPE tokenizer + <image>, GQA 4/2, tied head), written by the
    installed transformers' save_pretrained; 224 px."""
    return cached_tiny("llava-hf", image_size=224, lm="smollm2")


@pytest.fixture(scope="session")
def tiny_llava_smol() -> TinyCheckpoint:
    """Original-LLaVA folder on SmolLM2 (tokenizer.json, no <image> token), CLIP beside it; 224 px."""
    return cached_tiny("llava", image_size=224, lm="smollm2")
