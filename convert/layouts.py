"""Read a LLaVA-family checkpoint folder (llava-hf, original LLaVA, LLaVA-RLHF) into a `Checkpoint`.

Each layout differs only in file names, key prefixes and where the vision tower lives; after this
module everything is canonical (see specs.py). Nothing is loaded here: headers are read and checked
against the config (missing tensors, wrong shapes, truncated files fail now, with the file named),
and the Checkpoint hands out per-tensor loaders.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Callable

from factedge.convert import hparams
from factedge.convert.projectors import projector
from factedge.convert.shapes import Shapes, lm_shapes, projector_shapes, vision_shapes
from factedge.convert.specs import Checkpoint, LayoutName, LazyTensors, ProjectorType, TextSpec, VisionSpec
from factedge.convert.weights import TensorRef, find_weight_files, index_files, loader
from factedge.edge.errors import ConfigError, InputError, LayoutError, MismatchError

LAYOUTS: tuple[str, ...] = ("llava-hf", "llava", "llava-rlhf")
RLHF_SFT_DIR, RLHF_ADAPTER_DIR = "sft_model", "rlhf_lora_adapter_model"
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")

# (source key prefix, component, canonical prefix); first match wins.
_KEY_RULES: dict[str, tuple[tuple[str, str, str], ...]] = {
    "llava-hf": (
        ("language_model.model.", "lm", "model."),  # transformers < 4.52
        ("language_model.lm_head.", "lm", "lm_head."),
        ("model.language_model.", "lm", "model."),  # transformers >= 4.52
        ("lm_head.", "lm", "lm_head."),
        ("vision_tower.vision_model.", "vision", ""),
        ("model.vision_tower.vision_model.", "vision", ""),
        # transformers >= 5 saves the tower without its `vision_model.` level
        ("vision_tower.", "vision", ""),
        ("model.vision_tower.", "vision", ""),
        ("multi_modal_projector.linear_1.", "projector", "0."),
        ("multi_modal_projector.linear_2.", "projector", "2."),
        ("model.multi_modal_projector.linear_1.", "projector", "0."),
        ("model.multi_modal_projector.linear_2.", "projector", "2."),
    ),
    "llava": (
        ("model.mm_projector.", "projector", ""),  # nn.Linear (`weight`) or nn.Sequential (`0.weight`)
        ("model.vision_tower.", "ignored", ""),  # a tower saved inside the LM checkpoint: we read the CLIP folder
        ("model.", "lm", "model."),
        ("lm_head.", "lm", "lm_head."),
    ),
    "clip": (("vision_model.", "vision", ""),),
}


# Extra names a PEFT adapter may use for base weights (module paths below `base_model.model.`).
_ADAPTER_RULES: tuple[tuple[str, str, str], ...] = (
    ("model.vision_tower.vision_tower.vision_model.", "vision", ""),  # LLaVA's CLIPVisionTower wrapper
    ("layers.", "lm", "model.layers."),  # PEFT wrapped a bare LlamaModel
)


def canonical_name(key: str) -> tuple[str, str] | None:
    """(component, canonical name) of a base-model weight key in any known layout, or None."""
    for prefix, component, canon in _ADAPTER_RULES + _KEY_RULES["llava-hf"] + _KEY_RULES["llava"]:
        if key.startswith(prefix):
            if component == "ignored":
                return None
            name = canon + key[len(prefix) :]
            if component == "projector" and name in ("weight", "bias"):
                name = "0." + name
            return component, name
    return None


def detect_layout(path: str | Path) -> LayoutName:
    """Which layout a folder is, from its config.json (or its `sft_model/` sub-folder)."""
    root = Path(path)
    if not root.is_dir():
        raise InputError("checkpoint folder missing" if not root.exists() else "not a folder", root)
    if (root / RLHF_SFT_DIR / "config.json").is_file():
        return "llava-rlhf"
    cfg_path = root / "config.json"
    if not cfg_path.is_file():
        raise LayoutError(f"unknown layout: looked for config.json and {RLHF_SFT_DIR}/config.json", root)
    cfg = hparams.read_json(cfg_path)
    archs = cfg.get("architectures") or []
    if "LlavaForConditionalGeneration" in archs or (cfg.get("model_type") == "llava" and "text_config" in cfg):
        return "llava-hf"
    if "LlavaLlamaForCausalLM" in archs or "mm_vision_tower" in cfg or "mm_hidden_size" in cfg:
        return "llava"
    raise LayoutError(
        f"unknown layout: architectures {archs} is neither LlavaForConditionalGeneration (llava-hf) nor "
        f"LlavaLlamaForCausalLM/mm_vision_tower (LLaVA), and no {RLHF_SFT_DIR}/ (LLaVA-RLHF)",
        cfg_path,
    )


def _split(refs: dict[str, TensorRef], rules: tuple[tuple[str, str, str], ...]) -> dict[str, dict[str, TensorRef]]:
    parts: dict[str, dict[str, TensorRef]] = {"lm": {}, "vision": {}, "projector": {}, "ignored": {}}
    for key, ref in refs.items():
        for prefix, component, canon in rules:
            if key.startswith(prefix):
                parts[component][canon + key[len(prefix) :]] = ref
                break
    if set(parts["projector"]) <= {"weight", "bias"}:  # LLaVA's bare nn.Linear projector
        parts["projector"] = {"0." + k: v for k, v in parts["projector"].items()}
    return parts


_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def _check(found: dict[str, TensorRef], expected: Shapes, what: str, config: Path) -> dict[str, TensorRef]:
    """The expected tensors, in order; a missing tensor or wrong shape names the file and the config,
    and so does a layer the weights hold beyond the config's count (converting would drop it)."""
    if not found:
        raise MismatchError(f"no {what} tensors found in the weights", config.parent)
    n_layers = len({m.group(1) for name in expected if (m := _LAYER_INDEX.search(name))})
    beyond = sorted(ref.key for name, ref in found.items() if (m := _LAYER_INDEX.search(name)) and int(m.group(1)) >= n_layers)
    if beyond:
        raise MismatchError(f"{what} tensor {beyond[0]} is a layer beyond the {n_layers} that {config.name} declares", config)
    files = sorted({ref.file.name for ref in found.values()})
    for name, shape in expected.items():
        ref = found.get(name)
        if ref is None:
            raise MismatchError(f"{what} tensor {name} missing from {', '.join(files)} ({config.name} implies it)", config)
        if ref.shape != shape:
            raise MismatchError(f"{what} tensor {ref.key}: shape {list(ref.shape)} but {config.name} implies {list(shape)}", ref.file)
    return {name: found[name] for name in expected}


