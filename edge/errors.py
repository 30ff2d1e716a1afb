"""Typed errors: the library raises these, only the CLI prints and exits.

Every error carries the path it is about (when there is one) and a one-line reason, so the CLI can
print `factedge: <path>: <reason>` and a caller can branch on the type.
"""

from __future__ import annotations

from pathlib import Path


class FactedgeError(Exception):
    """Base of every error factedge raises on purpose."""

    exit_code = 1

    def __init__(self, reason: str, path: str | Path | None = None):
        self.reason = " ".join(str(reason).split())  # always one line
        self.path = Path(path) if path is not None else None
        super().__init__(self.one_line())

    def one_line(self) -> str:
        return f"{self.path}: {self.reason}" if self.path is not None else self.reason


class InputError(FactedgeError):
    """A file or folder given by the user is missing, unreadable, truncated or of the wrong kind."""

    exit_code = 2


class LayoutError(InputError):
    """A checkpoint folder is not one of the layouts factedge knows."""


class CorruptFileError(InputError):
    """A weights file exists but cannot be parsed (truncated, bad header, bad pickle)."""


class UnsafePickleError(InputError):
    """A .bin pickle needs more than tensors to load (weights_only=True refused it)."""


class MismatchError(InputError):
    """Two files that must pair (adapter/base, mmproj/model) do not."""


class ConfigError(FactedgeError):
    """An option or config value is invalid (unknown quant type, bad batch file...)."""

    exit_code = 2


class OutputError(FactedgeError):
    """The output cannot be written (not writable, disk full); nothing half-written is left behind."""

    exit_code = 3


class NumericsError(FactedgeError):
    """Weights became NaN/Inf (for example after a LoRA merge)."""

    exit_code = 4


class NativeError(FactedgeError):
    """The native llama.cpp libraries or tools are missing or failed."""

    exit_code = 5


class FidelityError(FactedgeError):
    """A converted file does not reproduce the PyTorch model within the promised tolerance."""

    exit_code = 6


class ContextFullError(InputError):
    """A chat no longer fits the context window (prompt plus room for the answer)."""


class ClosedError(FactedgeError):
    """A model, context, encoder or session was used after `close()` (its native memory is freed)."""
