"""BatchSession: several questions decoded together give the one-at-a-time answers token for token,
share the system prompt and each distinct image, free their sequences, and refuse bad requests one
by one. The tiny models are random, so their greedy tokens hang on near-ties: any change in the
numerics of a row would show as a different token.

Needs the patched native build; skipped without it.
"""

from __future__ import annotations

import numpy as np
import pytest

from factedge.edge.errors import ConfigError, ContextFullError, InputError

MAX_TOKENS = 8  # rlhf_vision's default (tests/edge/conftest.py)


@pytest.fixture(scope="session", autouse=True)
def native(native_tools):
    return native_tools


@pytest.fixture(scope="module")
def vision(rlhf_vision):
    return rlhf_vision


def _image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (40, 60, 3), dtype=np.uint8)


def _requests():
    from factedge.edge.batch import Request
    from factedge.edge.sampling import SamplingOptions

    images = [_image(i) for i in range(3)]
    qs = ["What is in the image?", "Describe the shapes.", "Is there a red circle?", "How many objects?"]
    out = [Request(q, images[i % 3]) for i, q in enumerate(qs * 2)]
    out.append(Request("Hello, who are you?"))  # no image: no shared prefix
    out.append(Request("Short answer please.", images[1], SamplingOptions(max_tokens=3)))
    out.append(Request("Sample something.", images[2], SamplingOptions(temperature=0.8, top_k=20, seed=7,
                                                                      max_tokens=MAX_TOKENS)))
    return out


@pytest.fixture(scope="module")
def serial(vision):
    return [vision.ask(r.question, r.image, r.sampling) for r in _requests()]


@pytest.mark.parametrize("parallel, image_prefixes", [(1, 2), (3, 0), (3, 1), (8, 2), (8, 4)])
def test_batched_answers_are_the_serial_ones(vision, serial, parallel, image_prefixes):
    """Three images over 11 questions: with 1 kept image prompt every image change evicts, with 4 none do."""
    from factedge.edge.batch import BatchOptions, BatchSession

    with BatchSession(vision, BatchOptions(parallel=parallel, seq_ctx=400, image_prefixes=image_prefixes)) as batch:
        outcomes = batch.answer_all(_requests())
    assert [o.index for o in outcomes] == list(range(len(serial)))
    for o, ref in zip(outcomes, serial):
        assert o.error is None
        assert o.answer.tokens == ref.tokens and o.answer.text == ref.text
        assert o.answer.finish_reason == ref.finish_reason
    assert sum(len(o.answer.tokens) for o in outcomes) > 5 * len(serial)  # real generation, not early stops


@pytest.mark.parametrize("image_prefixes", [0, 2])
def test_prefix_and_images_are_shared(vision, image_prefixes):
    """The system prompt is evaluated once for all; with kept image prompts the image rows are too."""
    from factedge.edge.batch import BatchOptions, BatchSession, Request

    img = _image(11)
    options = BatchOptions(parallel=4, seq_ctx=400, image_prefixes=image_prefixes)
    with BatchSession(vision, options) as batch:
        outcomes = batch.answer_all([Request(f"Question {i}?", img) for i in range(6)])
        system = len(batch._image_prefix())
    stats = [o.answer.stats for o in outcomes]
    assert sum(s.images_encoded for s in stats) == 1 and sum(s.images_reused for s in stats) == 5
    n_image = vision.encoder.encode(np.zeros((4, 4, 3), np.uint8)).shape[0]
    shared = system + (n_image if image_prefixes else 0)
    assert system > 20 and all(s.prompt_reused == shared for s in stats)
    assert all(s.prompt_tokens == s.prompt_total - shared for s in stats)


def test_sequences_are_freed_for_the_next_questions(vision, serial):
    """Far more questions than the pool could hold at once: each finished one must give its cells back."""
    from factedge.edge.batch import BatchOptions, BatchSession

    reqs = _requests()[:4] * 10
    with BatchSession(vision, BatchOptions(parallel=2, seq_ctx=340)) as batch:
        outcomes = batch.answer_all(reqs)
    assert all(o.error is None for o in outcomes)
    assert [o.answer.tokens for o in outcomes] == [r.tokens for r in serial[:4]] * 10


