"""OpenAI / llama-cpp-python shaped chat completions over a loaded VisionModel.

Messages in the shapes clients already send (content as a string or as text / image_url parts; system
and assistant history) are turned into ChatSession turns, so the prompt comes from the one template in
`edge.prompt` and evaluation gets ChatSession's KV prefix reuse and image cache. Offline tool: image
URLs must be data: URIs or local paths; http(s) URLs are refused with RemoteImageError, and which local
paths a caller may name is an `ImageAccess` (the server's clients: none unless the user exposed folders).
Not thread-safe: one call at a time per session (the server holds a lock).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterator

from factedge.edge.batch import Request
from factedge.edge.chat import ChatSession, SessionOptions
from factedge.edge.errors import InputError
from factedge.edge.image_access import ImageAccess, RemoteImageError  # noqa: F401 (re-exported: callers catch it)
from factedge.edge.sampling import SamplingOptions
from factedge.edge.vision_model import VisionModel

ROLES = ("system", "user", "assistant")


@dataclass
class _Turn:
    user: str = ""
    images: list[str] = field(default_factory=list)
    assistant: str | None = None


def model_id(chat: VisionModel) -> str:
    """The name clients see: the bundle folder (or the model file when opened from a file)."""
    from factedge.edge.manifest import MANIFEST

    folder = chat.files.model.parent
    return folder.name if (folder / MANIFEST).is_file() else chat.files.model.name


def _image_url(part: dict, access: ImageAccess) -> str:
    value = part.get("image_url")
    url = value.get("url") if isinstance(value, dict) else value
    if not isinstance(url, str) or not url:
        raise InputError("an image_url part needs a url (a data: URI or a local file path)")
    return access.resolve(url)


def _content(message: dict, access: ImageAccess) -> tuple[str, list[str]]:
    """(text, image urls) of one message; text parts are joined with newlines."""
    content = message.get("content")
    if content is None:
        return "", []
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise InputError("message content must be a string or a list of parts")
    texts, images = [], []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            images.append(_image_url(part, access))
        else:
            raise InputError(f"unsupported content part {kind!r} (use 'text' or 'image_url')")
    return "\n".join(texts), images


def parse_messages(messages: Any, access: ImageAccess = ImageAccess()) -> tuple[str | None, list[_Turn]]:
    """(system prompt or None, turns); the last turn is the question to answer (no assistant yet)."""
    if not isinstance(messages, list) or not messages:
        raise InputError("messages must be a non-empty list")
    system: list[str] = []
    turns: list[_Turn] = []
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ROLES:
            raise InputError(f"messages[{i}].role must be one of {', '.join(ROLES)}, not {role!r}")
        text, images = _content(message, access)
        if role == "system":
            if turns or images:
                raise InputError("system messages must come first and hold text only")
            system.append(text)
        elif role == "user":
            if turns and turns[-1].assistant is None:  # consecutive user messages: one turn
                turns[-1].user = "\n".join(t for t in (turns[-1].user, text) if t)
                turns[-1].images += images
            else:
                turns.append(_Turn(text, images))
        else:
            if not turns or turns[-1].assistant is not None:
                raise InputError(f"messages[{i}]: an assistant message must follow a user message")
            if images:
                raise InputError(f"messages[{i}]: assistant messages cannot hold images")
            turns[-1].assistant = text
    if not turns or turns[-1].assistant is not None:
        raise InputError("the last message must be from the user")
    return ("\n".join(system) if system else None), turns


def sampling_options(chat: VisionModel, *, max_tokens=None, temperature=None, top_p=None, top_k=None,
                     stop=None, seed=None, repeat_penalty=None) -> SamplingOptions:
    """The chat's default sampling with the request's overrides (None: keep the default)."""
    base = chat.options.sampling
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise InputError("stop must be a string or a list of strings")
    for name, value, kind in (("max_tokens", max_tokens, int), ("top_k", top_k, int), ("seed", seed, int),
                              ("temperature", temperature, (int, float)), ("top_p", top_p, (int, float)),
                              ("repeat_penalty", repeat_penalty, (int, float))):
        if value is not None and (isinstance(value, bool) or not isinstance(value, kind)):
            raise InputError(f"{name} must be a number, not {value!r}")
    pick = lambda v, d: d if v is None else v  # noqa: E731
    return SamplingOptions(
        temperature=float(pick(temperature, base.temperature)), top_p=float(pick(top_p, base.top_p)),
        top_k=pick(top_k, base.top_k), repeat_penalty=float(pick(repeat_penalty, base.repeat_penalty)),
        repeat_last_n=base.repeat_last_n, max_tokens=pick(max_tokens, base.max_tokens),
        stop=list(pick(stop, base.stop)), seed=pick(seed, base.seed) & 0xFFFFFFFF,
    ).check()


def create_chat_completion(chat: VisionModel, messages: list, *, stream: bool = False, max_tokens: int | None = None,
                           temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
                           stop: str | list[str] | None = None, seed: int | None = None,
                           repeat_penalty: float | None = None, model: str | None = None,
                           session: ChatSession | None = None,
                           session_options: SessionOptions | None = None,
                           image_access: ImageAccess = ImageAccess()) -> dict | Iterator[dict]:
    """Answer the last user message of `messages`; an OpenAI "chat.completion" dict, or with
    stream=True an iterator of "chat.completion.chunk" dicts.

    The prompt is evaluated before this returns (bad input raises here, not mid-stream). Pass a
    long-lived `session` to reuse the KV prefix across calls; without one a session is made for the
    call and closed when it (or its stream) ends. `image_access` says which local image paths the
    messages may name (default: any, the caller being the user)."""
    system, turns = parse_messages(messages, image_access)
    sampling = sampling_options(chat, max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                stop=stop, seed=seed, repeat_penalty=repeat_penalty)
    own = session is None
    if own:
        session = ChatSession(chat, session_options or SessionOptions(n_ctx=chat.options.n_ctx))
    try:
        pieces = _start(session, system, turns, sampling)
    except BaseException:
        if own:
            session.close()
        raise
    meta = completion_meta(model or model_id(chat))
    chunks = _chunks(session, pieces, meta, own)
    if stream:
        return chunks
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    return completion(meta, text, session.last_answer)


def batch_request(chat: VisionModel, messages: list, *, image_access: ImageAccess = ImageAccess(),
                  max_tokens: int | None = None, temperature: float | None = None, top_p: float | None = None,
                  top_k: int | None = None, stop: str | list[str] | None = None, seed: int | None = None,
                  repeat_penalty: float | None = None) -> Request:
    """The same messages and parameters as `create_chat_completion`, as a request for the batch engine
    (edge/batch.py): the prompt it builds is the one a fresh ChatSession builds for them."""
    system, turns = parse_messages(messages, image_access)
    sampling = sampling_options(chat, max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                stop=stop, seed=seed, repeat_penalty=repeat_penalty)
    last = turns[-1]
    return Request(last.user, list(last.images) or None, sampling, system,
                   [(t.user, t.assistant, list(t.images)) for t in turns[:-1]])


def _start(session: ChatSession, system: str | None, turns: list[_Turn], sampling: SamplingOptions) -> Iterator[str]:
    """Load the history into the session (its KV cache keeps the common prefix) and evaluate the prompt."""
    session.options.system = system if system is not None else SessionOptions.system
    session.turns.clear()
    for turn in turns[:-1]:
        session.add_turn(turn.user, turn.assistant, turn.images or None)
    last = turns[-1]
    return session.stream(last.user, last.images or None, sampling)


def completion_meta(model: str) -> dict:
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model}


def chunk(meta: dict, delta: dict, finish: str | None = None) -> dict:
    """One "chat.completion.chunk" of a stream."""
    return {**meta, "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}


def last_chunk(meta: dict, answer) -> dict:
    return {**chunk(meta, {}, answer.finish_reason), "usage": usage(answer)}


def completion(meta: dict, text: str, answer) -> dict:
    """The non-streamed "chat.completion" of an answer."""
    return {**meta, "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": answer.finish_reason, "logprobs": None}],
            "usage": usage(answer)}


def _chunks(session: ChatSession, pieces: Iterator[str], meta: dict, own: bool) -> Iterator[dict]:
    try:
        yield chunk(meta, {"role": "assistant", "content": ""})
        for piece in pieces:
            yield chunk(meta, {"content": piece})
        pieces.close()
        yield last_chunk(meta, session.last_answer)
    finally:
        pieces.close()
        if own:
            session.close()


def usage(answer) -> dict:
    prompt = answer.stats.prompt_total
    return {"prompt_tokens": prompt, "completion_tokens": answer.stats.generated_tokens,
            "total_tokens": prompt + answer.stats.generated_tokens}
