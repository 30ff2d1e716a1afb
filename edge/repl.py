"""The interactive loop behind `factedge chat`, kept apart from the terminal so it can be scripted.

`ChatRepl` reads lines through a `read_line(prompt)` callable (raising EOFError at the end) and writes
to a text stream: the CLI gives it `input` with readline history on a terminal, tests give it a
StringIO. Errors of one turn (a missing image, a full context) are printed on one line and the chat
goes on; Ctrl-C during an answer stops that answer (the part generated stays in the history).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, TextIO

from factedge.edge.chat import ChatSession
from factedge.edge.atomic import write_json
from factedge.edge.errors import FactedgeError

PROMPT, ANSWER = "you> ", "bot> "
HELP = ("commands: /image PATH (attach to the next question), /reset, /save FILE, /adapter SCALE, /help, /quit "
        "(Ctrl-C stops an answer, Ctrl-D exits)")


@dataclass
class ReplOptions:
    stats: bool = False  # print image-encode time and tokens/s after each answer
    image: Path | None = None  # attached to the first question


@dataclass
class _State:
    pending: list[Path] = field(default_factory=list)  # images for the next question
    names: dict[str, str] = field(default_factory=dict)  # image content key -> the path it came from


class ChatRepl:
    """A line-oriented chat over a ChatSession: questions stream their answers, /commands act."""

    def __init__(self, session: ChatSession, out: TextIO, read_line: Callable[[str], str],
                 options: ReplOptions | None = None):
        self.session = session
        self.out = out
        self.read_line = read_line
        self.options = options or ReplOptions()
        self.state = _State()
        if self.options.image is not None:
            self._attach(str(self.options.image))

    @classmethod
    def over_stream(cls, session: ChatSession, inp: TextIO, out: TextIO, options: ReplOptions | None = None):
        """A REPL reading a (non-terminal) text stream; the prompts are still echoed to `out`."""

        def read_line(prompt: str) -> str:
            out.write(prompt)
            out.flush()
            line = inp.readline()
            if not line:
                raise EOFError
            return line.rstrip("\n")

        return cls(session, out, read_line, options)

    def run(self) -> None:
        """Until /quit or end of input."""
        self._say(HELP)
        while True:
            try:
                line = self.read_line(PROMPT).strip()
            except EOFError:
                self._say("")
                return
            except KeyboardInterrupt:  # Ctrl-C at the prompt: a fresh prompt, as in Python's REPL
                self._say("\n(Ctrl-D or /quit to exit)")
                continue
            if not line:
                continue
            if line.startswith("/"):
                if not self._command(line):
                    return
            else:
                self._ask(line)

    # -- commands ------------------------------------------------------------------------------

    def _command(self, line: str) -> bool:
        """Run one /command; False to end the chat."""
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        if name in ("/quit", "/exit"):
            return False
        if name == "/help":
            self._say(HELP)
        elif name == "/reset":
            self.session.reset()
            self.state.pending.clear()
            self._say("(history cleared)")
        elif name == "/image" and arg:
            self._attach(arg)
        elif name == "/save" and arg:
            self._save(Path(arg).expanduser())
        elif name == "/adapter" and arg:
            self._adapter(arg)
        elif name in ("/image", "/save", "/adapter"):
            self._error(f"{name} needs an argument (/help)")
        else:
            self._error(f"unknown command {name} (/help lists them)")
        return True

    def _attach(self, arg: str) -> None:
        """Attach an image only once it decodes: a bad file is refused now, not at every later question."""
        from factedge.edge.image import load_image

        path = Path(arg).expanduser()
        try:
            load_image(path)
        except FactedgeError as exc:
            self._error(f"not attached: {exc.one_line()}")
            return
        self.state.pending.append(path)
        self._say(f"(image {path.name} attached to your next question)")

    def _adapter(self, arg: str) -> None:
        from factedge.edge.adapters import set_adapter

        try:
            set_adapter(self.session, float(arg))
        except ValueError:
            self._error(f"not a number: {arg}")
        except FactedgeError as exc:
            self._error(exc.one_line())
        else:
            self._say(f"(adapter scale {float(arg):g})")

    def _save(self, path: Path) -> None:
        try:
            write_json(path, self.transcript())
        except FactedgeError as exc:
            self._error(exc.one_line())
        else:
            self._say(f"(saved {len(self.session.turns)} turns to {path})")

    def transcript(self) -> dict:
        """The conversation as plain data: system prompt, and per turn the question, the answer and
        the images (by the path they were attached from, and their content hash)."""
        return {"system": self.session.system,
                "turns": [{"user": t.user, "assistant": t.assistant,
                           "images": [{"path": self.state.names.get(im.key), "sha256": im.key} for im in t.images]}
                          for t in self.session.turns]}

    # -- asking --------------------------------------------------------------------------------

    def _ask(self, text: str) -> None:
        images = list(self.state.pending)
        try:
            stream = self.session.stream(text, [str(p) for p in images] or None)
        except FactedgeError as exc:
            self._error(exc.one_line())
            if exc.path is not None and exc.path in images:  # it changed since /image: do not fail every turn
                self.state.pending.remove(exc.path)
                self._say(f"({exc.path.name} detached)")
            return
        except KeyboardInterrupt:  # during prompt evaluation: the turn never entered the history
            self._say("\n(stopped)")
            return
        self.state.pending.clear()
        for path, im in zip(images, self.session.turns[-1].images):
            self.state.names[im.key] = str(path)
        self.out.write(ANSWER)
        stopped = False
        try:
            for piece in stream:
                self.out.write(piece)
                self.out.flush()
        except KeyboardInterrupt:
            stopped = True
        finally:
            stream.close()  # stopped early: what was generated so far is the turn's answer
        self._say(" [stopped]" if stopped else "")
        if self.options.stats and self.session.last_answer is not None:
            self._say(format_stats(self.session.last_answer.stats))

    def _say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def _error(self, text: str) -> None:
        self._say(f"error: {text}")


def format_stats(s) -> str:
    return (f"(image encode {s.image_encode_s:.2f} s | prompt {s.prompt_tokens} tok {s.prompt_tps:.1f} tok/s | "
            f"generation {s.generated_tokens} tok {s.generate_tps:.1f} tok/s)")

