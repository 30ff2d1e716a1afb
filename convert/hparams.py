"""Read HF-style config files into TextSpec / VisionSpec, filling the defaults HF would fill.

Real configs omit every value equal to its class default (llava-hf's `text_config` is a handful of
keys), so the defaults of `LlamaConfig` and `CLIPVisionConfig` are spelled out here instead of
importing transformers, whose config classes rename keys between major versions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from factedge.convert.specs import TextSpec, VisionSpec
from factedge.edge.errors import ConfigError, CorruptFileError, InputError

# transformers LlamaConfig defaults
LLAMA_DEFAULTS: dict[str, Any] = {
    "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
    "num_attention_heads": 32, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 2048,
    "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
}  # fmt: skip
# transformers CLIPVisionConfig defaults
CLIP_VISION_DEFAULTS: dict[str, Any] = {
    "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
    "image_size": 224, "patch_size": 32, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
}  # fmt: skip
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def read_json(path: Path, *, required: bool = True) -> dict[str, Any]:
    """A JSON object from `path` ({} when absent and not required); typed errors name the file."""
    if not path.is_file():
        if required:
            raise InputError("file missing", path)
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptFileError(f"not valid JSON: {exc}", path) from exc
    except RecursionError:
        raise CorruptFileError("not valid JSON: nested too deeply", path) from None
    if not isinstance(data, dict):
        raise CorruptFileError("expected a JSON object", path)
    return data


def _get(cfg: dict[str, Any], defaults: dict[str, Any], key: str) -> Any:
    value = cfg.get(key)
    return defaults[key] if value is None else value


# Bounds on sizes a config may claim: far above any released model, and low enough that a forged
# value cannot make the shape tables (one entry per layer) or a division fail before a file is read.
LIMITS = {"layers": 1024, "width": 1 << 20, "heads": 4096, "vocab": 1 << 24, "positions": 1 << 24, "image": 1 << 14}


def count(cfg: dict[str, Any], defaults: dict[str, Any], key: str, limit: str, source: Path, *, lo: int = 1) -> int:
    """An integer hyperparameter in [lo, LIMITS[limit]], or ConfigError naming the key and the file."""
    value = _get(cfg, defaults, key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) \
            or not lo <= value <= LIMITS[limit]:
        raise ConfigError(f"{key} = {value!r} is not an integer in [{lo}, {LIMITS[limit]}]", source)
    return int(value)


def real(cfg: dict[str, Any], defaults: dict[str, Any], key: str, source: Path, *, lo: float, hi: float) -> float:
    """A finite float hyperparameter in (lo, hi], or ConfigError naming the key and the file."""
    value = _get(cfg, defaults, key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo < value <= hi:
        raise ConfigError(f"{key} = {value!r} is not a number in ({lo:g}, {hi:g}]", source)
    return float(value)


def _rope_theta(cfg: dict[str, Any], source: Path) -> float:
    """rope_theta, also from transformers-5 `rope_parameters`; scaled RoPE is not something LLaVA uses."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise ConfigError(f"RoPE scaling {kind!r} is not supported", source)
    theta = params.get("rope_theta") or _get(cfg, LLAMA_DEFAULTS, "rope_theta")
    return real({"rope_theta": theta}, LLAMA_DEFAULTS, "rope_theta", source, lo=0.0, hi=1e12)


def _first_id(value: Any, default: int, source: Path) -> int:
    if isinstance(value, list):  # some configs list several eos ids
        value = value[0] if value else None
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < LIMITS["vocab"]:
        raise ConfigError(f"special token id {value!r} is not a token id", source)
    return value


