"""LLaVA's projectors as data: one row per `mm_projector_type`, everything the stack needs to know.

A row says how the checkpoint names it, which `nn.Sequential` indices hold its Linear layers (the
canonical tensor names `0.weight`, `2.bias`, ...), which activation sits between them, what llama.cpp
calls it (`clip.projector_type`) and its tensor shapes; `build_torch` makes the PyTorch module the
reference and the trainer load. Adding a projector is one row here, plus, where llama.cpp lacks it,
one patch in cpp_patches/ (0003 added `linear`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from factedge.edge.errors import ConfigError


@dataclass(frozen=True)
class Projector:
    name: str  # LLaVA's mm_projector_type
    gguf_type: str  # clip.projector_type in the mmproj GGUF
    linears: tuple[int, ...]  # nn.Sequential indices of the Linear layers
    activation: str | None  # between the Linears: "gelu" is nn.GELU() (erf form, patch 0006)

    def shapes(self, vision_hidden: int, text_hidden: int) -> dict[str, tuple[int, ...]]:
        """Canonical names -> torch shapes: the first Linear maps vision -> text, the others text -> text."""
        out: dict[str, tuple[int, ...]] = {}
        for i, index in enumerate(self.linears):
            out[f"{index}.weight"] = (text_hidden, vision_hidden if i == 0 else text_hidden)
            out[f"{index}.bias"] = (text_hidden,)
        return out

    def build_torch(self, vision_hidden: int, text_hidden: int):
        """The `nn.Sequential` LLaVA builds (Linear layers at `linears`, the activation between)."""
        from torch import nn

        layers = []
        for i, _ in enumerate(self.linears):
            if i:
                layers.append(nn.GELU())
            layers.append(nn.Linear(vision_hidden if i == 0 else text_hidden, text_hidden))
        return nn.Sequential(*layers)


PROJECTORS: dict[str, Projector] = {p.name: p for p in (
    Projector("linear", "linear", (0,), None),  # LLaVA's default; LLaVA-RLHF
    Projector("mlp2x_gelu", "mlp", (0, 2), "gelu"),  # LLaVA-1.5, llava-hf's LlavaMultiModalProjector
)}


def projector(name: str | None, source: Path | None = None) -> Projector:
    """The row for `name` (None: LLaVA's default, linear), or ConfigError naming the known ones."""
    found = PROJECTORS.get(name or "linear")
    if found is None:
        raise ConfigError(f"mm_projector_type {name!r} is not supported ({', '.join(PROJECTORS)})", source)
    return found
