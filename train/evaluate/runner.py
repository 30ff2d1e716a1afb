"""Run one benchmark over several answerers (bundles, quants, the PyTorch reference), one at a time.

Each answerer is opened, run and closed before the next, so comparing five quants of a 7B model
needs the memory of one. A run is the JSON-ready `{backend, result}` that report.py tabulates.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from factedge.edge.errors import ConfigError
from factedge.train.evaluate.backends import EdgeOptions, parse_model_spec

# (run label, done, total)
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class BackendSpec:
    kind: str  # "edge" | "torch"
    path: Path
    quant: str | None = None  # edge: which LM file of the bundle
    adapter: str | None = "peft"  # torch: how to apply a LoRA (peft = unmerged, as the authors run it)
    vision_tower: Path | None = None  # torch: CLIP folder for original-LLaVA layouts

    @property
    def label(self) -> str:
        if self.kind == "torch":
            return f"pytorch ({self.adapter or 'no adapter'})"
        return f"{self.path.name}:{self.quant or 'default'}"


def backend_specs(model: Path | None = None, quant: str | None = None, compare: Sequence[str] = (),
                  torch_checkpoint: Path | None = None, adapter: str | None = "peft",
                  vision_tower: Path | None = None) -> list[BackendSpec]:
    """The PyTorch reference first (when given), then --model[:--quant], then each --compare entry."""
    specs = []
    if torch_checkpoint is not None:
        specs.append(BackendSpec("torch", Path(torch_checkpoint), adapter=adapter, vision_tower=vision_tower))
    if model is not None:
        specs.append(BackendSpec("edge", Path(model), quant))
    elif quant is not None:
        raise ConfigError("--quant needs --model")
    for entry in compare:
        path, q = parse_model_spec(entry)
        specs.append(BackendSpec("edge", path, q))
    if not specs:
        raise ConfigError("nothing to evaluate: give --model BUNDLE, --compare BUNDLE[:QUANT],... or --torch CHECKPOINT")
    return specs


def open_backend(spec: BackendSpec, edge: EdgeOptions):
    if spec.kind == "torch":
        from factedge.train.evaluate.backends import TorchBackend

        return TorchBackend(spec.path, spec.adapter, vision_tower=spec.vision_tower, threads=edge.threads)
    from factedge.train.evaluate.backends import EdgeBackend

    return EdgeBackend(spec.path, spec.quant, options=edge)


def run_all(specs: Sequence[BackendSpec], edge: EdgeOptions, run: Callable, total: int,
            progress: Progress | None = None) -> list[dict]:
    """[{backend: describe(), result: run(backend, per_item_progress).to_dict()}] in spec order."""
    out = []
    for spec in specs:
        backend = open_backend(spec, edge)
        try:
            report = (lambda done, n, label=backend.label: progress(label, done, n)) if progress else None
            if progress:
                progress(backend.label, 0, total)
            result = run(backend, report)
            out.append({"backend": backend.describe(), "result": result.to_dict()})
        finally:
            backend.close()
    return out
