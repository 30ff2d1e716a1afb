"""Build tiny checkpoints once and reuse them (test fixtures, the demo).

A build takes seconds and many tests share it, so results are kept under a cache folder, keyed by a
hash of the builder's source, the vocab file and the parameters: editing the builder invalidates the
cache by itself. Builds write in place (configs name absolute paths, so they cannot be built
elsewhere and moved); a `.complete` marker written last tells a finished build from an interrupted
one, and a file lock keeps parallel test processes from building the same one twice.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from factedge.train.base.spm_vocab import default_vocab_path
from factedge.train.base.tiny import build_tiny, clip_folder_name
from factedge.train.base.tiny_smol import build_tiny_smol

ENV_TEST_CACHE = "FACTEDGE_TEST_CACHE"
_MARKER = ".complete"
STALE_AFTER_S = 3600
_SOURCES = ("tiny.py", "tiny_weights.py", "tensor_files.py", "spm_vocab.py", "tiny_cache.py", "smol.py", "tiny_smol.py")


@dataclass(frozen=True)
class TinyCheckpoint:
    """Where a tiny checkpoint's parts are. `os.fspath(ckpt)` / `Path(ckpt)` give `root`."""

    layout: str
    root: Path  # what build_tiny returned (llava-hf / llava: the model folder; rlhf: the root)
    model_dir: Path  # folder with config.json + LM weights (rlhf: root/sft_model)
    clip_dir: Path | None  # openai-style CLIP folder (original LLaVA layouts only)
    adapter_dir: Path | None  # PEFT LoRA folder (rlhf only)
    image_size: int
    projector: str
    seed: int

    def __fspath__(self) -> str:
        return str(self.root)


def default_cache_dir() -> Path:
    env = os.environ.get(ENV_TEST_CACHE)
    return Path(env) if env else Path(__file__).resolve().parents[2] / ".cache" / "tests"


def _key(params: dict, vocab: Path) -> str:
    h = hashlib.sha256()
    here = Path(__file__).resolve().parent
    for name in _SOURCES:
        h.update((here / name).read_bytes())
    h.update(hashlib.sha256(vocab.read_bytes()).digest())
    h.update(json.dumps(params, sort_keys=True).encode())
    return h.hexdigest()[:16]


@contextmanager
def locked(lock_path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # Windows: no cross-process lock, builds are still atomic per file
        yield
        return
    with open(lock_path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _prune_stale(cache: Path, variant: str, keep: str) -> None:
    """Drop builds of the same variant made by an older builder source (the hash changed). Only
    those finished over an hour ago: a test session started before the edit may still read one."""
    cutoff = time.time() - STALE_AFTER_S
    for old in cache.glob(f"{variant}-*"):
        marker = old / _MARKER
        same_variant = old.name[len(variant) + 1:].isalnum()  # not a longer variant's name
        if old.name != keep and same_variant and marker.is_file() and marker.stat().st_mtime < cutoff:
            shutil.rmtree(old, ignore_errors=True)


def _describe(layout: str, root: Path, params: dict) -> TinyCheckpoint:
    clip_name = clip_folder_name(params["image_size"])
    if layout == "llava-hf":
        model_dir, clip_dir, adapter_dir = root, None, None
    elif layout == "llava":
        model_dir, clip_dir, adapter_dir = root, root.parent / clip_name, None
    else:
        model_dir, clip_dir, adapter_dir = root / "sft_model", root / clip_name, root / "rlhf_lora_adapter_model"
    return TinyCheckpoint(layout, root, model_dir, clip_dir, adapter_dir, params["image_size"],
                          params["projector"], params["seed"])


def cached_tiny(
    layout: str,
    *,
    image_size: int = 224,
    projector: str | None = None,
    sharded: bool | None = None,
    seed: int = 0,
    adapter_format: str = "bin",
    cache_dir: str | Path | None = None,
    vocab_gguf: str | Path | None = None,
    lm: str = "vicuna",
) -> TinyCheckpoint:
    """`build_tiny` once per (builder source, vocab, parameters); later calls reuse the folder.
    lm "smollm2": the LLaVA-on-SmolLM2 build of tiny_smol (llava-hf or llava layout)."""
    vocab = Path(vocab_gguf) if vocab_gguf else default_vocab_path()
    # resolve defaults so that equivalent requests share one build
    projector = projector or ("linear" if layout == "llava-rlhf" else "mlp2x_gelu")
    sharded = bool(sharded) if layout == "llava-hf" else sharded is not False
    params = {"layout": layout, "image_size": image_size, "projector": projector, "sharded": sharded,
              "seed": seed, "adapter_format": adapter_format, **({"lm": lm} if lm != "vicuna" else {})}
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    parts = [layout, "" if lm == "vicuna" else lm, str(image_size), projector, "sharded" if layout == "llava-hf" and sharded else "",
             "1file" if layout != "llava-hf" and not sharded else "",
             "adapter-st" if adapter_format == "safetensors" else "", f"s{seed}"]
    variant = "-".join(p for p in parts if p)  # readable; the hash below decides
    name = f"{variant}-{_key(params, vocab)}"
    folder = cache / name
    record = folder / _MARKER
    with locked(cache / f".{name}.lock"):
        if record.is_file():
            root = folder / record.read_text().strip()
        else:
            if folder.exists():
                shutil.rmtree(folder)  # an interrupted build
            # llava-hf files go one level down, so the model folder holds exactly the hub's files
            hf_name = "llava-1.5-tiny-hf" if lm == "vicuna" else f"llava-{lm}-tiny-hf"
            target = folder / hf_name if layout == "llava-hf" else folder
            if lm == "smollm2":
                built = build_tiny_smol(layout, target, image_size=image_size, seed=seed)  # type: ignore[arg-type]
            else:
                built = build_tiny(layout, target, image_size=image_size, projector=projector, sharded=sharded,
                                   seed=seed, adapter_format=adapter_format, vocab_gguf=vocab)
            rel = built.relative_to(folder).as_posix() or "."
            tmp = record.with_name(record.name + ".tmp")
            tmp.write_text(rel + "\n")
            os.replace(tmp, record)
            root = built
            _prune_stale(cache, variant, keep=name)
    return _describe(layout, root.resolve(), params)
