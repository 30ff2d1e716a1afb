"""OwnedHandle (edge/owned_handle.py): every native pointer is freed once, and always after the
handles built on it, whatever order Python finalizes them in. The crash this prevents (the demo
bundle's image encoder freed after its model: a segfault at exit, every time) does not reproduce with
the test suite's tiny bundle, so the order itself is what is tested, on handles that record it."""

from __future__ import annotations

import gc

import pytest

from factedge.edge.errors import ClosedError
from factedge.edge.owned_handle import OwnedHandle

FREED: list[str] = []


class Part(OwnedHandle):
    def __init__(self, name: str, *on: OwnedHandle):
        self.name, self.on = name, on
        self._own(object())

    def _free(self) -> None:
        FREED.append(self.name)

    def _depends_on(self):
        return self.on


@pytest.fixture(autouse=True)
def fresh():
    FREED.clear()
    yield
    gc.collect()


def test_closing_a_part_closes_what_was_built_on_it_first():
    model = Part("model")
    ctx, enc = Part("ctx", model), Part("enc", model)
    model.close()
    assert FREED[-1] == "model" and sorted(FREED[:2]) == ["ctx", "enc"]
    assert ctx.closed and enc.closed
    with pytest.raises(ClosedError):
        ctx._live()
    model.close()
    ctx.close()
    assert len(FREED) == 3  # each once


@pytest.mark.parametrize("first", ["model", "enc"])
def test_a_reference_cycle_frees_the_dependent_first_in_either_finalizer_order(first):
    """The collector clears weak references before it runs finalizers, so the model cannot see its
    encoder when it goes first; its count of open dependents makes it wait for the encoder."""
    model = Part("model")
    enc = Part("enc", model)
    enc.cycle = enc
    order = [model, enc] if first == "model" else [enc, model]
    for h in order:  # what the collector does: weak references gone, then finalizers in its order
        h._dependents.clear()
        h.__del__()
    assert FREED == ["enc", "model"]
