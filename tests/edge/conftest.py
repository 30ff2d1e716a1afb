"""Edge-test helpers: one LLaVA-RLHF bundle opened for the OpenAI-API and server tests."""

from __future__ import annotations

import pytest

MAX_TOKENS = 8


@pytest.fixture(scope="module")
def rlhf_vision(make_bundle, tiny_llava_rlhf):
    """The tiny LLaVA-RLHF bundle (named `tiny-rlhf`, as /v1/models reports it), greedy, 8 tokens."""
    from factedge.edge.sampling import SamplingOptions
    from factedge.edge.vision_model import ModelOptions, VisionModel

    out = make_bundle(tiny_llava_rlhf, name="tiny-rlhf")
    options = ModelOptions(n_ctx=1024, threads=1, sampling=SamplingOptions(max_tokens=MAX_TOKENS))
    with VisionModel.open(out, options=options) as vision:
        yield vision
