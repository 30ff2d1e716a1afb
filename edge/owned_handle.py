"""The base of every object that owns one native pointer (model, adapter, context, image encoder).

Why a base: a freed pointer handed to C is a crash, not an error, so each handle frees exactly once
and raises ClosedError on use after close. And a handle built on another (a context on its model)
must be freed first: libmtmd's context freed after its model corrupts the heap (a segfault at exit).
Python frees in that order by reference counting, but not always: objects in a reference cycle are
finalized by the garbage collector in no set order, after it has cleared the weak references to them.
So each part counts its open dependents; closing a part closes the dependents it can still reach,
and frees its own pointer only when none is left open, else when the last one closes.
"""

from __future__ import annotations

import weakref

from factedge.edge.errors import ClosedError


class OwnedHandle:
    """One native pointer, freed once, after every handle built on it; ClosedError on use after close."""

    _ptr = None
    _held = None  # closed by the user while dependents were open: freed when the last one closes

    def _free(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def _own(self, ptr) -> None:
        """Take `ptr` (once the parts of `_depends_on` are set) and register with those parts."""
        self._ptr = ptr
        self._dependents: weakref.WeakSet = weakref.WeakSet()
        self._open_dependents = 0
        for part in self._depends_on():
            part._dependents.add(self)
            part._open_dependents += 1

    def _release(self) -> None:
        """A dependent was freed: free this part too if it was closed meanwhile."""
        self._open_dependents -= 1
        if self._open_dependents == 0 and self._held is not None:
            self._ptr, self._held = self._held, None
            self._free()
            self._ptr = None

    def _live(self):
        """The native pointer, or ClosedError when this object (or what it was built on) is closed."""
        if not self._ptr:
            raise ClosedError(f"this {type(self).__name__} is closed")
        for part in self._depends_on():
            part._live()
        return self._ptr

    def _depends_on(self) -> tuple["OwnedHandle", ...]:
        return ()

    @property
    def closed(self) -> bool:
        return not self._ptr

    def close(self) -> None:
        if not self._ptr:
            return
        for dependent in list(self._dependents):
            dependent.close()
        if self._open_dependents > 0:  # one the collector is about to finalize
            self._ptr, self._held = None, self._ptr
            return
        self._free()
        self._ptr = None
        for part in self._depends_on():
            part._release()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except (AttributeError, TypeError):  # interpreter shutdown: the bindings may be gone
            pass
