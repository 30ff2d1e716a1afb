"""Conversation formats as data, and which one a model's GGUF asks for.

A LLaVA on Vicuna talks in `conv_vicuna_v1` ("<system> USER: <q> ASSISTANT: <a></s>"), a LLaVA on
SmolLM2 or Qwen in ChatML, one on LLaMA-3 in its header format. The edge must format every prompt exactly as the model was trained, and
must know where a generated answer sits in the text (multi-turn chats splice the answer's own ids
back in), so a format is a few literal pieces rather than an opaque template.

Which one: the GGUF's `tokenizer.chat_template` (jinja, written by the converter) is rendered in a
sandbox on a probe conversation and compared with each named format; the one that renders the same
text is used, with the template's own default system prompt. A template that matches none is
refused with its name, unless the user names a format (`--chat-format`); a GGUF with no template
(older bundles) is Vicuna v1, what LLaVA was trained with.
"""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass
from typing import Iterator

from factedge.edge.errors import ConfigError

TEXT = "{text}"


@dataclass(frozen=True)
class ChatFormat:
    """How a system prompt, a user turn and an answer are written. `answer` follows `assistant`:
    its part before {text} is the template's own spelling, and the generated ids start after it."""

    name: str
    default_system: str | None  # None: no system block unless one is given
    system_block: str  # "{text}" -> the system prompt
    user: str  # "{text}" -> the images' markers, then the question
    assistant: str  # opens the answer (the generation prompt)
    answer: str  # "{text}" -> a finished answer, with the turn's closing tokens
    end: str  # the token that ends an answer (the model's EOS): `answer` continues with it after {text}
    image: str = "<image>\n"  # one per image, before the turn's text (LLaVA's placement)

    def system_prompt(self, given: str | None) -> str | None:
        """The system prompt a chat uses: the one given, else this format's default."""
        return self.default_system if given is None else given

    @property
    def answer_lead(self) -> str:
        """What the template writes between `assistant` and the answer's first generated token."""
        return self.answer.split(TEXT)[0]

    @property
    def after_end(self) -> str:
        """What the template writes after an answer's end token (ChatML: a newline), before the next turn."""
        return self.answer.split(TEXT)[1].removeprefix(self.end)

    def check_eos(self, eos_token: str | None) -> None:
        """Generation stops at the model's EOS and training labels end in it: it must be this format's end."""
        if eos_token != self.end:
            raise ConfigError(f"the {self.name} chat format ends an answer with {self.end!r} but the model's EOS "
                              f"token is {eos_token!r}")

    def render(self, system: str | None, turns: list[tuple[str, str | None, int]]) -> str:
        """The prompt text: (user text, answer or None for the one to generate, images) per turn."""
        out = self.system_block.replace(TEXT, system) if system is not None else ""
        for user, answer, n_images in turns:
            out += self.user.replace(TEXT, self.image * n_images + user)
            out += self.assistant + (self.answer.replace(TEXT, answer) if answer is not None else "")
        return out


VICUNA_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the human's questions.")
# LLaVA's conv_vicuna_v1 (sep " ", sep2 "</s>"); the answer's ids begin with the separator space.
VICUNA_V1 = ChatFormat(
    "vicuna_v1", default_system=VICUNA_SYSTEM,
    system_block="{text} ", user="USER: {text} ", assistant="ASSISTANT:", answer=" {text}</s>", end="</s>",
)
# ChatML (SmolLM2, Qwen2, ...): the image markers open the first user message, as LLaVA places them.
CHATML = ChatFormat(
    "chatml", default_system=None,
    system_block="<|im_start|>system\n{text}<|im_end|>\n", user="<|im_start|>user\n{text}<|im_end|>\n",
    assistant="<|im_start|>assistant\n", answer="{text}<|im_end|>\n", end="<|im_end|>",
)
# LLaMA-3 Instruct (LLaVA-NeXT / LLaVA-LLaMA-3 LMs): headers per role; the tokenizer adds <|begin_of_text|>.
LLAMA3 = ChatFormat(
    "llama3", default_system=None,
    system_block="<|start_header_id|>system<|end_header_id|>\n\n{text}<|eot_id|>",
    user="<|start_header_id|>user<|end_header_id|>\n\n{text}<|eot_id|>",
    assistant="<|start_header_id|>assistant<|end_header_id|>\n\n", answer="{text}<|eot_id|>", end="<|eot_id|>",
)
FORMATS: dict[str, ChatFormat] = {f.name: f for f in (VICUNA_V1, CHATML, LLAMA3)}


