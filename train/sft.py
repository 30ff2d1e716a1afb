"""Supervised fine-tuning on LLaVA conversation JSON: projector pretraining (stage 1), full
fine-tune (stage 2) or LoRA (stage 3).

projector: only the projector trains (LLaVA's stage 1, on captions; lr 2e-3 in the paper); the
output is a full LLaVA folder like `full`'s.
full: the LLaMA and (by default) the projector train, CLIP stays frozen; the output is an
original-LLaVA `LlavaLlamaForCausalLM` folder `<run>/sft_model/` (LLaVA-RLHF's `sft_model/`).
lora: a LoRA (r 64, alpha 16, every projection) on the LLaMA, projector frozen unless asked;
the output is a PEFT folder `<run>/lora_adapter/` (+ `non_lora_trainables.bin` holding the
projector when it trained, as LLaVA's LoRA scripts save it; `factedge convert` does not read that
file, so the projector normally stays frozen in this mode, as in the paper).

Loss: next-token cross-entropy on assistant replies (and their `</s>`) only, averaged over the
label tokens of the whole global batch, whatever its split into micro-batches and processes (so
gradient accumulation does not change the result). AdamW, warmup + cosine, grad-norm clip.
Checkpoints every `save_every` steps resume exactly (see loop.py for the batch order).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from factedge.edge.errors import ConfigError, InputError
from factedge.train.config import SFTConfig, torch_dtype
from factedge.train.conversation import encode_conversation, truncate
from factedge.train.data import image_folder, image_path, read_items
from factedge.train.save_llava import projector_state, write_llava_model
from factedge.train.lora import add_lora, save_lora
from factedge.train.loop import Progress, fit, make_accelerator, prepare_fit
from factedge.train.model import IGNORE_INDEX, IMAGE_TOKEN_INDEX, LlavaForTraining, load_from_config
from factedge.train.model import next_token_targets
from factedge.train.run_dir import RunDir, RunResult, seed_everything

SFT_MODEL_DIR, LORA_DIR = "sft_model", "lora_adapter"


@dataclass
class Example:
    """One encoded conversation: ids with IMAGE_TOKEN_INDEX, labels, its image file (or None)."""

    input_ids: list[int]
    labels: list[int]
    image: Path | None

    @property
    def n_targets(self) -> int:
        return sum(1 for t in self.labels[1:] if t != IGNORE_INDEX)


def load_examples(cfg: SFTConfig, model: LlavaForTraining) -> list[Example]:
    """Encode every item of `cfg.data` (truncated to max_length; items with nothing to learn dropped)."""
    items = read_items(cfg.data, required=("conversations",))
    folder = image_folder(cfg.data, cfg.image_folder)
    out = []
    for item in items:
        ids, labels = encode_conversation(item, model.tokenizer, fmt=model.chat_format)
        ids, labels = truncate(ids, labels, cfg.max_length, model.tokens_per_image)
        image = image_path(folder, str(item["image"]), cfg.data) if item.get("image") else None
        if image is None and IMAGE_TOKEN_INDEX in ids:
            raise InputError(f"item {item.get('id')!r} has <image> but no image", cfg.data)
        ex = Example(ids, labels, image)
        if ex.n_targets:
            out.append(ex)
    if not out:
        raise InputError("no item has an assistant reply to learn from", cfg.data)
    return out


def prepare_model(cfg: SFTConfig) -> LlavaForTraining:
    """Load the base and mark what trains (full: LM + projector; lora: a LoRA, projector optional;
    projector: the projector alone)."""
    if cfg.mode not in ("full", "lora", "projector"):
        raise ConfigError(f"mode must be full, lora or projector, not {cfg.mode!r}")
    model = load_from_config(cfg.model)
    train_projector = cfg.train_projector if cfg.train_projector is not None else cfg.mode != "lora"
    if cfg.mode == "lora":
        add_lora(model, cfg.lora, init_from=cfg.init_adapter)
    else:
        model.lm.requires_grad_(cfg.mode == "full")
    model.projector.requires_grad_(train_projector)
    model.vision.requires_grad_(False)
    return model


def _batch_loss(model, raw: LlavaForTraining, batch: list[Example], norm: float) -> tuple[torch.Tensor, int]:
    """Sum of token cross-entropies of `batch` divided by `norm`, and the positions processed."""
    with_image = [ex.image for ex in batch if ex.image is not None]
    embeds = iter(raw.embed_images(with_image)) if with_image else iter(())
    per_sample = [next(embeds) if ex.image is not None else None for ex in batch]
    spliced = raw.splice([ex.input_ids for ex in batch], per_sample, labels=[ex.labels for ex in batch])
    mask, targets = next_token_targets(spliced.labels)
    logits = model(spliced, logits_at=mask)
    return F.cross_entropy(logits.float(), targets, reduction="sum") / norm, spliced.n_tokens


def train_sft(cfg: SFTConfig, progress: Progress | None = None) -> RunResult:
    """Run SFT as configured; returns the run folder and the output model folder."""
    accel = make_accelerator(cfg.run)
    run = RunDir(cfg.run.out, main=accel.is_main_process, keep=cfg.run.keep_checkpoints)
    seed_everything(cfg.run.seed)
    model = prepare_model(cfg)
    examples = load_examples(cfg, model)
    f, start = prepare_fit(accel, run, model, cfg.optim, cfg.run, len(examples), cfg)
    world = accel.num_processes

    def loss_fn(micro: list[int], batch: list[int], step: int) -> tuple[torch.Tensor, dict[str, float]]:
        n_targets = sum(examples[i].n_targets for i in batch)  # token mean over the global batch
        loss, tokens = _batch_loss(f.model, f.raw, [examples[i] for i in micro], n_targets / world)
        return loss, {"tokens": tokens, "target_tokens": sum(examples[i].n_targets for i in micro)}

    metrics = fit(f, start, loss_fn, progress=progress)
    output = save_output(cfg, f.raw, run.path) if accel.is_main_process else None
    return RunResult(run.path, output, f.plan.total_steps, metrics)


def save_output(cfg: SFTConfig, model: LlavaForTraining, run_path: Path) -> Path:
    """full / projector -> `<run>/sft_model/` (LLaVA folder); lora -> `<run>/lora_adapter/` (PEFT)."""
    if cfg.mode != "lora":
        return write_llava_model(model, run_path / SFT_MODEL_DIR, dtype=torch_dtype(cfg.save_dtype))
    extra = None
    if any(p.requires_grad for p in model.projector.parameters()):
        proj = projector_state(model, torch.float32)
        extra = {"non_lora_trainables.bin": {f"base_model.model.model.mm_projector.{k}": v for k, v in proj.items()}}
    return save_lora(model, run_path / LORA_DIR, base=Path(cfg.model.base).resolve(), extra=extra)