def _lazy(refs: dict[str, TensorRef]) -> Callable[[], LazyTensors]:
    return lambda: ((name, loader(ref)) for name, ref in refs.items())


def _weights(folder: Path) -> tuple[list[Path], dict[str, TensorRef]]:
    """(files to hash, tensors by key) of a folder's weights."""
    files, index = find_weight_files(folder)
    if (folder / "mm_projector.bin").is_file():  # LLaVA stage-1 projector saved apart
        files.append(folder / "mm_projector.bin")
    if not files:
        raise InputError("no weights found (looked for model.safetensors[.index.json], pytorch_model.bin[.index.json])", folder)
    return files + ([index] if index else []), index_files(files)


def _lm_refs(lm: dict[str, TensorRef], cfg: dict[str, Any], cfg_path: Path, tok_dir: Path) -> tuple[TextSpec, dict[str, TensorRef]]:
    embed = lm.get("model.embed_tokens.weight")
    if embed is None:
        raise MismatchError("model.embed_tokens.weight missing from the weights", cfg_path)
    text = hparams.text_spec(cfg, cfg_path, vocab_rows=embed.shape[0], special=hparams.special_ids(tok_dir))
    declared = cfg.get("vocab_size")
    if declared is not None and int(declared) != text.vocab_size:
        raise MismatchError(f"vocab_size {declared} but the embedding {embed.file.name} has {text.vocab_size} rows", cfg_path)
    if "lm_head.weight" not in lm and text.tie_word_embeddings:
        lm = {**lm, "lm_head.weight": embed}
    return text, _check(lm, lm_shapes(text), "language-model", cfg_path)


