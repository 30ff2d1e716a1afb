"""Training configs as dataclasses, with the paper's defaults, read from YAML/TOML plus CLI overrides.

Every number of the recipe (FACT_RLHF.md) is a field here, so a run is fully described by its
`config.json` and any stage can be re-run with `--key value` changes. `load_config` is generic: any
dataclass (helper RL's `PPOConfig` / `GroupRLConfig` in `rl_config.py` included) loads the same way.

Overrides: `--key value` or `--key=value`; nested fields with dots (`--model.base DIR`,
`--lora.r 8`); values typed from the field's annotation (bool accepts true/false/1/0/yes/no, lists
accept `a,b,c` or a JSON list, optional fields accept `none`/`null`). An unknown key, a missing
value or a value of the wrong type is a ConfigError naming the key.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence, TypeVar

from factedge.edge.errors import ConfigError, CorruptFileError, InputError

T = TypeVar("T")

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ---------------------------------------------------------------- the configs
@dataclass
class ModelConfig:
    """Which checkpoint to start from and how to hold it in memory."""

    base: str = ""  # checkpoint folder: llava-hf, original LLaVA or LLaVA-RLHF (its sft_model is the base)
    vision_tower: str | None = None  # CLIP folder, when config.json's mm_vision_tower does not resolve
    dtype: str = "float32"  # parameter dtype while training: float32 | bfloat16 | float16
    attn_implementation: str = "sdpa"  # sdpa (fast) | eager (the literal maths, as convert.reference)
    feature_cache: bool = True  # keep frozen-vision features per image (vision never trains)
    feature_cache_mb: float = 4096  # the cache's bound (least recently used images are dropped)


@dataclass
class LoraSettings:
    """LLaVA-RLHF's LoRA shape: rank 64, alpha 16, no dropout, every LLaMA projection."""

    r: int = 64
    alpha: int = 16
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))


SCHEDULERS = ("cosine", "constant_with_warmup", "linear", "constant")


@dataclass
class AdamWSettings:
    """What every optimiser of the recipe shares: AdamW and a transformers schedule. An offline
    stage (SFT, RM, DPO) adds its epochs and batch shape (OptimSettings); the RL loop, whose steps
    are rollouts, adds a warmup in steps (train.rl.config.RLOptim)."""

    lr: float = 2e-5
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    scheduler: str = "cosine"  # one of SCHEDULERS
    max_grad_norm: float = 1.0


@dataclass
class OptimSettings(AdamWSettings):
    """AdamW + schedule + batch shape. `batch_size` is the global batch per optimizer step; it is
    reached with `micro_batch_size` per process and gradient accumulation."""

    warmup_ratio: float = 0.03
    epochs: float = 3.0
    max_steps: int = 0  # > 0: stop after this many optimizer steps (overrides epochs)
    batch_size: int = 128
    micro_batch_size: int = 4


@dataclass
class RunSettings:
    """Where a run writes and how often; the seed that makes a CPU run repeatable."""

    out: str = "runs/run"  # run folder: config.json, metrics.jsonl, checkpoints/, the output model
    seed: int = 42
    mixed_precision: str = "no"  # accelerate: no | bf16 | fp16
    log_every: int = 1
    save_every: int = 0  # optimizer steps between resumable checkpoints (0: only at the end)
    keep_checkpoints: int = 2
    resume: bool = True  # continue from the newest checkpoint in `out` when there is one
    num_threads: int = 0  # torch CPU threads (0: torch's default)


