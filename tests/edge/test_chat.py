"""ChatSession: later turns evaluate only what is new, reuse changes nothing, history edits and
context overflow behave, and images are encoded once per content (never wrongly reused).

Needs the patched native build; skipped without it.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from factedge.edge.errors import ContextFullError, InputError

SAMPLING_MAX = 8
Q1, Q2, Q3 = "What is in this picture?", "And what colour is it?", "Is it big?"


@pytest.fixture(scope="session", autouse=True)  # before the tiny checkpoints (they need its vocab)
def native(native_tools):
    return native_tools


@pytest.fixture(scope="module")
def vision(make_bundle, tiny_llava_hf):
    from factedge.edge.sampling import SamplingOptions
    from factedge.edge.vision_model import ModelOptions, VisionModel

    out = make_bundle(tiny_llava_hf)
    with VisionModel.open(out, options=ModelOptions(n_ctx=512, threads=1,
                                                  sampling=SamplingOptions(max_tokens=SAMPLING_MAX))) as vc:
        yield vc


@pytest.fixture
def session(vision):
    """Sessions whose numerics do not depend on how a prompt is split into batches: llama.cpp's CPU
    matmuls change path above 32 rows (logits move by ~0.6 of 38), which would make "reuse changes
    nothing" depend on luck rather than on the KV bookkeeping under test."""
    from factedge.edge.chat import ChatSession, SessionOptions

    made = []

    def make(**kw):
        s = ChatSession(vision, SessionOptions(**{"n_ctx": 1024, "kv_type": "f32", "n_batch": 32, **kw}))
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


def _image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (90, 120, 3), dtype=np.uint8)


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def encode_calls(vision, monkeypatch):
    calls = []
    real = vision.encoder.encode

    def counting(rgb):
        calls.append(rgb.shape)
        return real(rgb)

    monkeypatch.setattr(vision.encoder, "encode", counting)
    return calls


def test_second_turn_evaluates_only_the_new_turn(session, vision, encode_calls):
    s = session()
    a1 = s.ask(Q1, _image(0))
    a2 = s.ask(Q2)
    t1, t2 = a1.stats, a2.stats
    assert (t1.prompt_reused, t1.images_encoded, len(encode_calls)) == (0, 1, 1)
    assert t1.prompt_tokens == t1.prompt_total > 256  # the image alone is 256 positions
    assert t2.images_encoded == 0 and len(encode_calls) == 1  # not re-encoded
    assert t2.prompt_reused >= t1.prompt_total  # turn 1's whole prompt stayed in the KV cache
    assert t2.prompt_tokens == t2.prompt_total - t2.prompt_reused
    # at most the previous answer (re-tokenised) and the new turn's own tokens are evaluated
    new_turn = vision.model.tokenize(f" {a1.text}</s>USER: {Q2} ASSISTANT:", special=True)
    assert t2.prompt_tokens <= len(new_turn)
    assert t2.prompt_tokens * 10 < t1.prompt_tokens
    assert t2.prompt_tps > 0 and t2.generated_tokens == len(a2.tokens) > 0


@pytest.fixture
def scripted(monkeypatch):
    """Makes the next answer the given ids then EOS (a random tiny model's first token has no leading
    space, unlike a trained LLaVA's "▁The"); later answers are sampled as usual."""
    from factedge.edge import chat

    real = chat.Sampler

    def script(ids):
        class Scripted(real):
            def __init__(self, *a, **kw):
                super().__init__(*a, **kw)
                self.left = list(ids) + [2]  # 2: EOS

            def sample(self, ptr):
                return self.left.pop(0)

        monkeypatch.setattr(chat, "Sampler", Scripted)
        return lambda: monkeypatch.setattr(chat, "Sampler", real)

    return script