def named_format(name: str) -> ChatFormat:
    if name not in FORMATS:
        raise ConfigError(f"unknown chat format {name!r} (known: {', '.join(FORMATS)})")
    return FORMATS[name]


MAX_REPEAT_CHARS = 1 << 20  # `'x' * n` in a template: a chat template never needs more
MAX_POWER = 1024  # `a ** b` exponents beyond this only serve to exhaust time or memory
MAX_RENDER_S = 2.0  # a chat template renders in milliseconds; nested loops over large ranges take hours


def _sandbox():
    """jinja's immutable sandbox, with `*` and `**` bounded (it bounds `range` itself)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

    class Sandbox(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**"})

        def call_binop(self, context, operator, left, right):
            if operator == "**" and isinstance(right, (int, float)) and abs(right) > MAX_POWER:
                raise SecurityError(f"exponent {right} is too large")
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > MAX_REPEAT_CHARS:
                        raise SecurityError("a repetition longer than a chat template needs")
            return super().call_binop(context, operator, left, right)

    return Sandbox(trim_blocks=True, lstrip_blocks=True)


class _TooSlow(Exception):
    pass


@contextlib.contextmanager
def _time_bound(seconds: float) -> Iterator[None]:
    """Stop the Python code run in this thread once `seconds` have passed (a line-event tracer: jinja
    compiles a template to Python, so nested loops over bounded ranges still end here)."""
    deadline = time.monotonic() + seconds

    def trace(frame, event, arg):
        if time.monotonic() > deadline:
            raise _TooSlow
        return trace

    previous = sys.gettrace()
    sys.settrace(trace)
    try:
        yield
    finally:
        sys.settrace(previous)


def render_template(template: str, messages: list[dict], add_generation_prompt: bool) -> str:
    """A jinja chat template rendered in a sandbox (a GGUF is untrusted input), within MAX_RENDER_S."""
    import jinja2

    env = _sandbox()

    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    try:
        with _time_bound(MAX_RENDER_S):
            return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                    bos_token="", eos_token="", raise_exception=raise_exception)
    except _TooSlow:
        raise ConfigError(f"the model's chat template takes over {MAX_RENDER_S:g} s to render") from None
    except (jinja2.exceptions.TemplateError, TypeError, ValueError, RecursionError) as exc:
        raise ConfigError(f"the model's chat template does not render: {exc}") from exc


def _default_system(fmt: ChatFormat, rendered: str) -> str | None | bool:
    """The system prompt `rendered` (a one-question probe) shows, None for none, False: not `fmt`."""
    rest = fmt.render(None, [("Q1", None, 0)])
    if rendered == rest:
        return None
    head, tail = fmt.system_block.split(TEXT)
    body = rendered[: len(rendered) - len(rest)] if rendered.endswith(rest) else ""
    if body.startswith(head) and body.endswith(tail) and len(body) >= len(head) + len(tail):
        return body[len(head): len(body) - len(tail)]
    return False


def detect_format(template: str | None) -> ChatFormat:
    """The named format a GGUF chat template renders like (with its default system prompt)."""
    if not template:
        return VICUNA_V1
    probe = [{"role": "system", "content": "S0"}, {"role": "user", "content": "Q1"},
             {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"}]
    full = render_template(template, probe, True)
    one = render_template(template, probe[1:2], True)
    for fmt in FORMATS.values():
        if full != fmt.render("S0", [("Q1", "A1", 0), ("Q2", None, 0)]):
            continue
        system = _default_system(fmt, one)
        if system is not False:
            return ChatFormat(**{**fmt.__dict__, "default_system": system})
    raise ConfigError("the model's chat template is none of the formats factedge knows "
                      f"({', '.join(FORMATS)}); name one with --chat-format")