@dataclass
class SFTConfig:
    """Supervised fine-tuning on LLaVA conversation JSON (stage 1 projector, 2 full FT, 3 LoRA RL-init)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: str = ""  # LLaVA conversation JSON (list of {id, image, conversations})
    image_folder: str | None = None  # image paths are relative to this (default: the JSON's folder)
    mode: str = "full"  # full (LM + projector) | lora (LoRA on the LM) | projector (stage 1: projector only)
    train_projector: bool | None = None  # None: True for full/projector, False for lora (the paper's stage 3)
    lora: LoraSettings = field(default_factory=LoraSettings)
    init_adapter: str | None = None  # lora mode: start from this PEFT folder instead of a fresh LoRA
    max_length: int = 1280  # tokens after splicing the image; longer conversations are cut
    save_dtype: str = "bfloat16"  # full-FT output weights (LLaVA-RLHF ships bf16)
    optim: OptimSettings = field(default_factory=OptimSettings)
    run: RunSettings = field(default_factory=lambda: RunSettings(out="runs/sft"))


# ---------------------------------------------------------------- loading
def _read_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise InputError("config file missing", path)
    text = path.read_text(encoding="utf-8")
    suffix = path.suffix.lower()
    if suffix in (".yaml", ".yml", ""):
        import yaml

        errors: tuple[type[BaseException], ...] = (yaml.YAMLError,)
    else:
        errors = (ValueError,)  # tomllib.TOMLDecodeError and json.JSONDecodeError are ValueErrors
    try:
        if suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        elif suffix == ".json":
            data = json.loads(text)
        elif suffix in (".yaml", ".yml", ""):
            data = yaml.safe_load(text)
        else:
            raise ConfigError(f"config file must be .yaml, .yml, .toml or .json, not {suffix!r}", path)
    except errors as exc:
        raise CorruptFileError(f"cannot parse config: {exc}", path) from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise CorruptFileError("config must be a mapping of keys to values", path)
    return data


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """`value` (from a file or a CLI string) as type `tp`, or ConfigError."""
    tp, optional = _strip_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise ConfigError(f"{key}: a value is required")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of its fields")
        return _build(tp, value, key + ".")
    if isinstance(value, dict):
        raise ConfigError(f"{key}: expected a value, not a group of settings")
    origin = typing.get_origin(tp)
    if origin in (list, Sequence, tuple):
        (item,) = typing.get_args(tp)[:1] or (str,)
        if isinstance(value, str):
            text = value.strip()
            value = json.loads(text) if text.startswith("[") else [v for v in text.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v.strip() if isinstance(v, str) else v, item, key) for v in value]
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("true", "1", "yes", "on"):
                return True
            if text in ("false", "0", "no", "off"):
                return False
            raise ValueError(value)
        if tp is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            return int(value) if not isinstance(value, str) else int(value.strip(), 0)
        if tp is float:
            if isinstance(value, bool):
                raise ValueError(value)
            return float(value)
        if tp is str:
            if isinstance(value, (dict, list)):
                raise ValueError(value)
            return str(value)
    except ValueError as exc:
        raise ConfigError(f"{key}: {value!r} is not a valid {tp.__name__}") from exc
    return value


def _build(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown config key {prefix + unknown[0]!r} (known: {', '.join(sorted(names))})")
    base = cls()
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            value = data[f.name]
            if dataclasses.is_dataclass(hints[f.name]) and isinstance(value, dict):
                # a partial nested mapping keeps the defaults of the fields it does not name
                current = dataclasses.asdict(getattr(base, f.name))
                value = {**current, **value}
            kwargs[f.name] = _coerce(value, hints[f.name], prefix + f.name)
    return dataclasses.replace(base, **kwargs)


def parse_overrides(overrides: Sequence[str]) -> dict[str, str]:
    """`["--a.b", "1", "--c=x"]` -> {"a.b": "1", "c": "x"}; a key without a value is an error."""
    out: dict[str, str] = {}
    i = 0
    while i < len(overrides):
        arg = overrides[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"expected --key value, got {arg!r}")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(overrides):
                raise ConfigError(f"--{key} needs a value")
            value = overrides[i + 1]
            i += 1
        out[key.replace("-", "_")] = value
        i += 1
    return out


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--{dotted}: {part} is not a group of settings")
        node = child
    node[parts[-1]] = value


def config_from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """A `cls` from a (nested) mapping, typed and checked like a config file."""
    return _build(cls, data)


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """`cls` from a YAML/TOML/JSON file (optional) with `--key value` overrides applied on top."""
    data = _read_file(Path(path)) if path is not None else {}
    for key, value in parse_overrides(list(overrides)).items():
        _set_dotted(data, key, value)
    return _build(cls, data)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """JSON-ready dict of a config (what a run folder's config.json holds)."""
    return dataclasses.asdict(cfg)


def torch_dtype(name: str):
    """torch dtype from a config string."""
    import torch

    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if name not in table:
        raise ConfigError(f"unknown dtype {name!r} (float32, bfloat16, float16)")
    return table[name]