def _hub_cache_dir(repo_id: str) -> Path | None:
    """A snapshot of `repo_id` already in the local Hugging Face cache (we never download)."""
    hub = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME") or os.path.expanduser("~/.cache/huggingface"), "hub"
    )
    repo = Path(hub) / ("models--" + repo_id.replace("/", "--"))
    ref = repo / "refs" / "main"
    if ref.is_file() and (repo / "snapshots" / ref.read_text().strip() / "config.json").is_file():
        return repo / "snapshots" / ref.read_text().strip()
    found = [p for p in (repo / "snapshots").glob("*") if (p / "config.json").is_file()]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def resolve_vision_tower(cfg: dict[str, Any], cfg_path: Path, vision_tower: str | Path | None) -> Path:
    """The CLIP folder: `vision_tower=`, else config's mm_vision_tower as a local path or cached hub repo."""
    if vision_tower is not None:
        folder = Path(vision_tower)
        if not (folder / "config.json").is_file():
            raise InputError("vision tower folder has no config.json", folder)
        return folder
    name = cfg.get("mm_vision_tower") or cfg.get("vision_tower")
    if not name:
        raise InputError("config names no vision tower (mm_vision_tower); pass vision_tower=", cfg_path)
    for cand in (Path(name), cfg_path.parent / name):
        if (cand / "config.json").is_file():
            return cand
    cached = _hub_cache_dir(str(name))
    if cached is not None:
        return cached
    raise InputError(f"vision tower {name!r} is not a local folder; pass vision_tower=<CLIP folder>", cfg_path)


def _clip(folder: Path, feature_layer: Any, select_feature: str) -> tuple[VisionSpec, dict[str, TensorRef], list[Path]]:
    cfg_path = folder / "config.json"
    vcfg = hparams.clip_vision_config(hparams.read_json(cfg_path))
    pre = hparams.read_json(folder / "preprocessor_config.json", required=False)
    vision = hparams.vision_spec(vcfg, pre, cfg_path, feature_layer=feature_layer, select_feature=select_feature)
    files, refs = _weights(folder)
    found = _split(refs, _KEY_RULES["clip"])["vision"]
    extra = [cfg_path] + ([folder / "preprocessor_config.json"] if pre else [])
    return vision, _check(found, vision_shapes(vision), "vision", cfg_path), files + extra


def _projector_type(cfg: dict[str, Any], cfg_path: Path) -> ProjectorType:
    return projector(cfg.get("mm_projector_type"), cfg_path).name


TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "chat_template.json")


def _tokenizer_files(tok_dir: Path) -> list[Path]:
    """The tokenizer's files: SentencePiece `tokenizer.model` or byte-level BPE `tokenizer.json`, plus configs."""
    if not any((tok_dir / n).is_file() for n in ("tokenizer.model", "tokenizer.json")):
        raise InputError("no tokenizer (tokenizer.model or tokenizer.json) in the checkpoint", tok_dir)
    return [tok_dir / n for n in TOKENIZER_FILES if (tok_dir / n).is_file()]


def _load_llava_hf(root: Path, vision_tower: str | Path | None) -> Checkpoint:
    cfg_path = root / "config.json"
    cfg = hparams.read_json(cfg_path)
    text_cfg = cfg.get("text_config") or {}
    files, refs = _weights(root)
    parts = _split(refs, _KEY_RULES["llava-hf"])
    text, lm = _lm_refs(parts["lm"], text_cfg, cfg_path, root)
    feature_layer = cfg.get("vision_feature_layer", -2)
    select = cfg.get("vision_feature_select_strategy", "default")
    if vision_tower is not None:
        vision, vis, clip_files = _clip(Path(vision_tower), feature_layer, select)
    else:
        pre = hparams.read_json(root / "preprocessor_config.json", required=False)
        vcfg = cfg.get("vision_config") or {}
        vision = hparams.vision_spec(vcfg, pre, cfg_path, feature_layer=feature_layer, select_feature=select)
        vis, clip_files = _check(parts["vision"], vision_shapes(vision), "vision", cfg_path), []
    act = cfg.get("projector_hidden_act", "gelu")
    if act != "gelu":
        raise ConfigError(f"projector_hidden_act {act!r} is not supported (gelu)", cfg_path)
    proj = _check(parts["projector"], projector_shapes("mlp2x_gelu", vision.hidden_size, text.hidden_size), "projector", cfg_path)
    image_token = cfg.get("image_token_index", cfg.get("image_token_id", 32000))
    return Checkpoint(
        layout="llava-hf", root=root, text=text, vision=vision, projector_type="mlp2x_gelu", tokenizer_dir=root,
        image_token_id=int(image_token), source_files=[cfg_path] + files + _tokenizer_files(root) + clip_files,
        _lm=_lazy(lm), _vision=_lazy(vis), _projector=_lazy(proj),
    )  # fmt: skip


