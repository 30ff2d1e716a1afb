"""Pretrain the base's tiny CLIP on the shapes world: the stand-in for CLIP's web-scale pretraining.

Why: LLaVA starts from a CLIP whose patch features already say what is where; the projector and the
LM only learn to read them. A random tower keeps the pixels but not the concepts, and a tiny LM on a
CPU budget does not learn to see through it: with a random tower, 400 full-FT SFT steps left the
held-out answer loss at 0.375 with the right image vs 0.476 with a shuffled one, and held-out yes/no
at chance. So the tower is trained once, when the base is built, to name per patch the colour, shape
and size of the object in that patch's grid cell (and the background from CLS), reading the layer
LLaVA takes features from. Layers after it are left as they were (LLaVA never reads them); the
LLaVA stages keep the whole tower frozen, as in the paper.

Pictures are drawn fresh each step from their own seed stream, never the recipe's world files, so
held-out scenes stay unseen in every sense that matters (any scene may recur by chance, as in any
pretraining corpus).
"""

from __future__ import annotations

import random
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from factedge.convert.specs import VisionSpec
from factedge.edge.errors import LayoutError
from factedge.edge.image import normalize, prepare_image
from factedge.train.world.render import render
from factedge.train.world.scene import GRID, Scene, WorldConfig, random_scene


@dataclass(frozen=True)
class VisionPretrain:
    """Budget of the tower's pretraining (the defaults: ~60 s on 2 CPU cores for the demo's tower)."""

    steps: int = 1500
    batch_size: int = 32
    lr: float = 2e-3
    seed: int = 0


@dataclass(frozen=True)
class Vocab:
    """Class indices of the per-patch targets (0 = no object in the patch's cell)."""

    colors: tuple[str, ...]
    shapes: tuple[str, ...]
    sizes: tuple[str, ...]
    backgrounds: tuple[str, ...]

    @classmethod
    def of(cls, world: WorldConfig) -> "Vocab":
        return cls(world.colors, world.shapes, world.sizes, world.backgrounds)

    @property
    def widths(self) -> tuple[int, int, int, int]:
        return 1 + len(self.colors), 1 + len(self.shapes), 1 + len(self.sizes), len(self.backgrounds)


def patch_targets(scene: Scene, per_side: int, vocab: Vocab) -> np.ndarray:
    """int64 [per_side**2, 3]: (colour, shape, size) class of the object whose cell holds each patch's
    centre, row-major like CLIP's patch order; zeros where the cell is empty."""
    cells = {o.cell: o for o in scene.objects}
    out = np.zeros((per_side * per_side, 3), np.int64)
    cell_of = [min(GRID - 1, int((i + 0.5) / per_side * GRID)) for i in range(per_side)]
    for row in range(per_side):
        for col in range(per_side):
            obj = cells.get((cell_of[col], cell_of[row]))
            if obj is not None:
                out[row * per_side + col] = (1 + vocab.colors.index(obj.color), 1 + vocab.shapes.index(obj.shape),
                                             1 + vocab.sizes.index(obj.size))
    return out


def pretrain_batch(rng: random.Random, n: int, spec: VisionSpec, world: WorldConfig, vocab: Vocab):
    scenes = [random_scene(rng, world) for _ in range(n)]
    pixels = np.stack([normalize(prepare_image(render(s, spec.image_size), spec.image_size, spec.pad_color),
                                 spec.image_mean, spec.image_std) for s in scenes])
    per_side = spec.image_size // spec.patch_size
    patches = np.stack([patch_targets(s, per_side, vocab) for s in scenes])
    background = np.array([vocab.backgrounds.index(s.background) for s in scenes], np.int64)
    return torch.from_numpy(pixels), torch.from_numpy(patches), torch.from_numpy(background)


@contextmanager
def read_layer_only(model, feature_layer: int):
    """Run the tower only up to the layer LLaVA reads: the layers after it get no gradient from the
    patch loss, so computing them was wasted forward time. Yields the layer's hidden_states index."""
    encoder = getattr(model, "vision_model", model).encoder  # transformers 5 dropped the `vision_model` level
    layers = encoder.layers
    keep = feature_layer % (len(layers) + 1)
    encoder.layers = layers[:keep]
    try:
        yield keep
    finally:
        encoder.layers = layers