@pytest.mark.parametrize("spelling", ["canonical", "letters"])
def test_second_turn_reuses_the_whole_previous_turn(session, vision, scripted, spelling):
    """The previous answer is spliced in as the ids it was generated as: turn 2 evaluates exactly
    "</s>USER: <q> ASSISTANT:", and equals a fresh session when the answer re-tokenises the same."""
    from factedge.edge.sampling import SamplingOptions

    tok = vision.model.tokenize
    text = " The cat sat on a red mat."
    by_piece = {}
    for i in range(vision.model.n_vocab):
        by_piece.setdefault(vision.model.piece(i), i)
    ids = tok(text.strip()) if spelling == "canonical" else [by_piece[ch.encode()] for ch in text]
    assert b"".join(vision.model.piece(t) for t in ids) == text.encode()
    img = _image(0)
    s = session()
    done = scripted(ids)
    a1 = s.ask(Q1, img, SamplingOptions(max_tokens=len(ids) + 1))
    done()
    assert (a1.text, a1.tokens, s.turns[0].answer_ids) == (text.strip(), ids, ids)
    before = list(s._kv)
    a2 = s.ask(Q2)
    new_turn = tok(f"</s>USER: {Q2} ASSISTANT:")
    assert a2.stats.prompt_reused == len(before) == a1.stats.prompt_total + len(ids)
    assert a2.stats.prompt_tokens == len(new_turn) and s._kv[len(before):len(before) + len(new_turn)] == new_turn
    fresh = session()
    fresh.add_turn(Q1, a1.text, img)  # re-tokenised
    b2 = fresh.ask(Q2)
    if spelling == "canonical":  # same history, same ids: the same answer
        assert fresh._kv == s._kv and b2.tokens == a2.tokens and b2.text == a2.text
    else:  # only the previous answer's spelling differs
        assert len(fresh._kv) - len(b2.tokens) == len(s._kv) - len(a2.tokens) - len(ids) + len(tok(text.strip()))


def test_spelling_keeps_only_ids_that_spell_the_answer():
    from factedge.edge.chat import _spelling

    pieces = {1: b" The", 2: b" cat", 3: b".", 4: b"\n", 5: b" EN", 6: b"D", 7: b"  ", 8: b"rx"}
    piece = pieces.__getitem__
    assert _spelling([1, 2, 3], "The cat.", piece) == [1, 2, 3]
    assert _spelling([1, 2, 3, 4], "The cat.", piece) == [1, 2, 3]  # trailing newline stripped
    assert _spelling([1, 2, 5], "The cat", piece) == [1, 2]  # stop string "END" cut the answer
    assert _spelling([8, 2], "rx cat", piece) is None  # no leading space: the template's text differs
    assert _spelling([7, 1], "The", piece) is None  # extra leading space: re-tokenise the text
    assert _spelling([], "", piece) is None


def test_kv_reuse_changes_nothing(session):
    img = _image(0)
    s = session()
    a1 = s.ask(Q1, img)
    a2 = s.ask(Q2)
    fresh = session()
    fresh.add_turn(Q1, a1.text, img)
    b2 = fresh.ask(Q2)
    assert b2.stats.prompt_reused == 0 and b2.stats.prompt_total == a2.stats.prompt_total
    assert b2.tokens == a2.tokens and b2.text == a2.text
    assert len(a2.tokens) == SAMPLING_MAX  # a random tiny model rarely stops: the full answer compared


def test_stream_joined_equals_ask(session):
    s = session()
    s.ask(Q1, _image(1))
    pieces = list(s.stream(Q2))
    streamed = s.last_answer
    assert len(pieces) > 1 and "".join(pieces) == streamed.text
    s.pop()
    asked = s.ask(Q2)
    assert asked.text == streamed.text and asked.tokens == streamed.tokens
    assert [t.user for t in s.turns] == [Q1, Q2]


def test_abandoned_stream_keeps_the_chat_consistent(session):
    s = session()
    s.ask(Q1, _image(1))
    it = s.stream(Q2)
    first = next(it)
    it.close()  # the consumer stops early: the partial answer is the turn's answer
    assert first and s.turns[-1].assistant.startswith(first.strip())
    assert s.ctx.n_past == len(s._kv) and s.last_answer.stats.generated_tokens < SAMPLING_MAX
    stale = s.stream(Q3)
    a3 = s.ask(Q3)  # a newer turn rewinds the cache: the older stream generates nothing more
    assert list(stale) == [] and s.ctx.n_past == len(s._kv) and s.last_answer is a3
    fresh = session()
    for t in s.turns[:-1]:
        fresh.add_turn(t.user, t.assistant, t.images)  # ChatImages pass through
    assert fresh.ask(Q3).tokens == a3.tokens