def _load_llava(root: Path, vision_tower: str | Path | None, layout: LayoutName) -> Checkpoint:
    cfg_path = root / "config.json"
    cfg = hparams.read_json(cfg_path)
    files, refs = _weights(root)
    parts = _split(refs, _KEY_RULES["llava"])
    text, lm = _lm_refs(parts["lm"], cfg, cfg_path, root)
    clip_dir = resolve_vision_tower(cfg, cfg_path, vision_tower)
    feature = cfg.get("mm_vision_select_feature", "patch")
    vision, vis, clip_files = _clip(clip_dir, cfg.get("mm_vision_select_layer", -2), feature)
    mm_hidden = cfg.get("mm_hidden_size")
    if mm_hidden is not None and int(mm_hidden) != vision.hidden_size:
        raise MismatchError(f"mm_hidden_size {mm_hidden} but the vision tower {clip_dir} has hidden size {vision.hidden_size}", cfg_path)
    ptype = _projector_type(cfg, cfg_path)
    proj = _check(parts["projector"], projector_shapes(ptype, vision.hidden_size, text.hidden_size), "projector", cfg_path)
    return Checkpoint(
        layout=layout, root=root, text=text, vision=vision, projector_type=ptype, tokenizer_dir=root,
        source_files=[cfg_path] + files + _tokenizer_files(root) + clip_files,
        _lm=_lazy(lm), _vision=_lazy(vis), _projector=_lazy(proj),
    )  # fmt: skip


def check_adapter_dir(folder: str | Path) -> Path:
    """A PEFT LoRA folder: adapter_config.json plus adapter_model.safetensors or .bin."""
    folder = Path(folder)
    if not (folder / "adapter_config.json").is_file():
        raise InputError("LoRA adapter folder has no adapter_config.json", folder / "adapter_config.json")
    if not any((folder / n).is_file() for n in ADAPTER_FILES):
        raise InputError(f"LoRA adapter folder has none of {', '.join(ADAPTER_FILES)}", folder)
    return folder


def load_checkpoint(
    path: str | Path,
    *,
    vision_tower: str | Path | None = None,
    lora: str | Path | None = None,
    layout: LayoutName | None = None,
) -> Checkpoint:
    """Read a checkpoint folder (layout detected unless given); tensors stay on disk until asked for."""
    root = Path(path)
    layout = layout or detect_layout(root)
    if layout not in LAYOUTS:
        raise ConfigError(f"unknown layout {layout!r} (known: {', '.join(LAYOUTS)})")
    if not root.is_dir():
        raise InputError("checkpoint folder missing", root)
    if layout == "llava-hf":
        ckpt = _load_llava_hf(root, vision_tower)
    elif layout == "llava":
        ckpt = _load_llava(root, vision_tower, "llava")
    else:
        sft = root / RLHF_SFT_DIR
        if not (sft / "config.json").is_file():
            raise LayoutError(f"LLaVA-RLHF layout needs {RLHF_SFT_DIR}/config.json", root)
        ckpt = _load_llava(sft, vision_tower, "llava-rlhf")
        ckpt.root = root
        if lora is None and (root / RLHF_ADAPTER_DIR).is_dir():
            lora = root / RLHF_ADAPTER_DIR
    if lora is not None:
        ckpt.adapter_dir = check_adapter_dir(lora)
        ckpt.source_files += [p for p in sorted(ckpt.adapter_dir.iterdir()) if p.name.startswith("adapter_") and p.is_file()]
    return ckpt