def text_spec(cfg: dict[str, Any], source: Path, *, vocab_rows: int, special: dict[str, int]) -> TextSpec:
    """TextSpec from a Llama config dict; `vocab_rows` is the embedding's row count (the truth)."""
    g = lambda key: _get(cfg, LLAMA_DEFAULTS, key)  # noqa: E731
    heads = count(cfg, LLAMA_DEFAULTS, "num_attention_heads", "heads", source)
    kv_heads = count({"num_key_value_heads": cfg.get("num_key_value_heads") or heads}, {}, "num_key_value_heads",
                     "heads", source)
    hidden = count(cfg, LLAMA_DEFAULTS, "hidden_size", "width", source)
    if hidden % heads or heads % kv_heads:
        raise ConfigError(f"hidden_size {hidden} / heads {heads} / kv heads {kv_heads} do not divide", source)
    head_dim = cfg.get("head_dim")
    if head_dim is not None and int(head_dim) != hidden // heads:
        raise ConfigError(f"head_dim {head_dim} != hidden_size / num_attention_heads is not supported", source)
    unk = special.get("unk", 0)
    return TextSpec(
        vocab_size=vocab_rows,
        hidden_size=hidden,
        intermediate_size=count(cfg, LLAMA_DEFAULTS, "intermediate_size", "width", source),
        num_layers=count(cfg, LLAMA_DEFAULTS, "num_hidden_layers", "layers", source),
        num_heads=heads,
        num_kv_heads=kv_heads,
        rms_norm_eps=real(cfg, LLAMA_DEFAULTS, "rms_norm_eps", source, lo=0.0, hi=1.0),
        rope_theta=_rope_theta(cfg, source),
        max_position_embeddings=count(cfg, LLAMA_DEFAULTS, "max_position_embeddings", "positions", source),
        tie_word_embeddings=bool(g("tie_word_embeddings")),
        bos_token_id=special.get("bos", _first_id(cfg.get("bos_token_id"), 1, source)),
        eos_token_id=special.get("eos", _first_id(cfg.get("eos_token_id"), 2, source)),
        unk_token_id=unk,
        pad_token_id=special.get("pad", unk),
    )


def clip_vision_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The vision part of a CLIPConfig (or the CLIPVisionConfig itself)."""
    for key in ("vision_config", "vision_config_dict"):
        if isinstance(cfg.get(key), dict):
            return cfg[key]
    return cfg


def _triple(value: Any, default: tuple[float, float, float]) -> tuple[float, float, float]:
    if isinstance(value, (list, tuple)) and len(value) == 3:
        return tuple(float(x) for x in value)  # type: ignore[return-value]
    return default


def vision_spec(
    vcfg: dict[str, Any], preprocessor: dict[str, Any], source: Path, *, feature_layer: Any, select_feature: str
) -> VisionSpec:
    """VisionSpec from a CLIPVisionConfig dict plus preprocessor_config.json (mean/std)."""
    g = lambda key: _get(vcfg, CLIP_VISION_DEFAULTS, key)  # noqa: E731
    if isinstance(feature_layer, list):
        if len(feature_layer) != 1:
            raise ConfigError(f"multi-layer vision features {feature_layer} are not supported", source)
        feature_layer = feature_layer[0]
    select = {"default": "patch", "full": "cls_patch"}.get(select_feature, select_feature)
    if select not in ("patch", "cls_patch"):
        raise ConfigError(f"vision feature selection {select_feature!r} is not supported", source)
    image_size = count(vcfg, CLIP_VISION_DEFAULTS, "image_size", "image", source)
    patch_size = count(vcfg, CLIP_VISION_DEFAULTS, "patch_size", "image", source)
    hidden = count(vcfg, CLIP_VISION_DEFAULTS, "hidden_size", "width", source)
    heads = count(vcfg, CLIP_VISION_DEFAULTS, "num_attention_heads", "heads", source)
    layers = count(vcfg, CLIP_VISION_DEFAULTS, "num_hidden_layers", "layers", source)
    if hidden % heads:
        raise ConfigError(f"vision hidden_size {hidden} is not a multiple of num_attention_heads {heads}", source)
    if isinstance(feature_layer, bool) or not isinstance(feature_layer, int) or not -layers <= feature_layer <= layers:
        raise ConfigError(f"vision feature layer {feature_layer!r} is not a layer of a {layers}-layer tower", source)
    if image_size % patch_size:
        raise ConfigError(f"image_size {image_size} is not a multiple of patch_size {patch_size}", source)
    return VisionSpec(
        image_size=image_size,
        patch_size=patch_size,
        hidden_size=hidden,
        intermediate_size=count(vcfg, CLIP_VISION_DEFAULTS, "intermediate_size", "width", source),
        num_layers=layers,
        num_heads=heads,
        layer_norm_eps=real(vcfg, CLIP_VISION_DEFAULTS, "layer_norm_eps", source, lo=0.0, hi=1.0),
        hidden_act=str(g("hidden_act")),
        image_mean=_triple(preprocessor.get("image_mean"), CLIP_MEAN),
        image_std=_triple(preprocessor.get("image_std"), CLIP_STD),
        feature_layer=int(feature_layer),
        select_feature=select,
    )


def _content(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def is_spm(tokenizer_dir: str | Path) -> bool:
    """Whether a folder's tokenizer is LLaMA's SentencePiece `tokenizer.model` (else a tokenizer.json)."""
    return (Path(tokenizer_dir) / "tokenizer.model").is_file()


def added_token_list(data: dict[str, Any], path: Path) -> list[dict[str, Any]]:
    """tokenizer.json's `added_tokens` ([{id, content, special, ...}]), checked."""
    added = data.get("added_tokens") or []
    if not isinstance(added, list) or not all(isinstance(a, dict) and isinstance(a.get("id"), int)
                                              and isinstance(a.get("content"), str) for a in added):
        raise CorruptFileError("added_tokens must be a list of {id, content}", path)
    return added