def _losses(logits: torch.Tensor, cls_logits: torch.Tensor, patches: torch.Tensor, background: torch.Tensor,
            widths: tuple[int, int, int, int]) -> tuple[torch.Tensor, dict[str, float]]:
    nc, ns, nz, _ = widths
    parts = logits.split([nc, ns, nz, widths[3]], dim=-1)[:3]
    loss = F.cross_entropy(cls_logits[:, -widths[3]:], background)
    stats: dict[str, float] = {}
    occupied = patches[..., 0] > 0
    for name, part, k in zip(("color", "shape", "size"), parts, range(3)):
        loss = loss + F.cross_entropy(part.flatten(0, 1), patches[..., k].flatten())
        hit = part.argmax(-1)[occupied] == patches[..., k][occupied]
        stats[f"{name}_accuracy"] = float(hit.float().mean()) if occupied.any() else float("nan")
    return loss, stats


def pretrain_vision(model, spec: VisionSpec, world: WorldConfig, cfg: VisionPretrain) -> dict[str, float]:
    """Train `model` (a CLIPVisionModel, float32, in place) on fresh world renders; returns the last
    step's loss and per-patch accuracies (on occupied patches) over the final 10% of the steps."""
    world = WorldConfig(**{**world.to_dict(), "image_size": spec.image_size})
    vocab = Vocab.of(world)
    torch.manual_seed(cfg.seed)
    head = torch.nn.Linear(model.config.hidden_size, sum(vocab.widths))
    params = [p for p in model.parameters()] + list(head.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    rng = random.Random(f"vision-pretrain-{cfg.seed}")
    model.train()
    tail = max(1, cfg.steps // 10)
    sums: dict[str, float] = {}
    loss = torch.zeros(())
    with read_layer_only(model, spec.feature_layer) as layer:
        for step in range(cfg.steps):
            pixels, patches, background = pretrain_batch(rng, cfg.batch_size, spec, world, vocab)
            hidden = model(pixel_values=pixels, output_hidden_states=True).hidden_states[layer]
            loss, stats = _losses(head(hidden[:, 1:]), head(hidden[:, 0]), patches, background, vocab.widths)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step >= cfg.steps - tail:
                for k, v in stats.items():
                    sums[k] = sums.get(k, 0.0) + v / tail
    model.eval()
    model.requires_grad_(False)
    return {"loss": float(loss.detach()), **sums}


def pretrain_tower_folder(folder: Path, spec: VisionSpec, world: WorldConfig, cfg: VisionPretrain) -> dict[str, float]:
    """Pretrain the CLIP folder's tower; its single weights file is rewritten as `model.safetensors`
    (temp + rename) with the same tensor names (text tower untouched), so the real layout holds."""
    from safetensors.torch import load_file
    from transformers import CLIPVisionModel

    from factedge.convert.reference import vision_config
    from factedge.train.base.tensor_files import save_tensors

    folder = Path(folder)
    weights = folder / "model.safetensors"
    if weights.is_file():
        original = load_file(weights)
    else:
        weights = folder / "pytorch_model.bin"
        original = torch.load(weights, map_location="cpu", weights_only=True)
    model = CLIPVisionModel(vision_config(spec)).float()
    names = {}
    for name in model.state_dict():
        names[name] = name if name in original else f"vision_model.{name}"
        if names[name] not in original:
            raise LayoutError(f"the tower's tensor {names[name]} is missing", weights)
    model.load_state_dict({name: original[key].float() for name, key in names.items()})
    metrics = pretrain_vision(model, spec, world, cfg)
    for name, value in model.state_dict().items():
        original[names[name]] = value.detach().to(original[names[name]].dtype).contiguous()
    save_tensors(folder / "model.safetensors", original, "safetensors")
    if weights.name != "model.safetensors":
        weights.unlink()
    return metrics
