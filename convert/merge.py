"""Merge a PEFT LoRA adapter into the base weights, one tensor at a time.

LLaVA-RLHF ships its RL policy as a LoRA on top of the SFT model. Merging W + (alpha/r)*scale*B@A in
float32 for just the tensor being written keeps memory at about one tensor (PEFT's
`merge_and_unload` needs the whole model in RAM). The adapter is checked against the base before
anything is computed: every target must exist with the shape the adapter was trained on.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from factedge.convert import hparams
from factedge.convert.layouts import ADAPTER_FILES, canonical_name, check_adapter_dir
from factedge.convert.shapes import lm_shapes, projector_shapes
from factedge.convert.specs import Checkpoint, LazyTensors
from factedge.convert.weights import TensorRef, file_header, load_tensor
from factedge.edge.errors import ConfigError, CorruptFileError, MismatchError, NumericsError

_LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


@dataclass(frozen=True)
class LoraPair:
    """One adapted weight: A is (r, in_features), B is (out_features, r); tensors stay on disk."""

    a: TensorRef
    b: TensorRef

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        """Shape of the base weight this pair was trained on."""
        return (self.b.shape[0], self.a.shape[1])

    def load(self):
        """(A, B) as float32 torch tensors."""
        import torch

        return load_tensor(self.a).to(torch.float32), load_tensor(self.b).to(torch.float32)


@dataclass(frozen=True)
class AdapterWeights:
    """A PEFT LoRA folder: hyper-parameters and per-target (canonical name) A/B pairs."""

    folder: Path
    file: Path
    r: int
    alpha: float
    use_rslora: bool
    # component ("lm", "projector", "vision") -> canonical base tensor name -> pair
    targets: dict[str, dict[str, LoraPair]] = field(default_factory=dict)

    def scaling(self, pair: LoraPair) -> float:
        """PEFT's scaling for one target (rank taken from the tensor, so rank_pattern works)."""
        return self.alpha / (math.sqrt(pair.rank) if self.use_rslora else pair.rank)


def _adapter_file(folder: Path) -> Path:
    for name in ADAPTER_FILES:
        if (folder / name).is_file():
            return folder / name
    raise AssertionError("check_adapter_dir guarantees an adapter file")


def _config(folder: Path) -> tuple[int, float, bool]:
    path = folder / "adapter_config.json"
    cfg = hparams.read_json(path)
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        raise ConfigError(f"peft_type {cfg.get('peft_type')!r} is not LORA", path)
    for key in ("use_dora", "fan_in_fan_out"):
        if cfg.get(key):
            raise ConfigError(f"{key}=true adapters are not supported", path)
    if cfg.get("alpha_pattern"):
        raise ConfigError("alpha_pattern (per-module alpha) is not supported", path)
    r = hparams.count(cfg, {}, "r", "width", path) if "r" in cfg else None
    if r is None:
        raise ConfigError("adapter config lacks r", path)
    alpha = hparams.real(cfg, {"lora_alpha": 8}, "lora_alpha", path, lo=-1e6, hi=1e6)
    return r, alpha, bool(cfg.get("use_rslora", False))


def read_adapter(adapter_dir: str | Path) -> AdapterWeights:
    """Index an adapter folder (headers only) and pair every lora_A with its lora_B."""
    folder = check_adapter_dir(adapter_dir)
    file = _adapter_file(folder)
    r, alpha, rslora = _config(folder)
    halves: dict[tuple[str, str], dict[str, TensorRef]] = {}
    for key, ref in file_header(file).items():
        match = _LORA_KEY.match(key)
        if match is None:
            raise ConfigError(f"adapter tensor {key!r} is not a lora_A/lora_B weight (modules_to_save, biases and "
                              "embedding LoRA are not supported)", file)  # fmt: skip
        target = canonical_name(match["module"] + ".weight")
        if target is None:
            raise MismatchError(f"adapter tensor {key!r} targets no known LLaVA weight", file)
        halves.setdefault(target, {})[match["ab"]] = ref
    targets: dict[str, dict[str, LoraPair]] = {}
    for (component, name), ab in halves.items():
        if set(ab) != {"A", "B"}:
            raise CorruptFileError(f"{name}: lora_{'A' if 'A' not in ab else 'B'} missing", file)
        a, b = ab["A"], ab["B"]
        if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != b.shape[1]:
            raise CorruptFileError(f"{name}: lora_A {list(a.shape)} and lora_B {list(b.shape)} do not pair", file)
        targets.setdefault(component, {})[name] = LoraPair(a, b)
    if not targets:
        raise CorruptFileError("adapter holds no LoRA tensors", file)
    return AdapterWeights(folder, file, r, alpha, rslora, targets)


def check_targets(adapter: AdapterWeights, component: str, base_shapes: dict[str, tuple[int, ...]]) -> dict[str, LoraPair]:
    """The adapter's targets in `component`, each present in the base with the trained-on shape."""
    pairs = adapter.targets.get(component, {})
    for name, pair in pairs.items():
        shape = base_shapes.get(name)
        if shape is None:
            raise MismatchError(f"adapter targets {name}, which the base model does not have (other base?)", adapter.file)
        if tuple(shape) != pair.shape:
            raise MismatchError(
                f"adapter was trained on a different base: {name} is {list(pair.shape)} in the adapter, "
                f"{list(shape)} in the base", adapter.file,
            )  # fmt: skip
    return pairs


def merge_one(load_base: Callable[[], object], pair: LoraPair, scaling: float, name: str, source: Path):
    """W + scaling * B @ A in float32, checked finite."""
    import torch

    weight = load_base().to(torch.float32, copy=True)
    a, b = pair.load()
    weight.addmm_(b, a, alpha=scaling)
    del a, b
    if not torch.isfinite(weight).all():
        raise NumericsError(f"{name} is not finite after merging the LoRA (scale {scaling:g})", source)
    return weight


def merged_tensors(base: LazyTensors, adapter: AdapterWeights, pairs: dict[str, LoraPair], *, scale: float = 1.0) -> LazyTensors:
    """`base` with every tensor in `pairs` replaced by a loader of its merged value."""
    for name, load in base:
        pair = pairs.get(name)
        if pair is None:
            yield name, load
        else:
            s = adapter.scaling(pair) * scale
            yield name, (lambda load=load, pair=pair, s=s, name=name: merge_one(load, pair, s, name, adapter.file))


def merged_lm_tensors(ckpt: Checkpoint, adapter_dir: str | Path, *, scale: float = 1.0) -> LazyTensors:
    """The checkpoint's LM tensors with the adapter's LM targets merged (checked now, merged lazily)."""
    adapter = read_adapter(adapter_dir)
    pairs = check_targets(adapter, "lm", lm_shapes(ckpt.text))
    return merged_tensors(ckpt.lm_tensors(), adapter, pairs, scale=scale)


def merged_projector_tensors(ckpt: Checkpoint, adapter_dir: str | Path, *, scale: float = 1.0) -> LazyTensors:
    """The projector tensors with any adapter targets on the projector merged (usually none)."""
    adapter = read_adapter(adapter_dir)
    shapes = projector_shapes(ckpt.projector_type, ckpt.vision.hidden_size, ckpt.text.hidden_size)
    pairs = check_targets(adapter, "projector", shapes)
    return merged_tensors(ckpt.projector_tensors(), adapter, pairs, scale=scale)