def test_pop_and_edit_equal_a_fresh_session(session):
    img = _image(2)
    s = session()
    a1 = s.ask(Q1, img)
    s.ask(Q2)
    s.ask(Q3)
    popped = s.pop()
    assert popped.user == Q3 and len(s.turns) == 2
    assert s.ctx.n_past == len(s._kv) and s.ctx.n_past > 256  # KV truncated, the shared part kept
    again = s.ask("Is it small?")
    assert again.stats.prompt_reused > 256

    edited = s.edit(1, "What shape is it?")  # keeps turn 0, replaces turn 1, drops turn 2
    assert [t.user for t in s.turns] == [Q1, "What shape is it?"]
    assert edited.stats.images_encoded == 0 and edited.stats.prompt_reused > 256
    fresh = session()
    fresh.add_turn(Q1, a1.text, img)
    ref = fresh.ask("What shape is it?")
    assert edited.tokens == ref.tokens and edited.text == ref.text

    first = s.edit(0, "Describe it.")  # the image of turn 0 stays with it
    assert len(s.turns) == 1 and len(s.turns[0].images) == 1
    assert first.tokens == session().ask("Describe it.", img).tokens

    s.reset()
    assert (s.turns, s.ctx.n_past) == ([], 0)
    with pytest.raises(InputError):
        s.pop()


def _fill(s, n):
    return [s.ask(f"Question number {i}: tell me something about the number {i}, please.") for i in range(n)]


def test_overflow_error_is_typed_and_leaves_the_chat_usable(session):
    s = session(n_ctx=256, overflow="error")
    with pytest.raises(ContextFullError) as err:
        _fill(s, 20)
    n = len(s.turns)
    assert 2 <= n < 20 and "context holds 256" in str(err.value) and "\n" not in str(err.value)
    assert s.turns[-1].assistant is not None  # the refused turn did not enter the history
    s.pop()
    assert s.ask("Short?").stats.prompt_reused > 0


def test_overflow_drop_oldest_forgets_whole_turns(session):
    s = session(n_ctx=256, overflow="drop_oldest")
    answers = _fill(s, 12)
    dropped = sum(a.stats.dropped_turns for a in answers)
    assert dropped > 0 and len(s.turns) == 12 - dropped
    assert s.turns[0].user.startswith(f"Question number {dropped}:")
    last = answers[-1]
    assert last.stats.prompt_total + SAMPLING_MAX <= 256
    # what the model saw equals a fresh session given the kept history at once
    fresh = session(n_ctx=256)
    for t in s.turns[:-1]:
        fresh.add_turn(t.user, t.assistant)
    assert fresh.ask(s.turns[-1].user).tokens == last.tokens


def test_drop_oldest_carries_the_image_forward(session):
    img = _image(3)
    s = session(n_ctx=512, overflow="drop_oldest")
    s.ask(Q1, img)
    key = s.turns[0].images[0].key
    for i in range(12):
        s.ask(f"Tell me more, part {i}, about the colours and the shapes you see.")
    assert s.turns[0].user != Q1  # the image turn was dropped...
    assert [im.key for im in s.turns[0].images] == [key]  # ...but its image moved to the oldest kept turn


def test_a_new_image_is_encoded_and_the_same_image_is_not(session, vision, encode_calls):
    from factedge.edge.image import load_image, prepare_image

    img1, img2 = _image(4), _image(5)
    s = session(n_ctx=1536)  # four images of 256 positions
    s.ask(Q1, img1)
    a2 = s.ask("And this one?", img2)
    assert a2.stats.images_encoded == 1 and len(encode_calls) == 2
    e1, e2 = s.turns[0].images[0].embedding, s.turns[1].images[0].embedding
    fresh2 = vision.encoder.encode(prepare_image(load_image(img2), vision.image_size))
    assert np.array_equal(e2, fresh2) and not np.allclose(e1, e2)
    # the first image again, now as PNG bytes and a data URI: same pixels, no new encode
    import base64

    uri = "data:image/png;base64," + base64.b64encode(_png(img1)).decode()
    a3 = s.ask("Both again?", [_png(img1), uri])
    assert (a3.stats.images_encoded, a3.stats.images_reused, len(encode_calls)) == (0, 2, 3)
    assert a3.stats.prompt_total - s.turns[1].stats.prompt_total > 2 * 256  # two images in one turn
    assert len(s.turns[2].images) == 2


def test_image_marker_in_text_is_refused(session):
    with pytest.raises(InputError):
        session().ask("look: <image> here")


def test_the_one_shot_ask_refuses_the_marker_too(vision, tmp_path):
    """`factedge ask "<image> hi"` placed the image once per marker (or failed on a None image)."""
    from factedge.edge.cli import run

    with pytest.raises(InputError, match="image marker"):
        vision.ask("<image> hi")
    bundle = vision.files.model.parent
    assert run(["ask", "--model", str(bundle), "--max-tokens", "2", "<image> hi"]) == 2
