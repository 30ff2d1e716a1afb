"""What a session owning one llama.cpp Context shares: closing frees its KV cache (the VisionModel it
runs on stays open), and it works as a `with` block. ChatSession and BatchSession are such sessions."""

from __future__ import annotations


class ContextOwner:
    ctx = None  # a runtime.Context, set by the session

    @property
    def closed(self) -> bool:
        return self.ctx.closed

    def close(self) -> None:
        """Free this session's KV cache (the VisionModel stays open)."""
        self.ctx.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
