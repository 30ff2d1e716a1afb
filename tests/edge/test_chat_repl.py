"""`factedge chat` and its ChatRepl, scripted through stdin: streaming turns with /image, /save as
JSON, /reset, one-line errors that leave the chat going, Ctrl-C stopping one answer, EOF exiting.

Needs the patched native build; skipped without it.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image


MAX_TOKENS = 8
Q1, Q2, Q3 = "What is in this picture?", "And what colour is it?", "Still there?"


@pytest.fixture(scope="module")
def bundle(make_bundle, tiny_llava_rlhf):
    return make_bundle(tiny_llava_rlhf, lora_mode="adapter")


@pytest.fixture(scope="module")
def vision(bundle):
    from factedge.edge.sampling import SamplingOptions
    from factedge.edge.vision_model import ModelOptions, VisionModel

    with VisionModel.open(bundle, options=ModelOptions(n_ctx=64, threads=1,
                                                     sampling=SamplingOptions(max_tokens=MAX_TOKENS))) as vc:
        yield vc


@pytest.fixture
def session(vision):
    from factedge.edge.chat import ChatSession, SessionOptions

    made = []

    def make():
        s = ChatSession(vision, SessionOptions(n_ctx=1024))  # what `factedge chat --n-ctx 1024` makes
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


@pytest.fixture(scope="module")
def png(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("img") / "cat.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8)).save(path)
    return path


def _cli(bundle, script: str, *extra: str):
    from factedge.edge.chat_cli import chat

    args = ["--model", str(bundle), "--max-tokens", str(MAX_TOKENS), "--threads", "1", "--n-ctx", "1024", *extra]
    return CliRunner().invoke(chat, args, input=script)


def test_scripted_chat_saves_resets_and_survives_errors(bundle, png, tmp_path, session):
    saved, cleared = tmp_path / "chat.json", tmp_path / "sub" / "empty.json"
    script = "\n".join([f"/image {png}", Q1, Q2, f"/save {saved}", "/nosuch", f"/image {tmp_path}/missing.png",
                        Q3, "/reset", f"/save {cleared}", "/quit", "never read"]) + "\n"
    result = _cli(bundle, script, "--stats")
    assert result.exit_code == 0, result.output
    out = result.output
    data = json.loads(saved.read_text())
    turns = data["turns"]
    assert [t["user"] for t in turns] == [Q1, Q2]
    assert turns[0]["images"][0]["path"] == str(png) and turns[1]["images"] == []
    assert all(t["assistant"] for t in turns) and data["system"].startswith("A chat between")
    # the streamed answers are exactly what the library answers
    ref = session()
    assert [ref.ask(Q1, png).text, ref.ask(Q2).text] == [t["assistant"] for t in turns]
    assert f"bot> {turns[0]['assistant']}\n" in out and f"bot> {turns[1]['assistant']}\n" in out

    errors = [line for line in out.splitlines() if "error:" in line]
    assert len(errors) == 2
    assert errors[0].endswith("error: unknown command /nosuch (/help lists them)")
    assert errors[1].endswith(f"error: not attached: {tmp_path}/missing.png: image file not found")
    assert out.count("bot> ") == 3  # the chat went on after both errors
    stats = [line for line in out.splitlines() if line.startswith("(image encode")]
    assert len(stats) == 3 and all("tok/s" in line for line in stats)
    assert stats[1].startswith("(image encode 0.00 s | prompt ")  # turn 2 has no image to encode
    assert [int(line.split("generation ")[1].split()[0]) for line in stats] == [MAX_TOKENS] * 3
    assert json.loads(cleared.read_text())["turns"] == []  # /reset cleared the history
    assert "never read" not in out


def test_eof_exits_cleanly_and_image_option_attaches(bundle, png):
    result = _cli(bundle, f"{Q1}\n", "--image", str(png))
    assert result.exit_code == 0 and result.output.count("bot> ") == 1
    assert "(image cat.png attached" in result.output
    bad = _cli(bundle, "/image\n/save\n", "--image", str(png.parent / "nope.png"))
    assert bad.exit_code == 0
    assert [line.split("error: ")[1] for line in bad.output.splitlines() if "error: " in line] == [
        f"not attached: {png.parent / 'nope.png'}: image file not found", "/image needs an argument (/help)",
        "/save needs an argument (/help)"]


def test_ctrl_c_stops_one_answer_and_the_chat_goes_on(session, png):
    from factedge.edge.repl import ChatRepl

    s = session()
    real = s.stream

    def interrupted(*args, **kw):  # the user presses Ctrl-C right after the first piece arrives
        it = real(*args, **kw)

        def gen():
            yield next(it)
            raise KeyboardInterrupt

        return gen()

    lines = iter([f"/image {png}", Q1, KeyboardInterrupt, Q2, "/adapter 0", "/adapter 2", "/adapter x", Q3])

    def read_line(prompt):
        line = next(lines, None)
        if line is None:
            raise EOFError
        if line is KeyboardInterrupt:
            raise KeyboardInterrupt
        if line == Q2:
            s.stream = real
        elif line == Q1:
            s.stream = interrupted
        return line

    out = io.StringIO()
    ChatRepl(s, out, read_line).run()
    text = out.getvalue()
    assert text.count(" [stopped]\n") == 1 and "(Ctrl-D or /quit to exit)" in text
    first = s.turns[0]
    assert first.assistant and len(s.last_answer.tokens) == MAX_TOKENS  # later turns ran in full
    assert f"bot> {first.assistant} [stopped]" in text  # the partial answer stayed in the history
    assert [t.user for t in s.turns] == [Q1, Q2, Q3] and s.ctx.n_past == len(s._kv)
    assert "(adapter scale 0)" in text and "error: adapter scale must be in [0, 1], not 2.0" in text
    assert "error: not a number: x" in text
    # the answer after the switch is the base model's on the same history
    from factedge.edge.adapters import set_adapter

    ref = session()
    set_adapter(ref, 0.0)
    for t in s.turns[:2]:
        ref.add_turn(t.user, t.assistant, t.images)
    assert ref.ask(Q3).text == s.turns[2].assistant


def test_a_bad_image_is_not_attached_and_later_questions_work(bundle, png, tmp_path):
    bad = tmp_path / "not-an-image.png"
    bad.write_bytes(b"this is text, not a PNG")
    result = _cli(bundle, f"/image {bad}\nWhat is it?\n/image {png}\nAnd now?\n")
    assert result.exit_code == 0
    errors = [line.split("error: ", 1)[1] for line in result.output.splitlines() if "error: " in line]
    assert errors == [f"not attached: {bad}: not an image Pillow can read"]
    assert result.output.count("bot> ") == 2 and "(image cat.png attached" in result.output
