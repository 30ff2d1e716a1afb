"""create_chat_completion: OpenAI / llama-cpp-python message shapes map onto ChatSession turns, and the
answer is exactly what ChatSession gives for the same conversation (one template, one evaluator).

Needs the patched native build; skipped without it.
"""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from factedge.edge.errors import InputError

MAX = 8  # rlhf_vision (tests/edge/conftest.py) generates at most 8 tokens
EXACT = {"n_ctx": 1024, "kv_type": "f32", "n_batch": 32}  # batch-shape independent numerics (see test_chat)


@pytest.fixture(scope="module")
def vision(rlhf_vision):
    return rlhf_vision


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    rng = np.random.default_rng(3)
    path = tmp_path_factory.mktemp("img") / "red.png"
    arr = np.zeros((80, 120, 3), np.uint8)
    arr[..., 0] = 200
    arr[20:60, 30:90] = rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)
    return path


def data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def complete(vision, messages, **kw):
    from factedge.edge.chat import SessionOptions
    from factedge.edge.openai_api import create_chat_completion

    kw = {"temperature": 0, "max_tokens": MAX, **kw}
    return create_chat_completion(vision, messages, session_options=SessionOptions(**EXACT), **kw)


def reference(vision, turns, question, image=None, system=None):
    """The same chat through ChatSession directly."""
    from factedge.edge.chat import ChatSession, SessionOptions

    opts = SessionOptions(**EXACT, **({"system": system} if system else {}))
    with ChatSession(vision, opts) as s:
        for user, assistant, im in turns:
            s.add_turn(user, assistant, im)
        return s.ask(question, image)


def test_parse_message_shapes():
    from factedge.edge.openai_api import parse_messages

    system, turns = parse_messages([
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image_url", "image_url": "data:x"},
                                     {"type": "text", "text": "What?"}]},
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": "Colour?"},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "file:///tmp/a.png"}},
                                     {"type": "text", "text": "And this?"}]},
    ])
    assert system == "Be brief."
    assert [(t.user, t.images, t.assistant) for t in turns] == [
        ("What?", ["data:x"], "A cat."), ("Colour?\nAnd this?", ["/tmp/a.png"], None)]


@pytest.mark.parametrize("messages, words", [
    ([], "non-empty"),
    ([{"role": "tool", "content": "x"}], "role"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "last message"),
    ([{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}], "follow a user"),
    ([{"role": "user", "content": [{"type": "audio", "x": 1}]}], "unsupported content part"),
    ([{"role": "user", "content": 5}], "string or a list"),
])
def test_bad_messages_raise_input_error(messages, words):
    from factedge.edge.openai_api import parse_messages

    with pytest.raises(InputError, match=words):
        parse_messages(messages)


def test_http_image_url_is_refused_offline():
    from factedge.edge.openai_api import RemoteImageError, parse_messages

    for url in ("http://example.com/a.png", {"url": "HTTPS://example.com/a.png"}):
        with pytest.raises(RemoteImageError, match="offline"):
            parse_messages([{"role": "user", "content": [{"type": "image_url", "image_url": url}]}])
    assert issubclass(RemoteImageError, InputError)


def test_completion_matches_chat_session(vision, image_file):
    msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_uri(image_file)}},
                                         {"type": "text", "text": "What is in this picture?"}]}]
    out = complete(vision, msgs)
    ref = reference(vision, [], "What is in this picture?", image_file)
    assert out["object"] == "chat.completion" and out["id"].startswith("chatcmpl-")
    assert out["model"] == "tiny-rlhf" and isinstance(out["created"], int)
    choice = out["choices"][0]
    assert choice["index"] == 0 and choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == ref.text
    assert choice["finish_reason"] == ref.finish_reason
    assert out["usage"] == {"prompt_tokens": ref.stats.prompt_total, "completion_tokens": len(ref.tokens),
                            "total_tokens": ref.stats.prompt_total + len(ref.tokens)}
    assert out["usage"]["completion_tokens"] > 0
    assert out["usage"]["prompt_tokens"] > 256  # the image's 256 positions are in the prompt
    # the same image as a file path gives the same answer
    path_msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": str(image_file)},
                                              {"type": "text", "text": "What is in this picture?"}]}]
    assert complete(vision, path_msgs)["choices"][0]["message"]["content"] == ref.text


def test_history_and_system_match_chat_session(vision, image_file):
    msgs = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": [{"type": "image_url", "image_url": str(image_file)},
                                         {"type": "text", "text": "Describe it."}]},
            {"role": "assistant", "content": "A red square."},
            {"role": "user", "content": "Is it big?"}]
    out = complete(vision, msgs)
    ref = reference(vision, [("Describe it.", "A red square.", image_file)], "Is it big?", system="You are terse.")
    assert out["choices"][0]["message"]["content"] == ref.text
    assert out["usage"]["prompt_tokens"] == ref.stats.prompt_total


def test_stream_chunks_add_up(vision, image_file):
    msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": str(image_file)},
                                         {"type": "text", "text": "What is in this picture?"}]}]
    whole = complete(vision, msgs)
    chunks = list(complete(vision, msgs, stream=True))
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert chunks[-1]["usage"] == whole["usage"]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == whole["choices"][0]["message"]["content"] and len(chunks) >= 3


def test_sampling_overrides_and_errors(vision):
    from factedge.edge.errors import ConfigError

    msgs = [{"role": "user", "content": "Hello"}]
    assert complete(vision, msgs, max_tokens=2)["usage"]["completion_tokens"] <= 2
    with pytest.raises(ConfigError):
        complete(vision, msgs, top_p=0)
    with pytest.raises(InputError, match="stop"):
        complete(vision, msgs, stop=[1])
    with pytest.raises(InputError, match="max_tokens"):
        complete(vision, msgs, max_tokens="8")
    with pytest.raises(InputError, match="not found"):
        complete(vision, [{"role": "user", "content": [{"type": "image_url", "image_url": "/nope/x.png"}]}])