def added_tokens(tokenizer_dir: Path) -> dict[str, int]:
    """Tokens added on top of the base vocab: added_tokens.json, tokenizer.json's added_tokens (where
    transformers 5 keeps them) and tokenizer_config's decoder."""
    try:
        found = {str(k): int(v) for k, v in read_json(tokenizer_dir / "added_tokens.json", required=False).items()}
    except (TypeError, ValueError) as exc:
        raise CorruptFileError(f"token ids must be integers ({exc})", tokenizer_dir / "added_tokens.json") from exc
    if not is_spm(tokenizer_dir):  # a BPE tokenizer.json names its specials here
        path = tokenizer_dir / "tokenizer.json"
        found.update({a["content"]: a["id"] for a in added_token_list(read_json(path, required=False), path)})
    decoder = read_json(tokenizer_dir / "tokenizer_config.json", required=False).get("added_tokens_decoder") or {}
    if not isinstance(decoder, dict):
        raise CorruptFileError("added_tokens_decoder must be an object", tokenizer_dir / "tokenizer_config.json")
    for token_id, data in decoder.items():
        if _content(data):
            try:
                found[_content(data)] = int(token_id)  # type: ignore[index]
            except ValueError as exc:
                raise CorruptFileError(f"added_tokens_decoder key {token_id!r} is not a token id",
                                       tokenizer_dir / "tokenizer_config.json") from exc
    return found


def special_ids(tokenizer_dir: Path) -> dict[str, int]:
    """bos/eos/unk/pad ids named by tokenizer_config.json / special_tokens_map.json, when resolvable."""
    tok_cfg = read_json(tokenizer_dir / "tokenizer_config.json", required=False)
    tok_map = read_json(tokenizer_dir / "special_tokens_map.json", required=False)
    known = {"<unk>": 0, "<s>": 1, "</s>": 2} | added_tokens(tokenizer_dir)  # LLaMA SPM's fixed ids
    ids: dict[str, int] = {}
    for role in ("bos", "eos", "unk", "pad"):
        content = _content(tok_map.get(f"{role}_token")) or _content(tok_cfg.get(f"{role}_token"))
        if content is not None and content in known:
            ids[role] = known[content]
    return ids
