"""A training run's folder: config, metrics, resumable checkpoints, and the seed that makes it repeatable.

Layout of `out/`:
- `config.json` — the full config the run was started with (dataclasses.asdict);
- `metrics.jsonl` — one JSON object per logged step (`{"step": N, ...}`); on resume, lines past the
  checkpoint's step are dropped so the file reads as one uninterrupted run;
- `checkpoints/step-N/` — `trainable.safetensors` (only parameters that train), `optimizer.pt`
  (tensors and plain numbers, loaded with `weights_only=True`), `scheduler.json`, `state.json` (step,
  epoch position, extra), and the python / numpy / torch RNG states as `rng.safetensors` + `rng.json`.
  Nothing a resume reads can run code: no pickle is loaded except through `weights_only=True`. Written into a temp folder and renamed, so a killed run never leaves a half checkpoint;
  the newest `keep` are kept.
Only the main process writes (`main=False` on the others makes every write a no-op).
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from torch import nn

from factedge.edge.atomic import atomic_path, building_dir, write_json
from factedge.edge.errors import CorruptFileError, InputError, MismatchError, OutputError, UnsafePickleError
from factedge.train.config import config_to_dict

CHECKPOINTS = "checkpoints"
_STEP_PREFIX = "step-"


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch, and ask torch for deterministic kernels (CPU runs repeat bit for bit)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The python / numpy / torch (and CUDA) RNG states as (tensors, plain JSON data): no pickle."""
    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors = {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(np.asarray(keys, np.int64))}
    if torch.cuda.is_available():
        tensors.update({f"cuda_{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    plain = {"python": [version, list(words), gauss], "numpy": [kind, int(pos), int(has_gauss), float(cached)]}
    return tensors, plain


def set_rng_state(tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> None:
    version, words, gauss = plain["python"]
    random.setstate((int(version), tuple(int(w) for w in words), gauss))
    kind, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((str(kind), tensors["numpy_keys"].numpy().astype(np.uint32), int(pos), int(has_gauss),
                         float(cached)))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda_")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CorruptFileError(f"cannot read checkpoint state: {exc}", path) from exc


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # SafetensorError, OSError: a bad header or a missing file, named
        raise CorruptFileError(f"cannot read checkpoint tensors: {str(exc).splitlines()[0]}", path) from exc


def _load_tensors_only(path: Path) -> Any:
    """torch.load with weights_only=True; anything else in the pickle is refused, never executed."""
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafePickleError(f"refused: the pickle needs more than tensors ({str(exc).splitlines()[0]})",
                                path) from exc
    except (OSError, RuntimeError, EOFError, ValueError) as exc:
        raise CorruptFileError(f"cannot read checkpoint file: {exc}", path) from exc


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train (requires_grad), by name: what a checkpoint must hold."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, tensors: dict[str, torch.Tensor], path: Path | None = None) -> None:
    """Copy `tensors` into `model`'s trainable parameters; the two name sets must be equal."""
    load_named({name: p for name, p in model.named_parameters() if p.requires_grad}, tensors, path)


@dataclass
class TrainState:
    """What a checkpoint restores besides the weights."""

    step: int = 0  # optimizer steps done
    extra: dict[str, Any] = field(default_factory=dict)  # trainer-specific (epoch, samples seen, best...)


@dataclass
class RunResult:
    """What a trainer returns: the run folder, its output model folder, the steps done, last metrics."""

    run_dir: Path
    output: Path | None
    step: int
    metrics: dict[str, Any] = field(default_factory=dict)


class RunDir:
    """One run's folder (see the module doc). `main=False`: a non-main process, writes nothing."""

    def __init__(self, path: str | Path, *, main: bool = True, keep: int = 2):
        self.path = Path(path)
        self.main = main
        self.keep = max(1, keep)
        if main:
            try:
                self.path.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise OutputError(f"cannot create the run folder: {exc}", self.path) from exc

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    # -- config and metrics --------------------------------------------------------------------
    def write_config(self, cfg: Any) -> None:
        if self.main:
            write_json(self.path / "config.json", config_to_dict(cfg) if not isinstance(cfg, dict) else cfg,
                       sort_keys=True)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Append one line `{"step": step, **metrics}` (a single write, flushed)."""
        if not self.main:
            return
        line = json.dumps({"step": step, **metrics}, sort_keys=False) + "\n"
        try:
            with open(self.metrics_file, "a", encoding="utf-8") as fh:
                fh.write(line)
                fh.flush()
        except OSError as exc:
            raise OutputError(f"cannot append metrics: {exc}", self.metrics_file) from exc

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_file.is_file():
            return []
        rows = []
        for n, line in enumerate(self.metrics_file.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise CorruptFileError(f"line {n} is not JSON: {exc}", self.metrics_file) from exc
        return rows

    def _truncate_metrics(self, step: int) -> None:
        """Drop metric lines logged after `step` (they belong to the run that was interrupted)."""
        if not self.main or not self.metrics_file.is_file():
            return
        kept = [r for r in self.read_metrics() if int(r.get("step", 0)) <= step]
        with atomic_path(self.metrics_file) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")

    # -- checkpoints ---------------------------------------------------------------------------
    def checkpoint_dirs(self) -> list[Path]:
        """Finished checkpoints, oldest first."""
        if not self.checkpoints.is_dir():
            return []
        found = []
        for d in self.checkpoints.iterdir():
            if d.is_dir() and d.name.startswith(_STEP_PREFIX) and d.name[len(_STEP_PREFIX):].isdigit():
                if (d / "state.json").is_file():
                    found.append(d)
        return sorted(found, key=lambda d: int(d.name[len(_STEP_PREFIX):]))

    def latest_checkpoint(self) -> Path | None:
        dirs = self.checkpoint_dirs()
        return dirs[-1] if dirs else None

    def save_checkpoint(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                        scheduler: Any | None, extra: dict[str, Any] | None = None,
                        trainables: dict[str, torch.Tensor] | None = None) -> Path | None:
        """Write checkpoints/step-N atomically (temp folder, then rename); prune to the newest `keep`.

        trainables: the tensors to save (default: `trainable_state(model)`); a trainer whose
        trainables are not all `requires_grad` parameters of one module passes its own dict."""
        if not self.main:
            return None
        from safetensors.torch import save_file

        final = self.checkpoints / f"{_STEP_PREFIX}{step}"
        tensors = trainables if trainables is not None else trainable_state(model)
        with building_dir(final, "checkpoint") as tmp:
            save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp / "trainable.safetensors"))
            if optimizer is not None:
                torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            if scheduler is not None:
                (tmp / "scheduler.json").write_text(json.dumps(scheduler.state_dict()), "utf-8")
            rng_tensors, rng_plain = rng_state()
            save_file(rng_tensors, str(tmp / "rng.safetensors"))
            (tmp / "rng.json").write_text(json.dumps(rng_plain), "utf-8")
            (tmp / "state.json").write_text(json.dumps({"step": step, "extra": extra or {}}, indent=2), "utf-8")
        for old in self.checkpoint_dirs()[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def load_checkpoint(self, ckpt_dir: Path, model: nn.Module | None, optimizer: torch.optim.Optimizer | None,
                        scheduler: Any | None, *, restore_rng: bool = True,
                        trainables: dict[str, nn.Parameter] | None = None) -> TrainState:
        """Restore weights, optimizer, scheduler and RNG from `ckpt_dir`; metrics past it are dropped."""
        ckpt_dir = Path(ckpt_dir)
        if not (ckpt_dir / "state.json").is_file():
            raise InputError("not a checkpoint folder (no state.json)", ckpt_dir)
        state = _read_json(ckpt_dir / "state.json")
        tensors = _load_safetensors(ckpt_dir / "trainable.safetensors")
        if trainables is not None:
            load_named(trainables, tensors, ckpt_dir)
        elif model is not None:
            load_trainable_state(model, tensors, ckpt_dir)
        if optimizer is not None:
            optimizer.load_state_dict(_load_tensors_only(ckpt_dir / "optimizer.pt"))
        if scheduler is not None:
            scheduler.load_state_dict(_read_json(ckpt_dir / "scheduler.json"))
        if restore_rng:
            try:
                set_rng_state(_load_safetensors(ckpt_dir / "rng.safetensors"), _read_json(ckpt_dir / "rng.json"))
            except (KeyError, TypeError, ValueError, RuntimeError) as exc:
                raise CorruptFileError(f"RNG state does not fit this run: {exc}", ckpt_dir / "rng.json") from exc
        self._truncate_metrics(int(state["step"]))
        return TrainState(step=int(state["step"]), extra=state.get("extra") or {})


def load_named(params: dict[str, nn.Parameter], tensors: dict[str, torch.Tensor], path: Path | None = None) -> None:
    """Copy `tensors` into `params` in place; same names and shapes, or MismatchError."""
    if set(params) != set(tensors):
        extra, missing = sorted(set(tensors) - set(params)), sorted(set(params) - set(tensors))
        raise MismatchError(f"checkpoint does not fit the model: extra {extra[:3]}, missing {missing[:3]}", path)
    with torch.no_grad():
        for name, p in params.items():
            if tuple(tensors[name].shape) != tuple(p.shape):
                raise MismatchError(f"{name}: shape {tuple(tensors[name].shape)}, model {tuple(p.shape)}", path)
            p.copy_(tensors[name].to(p.dtype))


def iter_metrics(path: str | Path) -> Iterable[dict[str, Any]]:
    """The metric rows of a run folder (for reports and tests)."""
    return RunDir(path, main=False).read_metrics()
