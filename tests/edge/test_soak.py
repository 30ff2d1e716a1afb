"""Soak in small (issue #3): 60 image turns in one session, every turn's embedding is its own image's,
cache hits, misses, resets, KV reuse and drop_oldest all happen, and RSS stays flat after warm-up.

Runs the loop of bench/speed/soak.py (loaded from its file path). Needs the patched native build.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from factedge.edge.errors import NativeError

SOAK_PY = Path(__file__).resolve().parents[2] / "bench" / "speed" / "soak.py"


def _load_soak():
    spec = importlib.util.spec_from_file_location("factedge_bench_soak", SOAK_PY)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


soak = _load_soak()


@pytest.fixture(scope="module")
def vision(tmp_path_factory, tiny_llava_hf):
    from factedge.edge.native import native_dir

    try:
        native_dir()
    except NativeError as exc:
        pytest.skip(f"native llama.cpp build not available: {exc.reason}")
    from factedge.convert.bundle import ConvertOptions, convert_checkpoint
    from factedge.edge.vision_model import ModelOptions, VisionModel

    out = tmp_path_factory.mktemp("soak") / "bundle"
    convert_checkpoint(Path(tiny_llava_hf.root), out, ConvertOptions(quants=["Q8_0"], verify=False))
    with VisionModel.open(out, options=ModelOptions(n_ctx=1024, threads=1)) as vc:
        yield vc


def test_60_turns_no_wrong_reuse_and_flat_rss(vision):
    opts = soak.SoakOptions(turns=60, max_tokens=2, warmup=20, every=10, bound_mib=16.0)
    res = soak.run_soak(vision, opts)
    assert res.wrong == []
    # the schedule really exercised what it claims to
    assert res.encoded >= 8 and res.reused >= 20  # misses (period 7 > LRU 4) and hits (period 2)
    assert res.resets >= 10 and res.dropped >= 5 and res.prompt_reused > 0
    assert [t for t, _ in res.rss] == [10, 20, 30, 40, 50, 60]
    assert res.growth_mib <= 16.0, soak.report(res)
    assert res.passed


def test_check_catches_a_swapped_embedding(vision):
    """The per-turn check is not blind: another colour's embedding, or a perturbed one, is reported."""
    from types import SimpleNamespace

    from factedge.edge.image import load_image, prepare_image

    pixels = [prepare_image(load_image(soak.colour_image(c)), vision.image_size) for c in soak.PALETTE[:3]]
    refs = [vision.encoder.encode(p) for p in pixels]
    res = soak.SoakResult()
    ok = SimpleNamespace(images=[SimpleNamespace(embedding=refs[0].copy())])
    soak._check_turn(res, 0, 0, ok, refs[0], refs)
    assert res.wrong == []
    swapped = SimpleNamespace(images=[SimpleNamespace(embedding=refs[1])])
    soak._check_turn(res, 1, 0, swapped, refs[0], refs)
    assert len(res.wrong) == 2 and "colour 1's embedding" in res.wrong[1]
    nudged = refs[0].copy()
    nudged[0, 0] = np.nextafter(nudged[0, 0], np.float32(np.inf))
    soak._check_turn(res, 2, 0, SimpleNamespace(images=[SimpleNamespace(embedding=nudged)]), refs[0], refs)
    assert len(res.wrong) == 3 and "differs from a fresh encode" in res.wrong[2]