def test_a_bad_request_fails_alone(vision, serial, tmp_path):
    from factedge.edge.batch import BatchOptions, BatchSession, Request
    from factedge.edge.sampling import SamplingOptions

    good = _requests()[:3]
    reqs = [good[0], Request("?", tmp_path / "missing.png"), good[1],
            Request("?", _image(0), SamplingOptions(max_tokens=200)), Request("<image> twice", _image(0)), good[2]]
    with BatchSession(vision, BatchOptions(parallel=2, seq_ctx=400)) as batch:
        outcomes = batch.answer_all(reqs)
    assert isinstance(outcomes[1].error, InputError) and "missing.png" in str(outcomes[1].error)
    assert isinstance(outcomes[3].error, ContextFullError) and "seq_ctx" in str(outcomes[3].error)
    assert isinstance(outcomes[4].error, InputError)
    assert [outcomes[i].answer.tokens for i in (0, 2, 5)] == [r.tokens for r in serial[:3]]


def test_stopping_early_leaves_the_session_usable(vision, serial):
    from factedge.edge.batch import BatchOptions, BatchSession

    with BatchSession(vision, BatchOptions(parallel=3, seq_ctx=400)) as batch:
        stream = batch.run(_requests())
        next(stream)
        stream.close()  # abandoned with questions in flight
        outcomes = batch.answer_all(_requests())
    assert [o.answer.tokens for o in outcomes] == [r.tokens for r in serial]


def test_options_are_checked(vision):
    from factedge.edge.batch import BatchOptions, BatchSession

    for bad in (BatchOptions(parallel=0), BatchOptions(parallel=1000), BatchOptions(seq_ctx=4),
                BatchOptions(kv_type="q2"), BatchOptions(image_prefixes=-1), BatchOptions(parallel=200, image_prefixes=60),
                BatchOptions(seq_ctx=100_000)):  # past the model's trained context
        with pytest.raises(ConfigError):
            BatchSession(vision, bad)


def test_one_call_mode_decodes_all_rows_together(vision, serial):
    """exact=False: one llama.cpp call per step for all live sequences. Its rows may round differently
    on another CPU's kernels, so only what rounding cannot move is compared: the first token (from the
    prompt's logits), the answer lengths and stop reasons (max_tokens bound every answer here)."""
    from factedge.edge.batch import EXACT_ROWS, BatchOptions, BatchSession

    calls = {}
    for exact in (True, False):
        with BatchSession(vision, BatchOptions(parallel=8, seq_ctx=400, exact=exact)) as batch:
            outcomes = batch.answer_all(_requests())
            calls[exact] = batch.stats.decode_steps
        assert [o.answer.tokens[0] for o in outcomes] == [r.tokens[0] for r in serial]
        assert [len(o.answer.tokens) for o in outcomes] == [len(r.tokens) for r in serial]
    assert EXACT_ROWS == 1 and calls[False] * 3 < calls[True]


def test_every_sequence_holds_seq_ctx_positions(vision):
    """One KV stream per sequence, the system prompt's and the kept images' included: a question that
    fills almost all of seq_ctx is answered (the context once held (parallel + kept) * seq_ctx + the
    prompt for parallel + kept + 1 streams, so a stream got fewer than seq_ctx positions)."""
    from factedge.edge.batch import BatchOptions, BatchSession, Request
    from factedge.edge.sampling import SamplingOptions

    img = _image(21)
    prompt = vision.ask("Fill it.", img, SamplingOptions(max_tokens=1)).stats.prompt_total
    seq_ctx = 513  # just past a multiple of 256: llama.cpp's padding of a stream cannot make up a shortfall
    assert prompt < seq_ctx - 100
    sampling = SamplingOptions(max_tokens=seq_ctx - prompt)  # prompt + answer == seq_ctx exactly
    want = vision.ask("Fill it.", img, sampling)
    with BatchSession(vision, BatchOptions(parallel=4, seq_ctx=seq_ctx, image_prefixes=4)) as batch:
        out = batch.answer_all([Request("Fill it.", img, sampling), Request("Fill it.", img, sampling)])
    assert [o.error for o in out] == [None, None]
    assert out[0].answer.tokens == out[1].answer.tokens == want.tokens and len(want.tokens) > 50
