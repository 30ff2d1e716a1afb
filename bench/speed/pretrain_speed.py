"""Side by side, in one run: the two tower-pretraining speed-ups and what they replaced.

1. `edge.image.normalize` on a uint8 image (per-channel table) vs the float arithmetic it stands for
   (`normalize_arithmetic`), on the demo's 112-px images; the outputs must be bit-identical.
2. One pretraining forward+backward of the demo's tower through every layer vs only up to the layer
   LLaVA reads (`read_layer_only`); the read layer's output must be identical.

    python -m bench.speed.pretrain_speed [--threads 2] [--repeats 10]
"""

from __future__ import annotations

import argparse
import random
import time

from bench.common import ensure_factedge


def _side_by_side(before, after, repeats: int, inner: int) -> tuple[float, float]:
    """Best mean ms over `inner` calls of each, the two alternated `repeats` times so a busy spell on a
    shared machine hits both alike."""
    best = [float("inf"), float("inf")]
    for _ in range(repeats):
        for k, fn in enumerate((before, after)):
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            best[k] = min(best[k], (time.perf_counter() - t0) / inner * 1e3)
    return best[0], best[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    ensure_factedge()
    import numpy as np
    import torch
    from transformers import CLIPVisionModel

    from factedge.convert.reference import vision_config
    from factedge.edge.image import normalize_arithmetic, normalize
    from factedge.train.recipe import recipe_preset
    from factedge.train.base.vision_pretrain import Vocab, pretrain_batch, read_layer_only
    from factedge.train.world.scene import WorldConfig

    torch.set_num_threads(args.threads)
    spec = recipe_preset("cpu").base.vision
    world = WorldConfig(**{**recipe_preset("cpu").world.to_dict(), "image_size": spec.image_size})
    img = np.random.default_rng(0).integers(0, 256, (spec.image_size, spec.image_size, 3), dtype=np.uint8)
    mean, std = spec.image_mean, spec.image_std
    assert np.array_equal(normalize(img, mean, std), normalize_arithmetic(img, mean, std))
    arith, table = _side_by_side(lambda: normalize_arithmetic(img, mean, std), lambda: normalize(img, mean, std),
                                 args.repeats, 500)

    torch.manual_seed(0)
    model = CLIPVisionModel(vision_config(spec)).float().train()
    pixels, _, _ = pretrain_batch(random.Random(0), 32, spec, world, Vocab.of(world))

    def step(index: int) -> torch.Tensor:
        hidden = model(pixel_values=pixels, output_hidden_states=True).hidden_states[index]
        hidden.square().mean().backward()
        return hidden.detach()

    reference = step(spec.feature_layer)
    read = spec.feature_layer % (spec.num_layers + 1)

    def truncated() -> torch.Tensor:
        with read_layer_only(model, spec.feature_layer) as layer:
            return step(layer)

    assert read < spec.num_layers and torch.equal(truncated(), reference)
    full, short = _side_by_side(lambda: step(spec.feature_layer), truncated, args.repeats, 10)
    print(f"| normalize, {spec.image_size}-px uint8 image | {arith:.3f} ms | {table:.3f} ms | {arith / table:.1f}x |")
    print(f"| tower forward+backward, batch 32, {args.threads} threads | {full:.1f} ms | {short:.1f} ms "
          f"| {full / short:.2f}x |")


if __name__ == "__main__":
    main()
