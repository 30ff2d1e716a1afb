"""`factedge data`: click over the shapes world writers (export.py, benchmarks.py)."""

from __future__ import annotations

import time

import click

from .benchmarks import POPE_SPLITS, write_shapes_mmhal, write_shapes_pope
from .export import write_world
from .scene import WorldConfig

_OUT = click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="output folder")
_SEED = click.option("--seed", type=int, default=0, show_default=True)
_SIZE = click.option("--image-size", type=click.IntRange(min=32), default=224, show_default=True)


@click.group()
def data():
    """Write the synthetic shapes world: training data, facts, preferences, MMHal/POPE sets."""


@data.command()
@_OUT
@click.option("--n", "n", type=click.IntRange(min=1), required=True, help="number of train images")
@_SEED
@_SIZE
@click.option("--sft-hallucination-rate", type=click.FloatRange(0, 1), default=0.3, show_default=True,
              help="share of SFT descriptions with one injected hallucination")
def shapes(out, n, seed, image_size, sft_hallucination_rate):
    """Images, scenes, SFT, captions (facts), preference pairs and PPO prompts, plus a held-out split."""
    start = time.perf_counter()
    cfg = WorldConfig(image_size=image_size, sft_hallucination_rate=sft_hallucination_rate)
    files = write_world(out, n, seed, cfg)
    c, h = files.counts, files.heldout.counts
    click.echo(f"wrote {out}: {c['images']} train + {h['images']} held-out images, {c['sft']} sft items "
               f"({c['sft_injected']} with an injected hallucination), {c['preference']} preference pairs, "
               f"{c['ppo_prompts']} ppo prompts in {time.perf_counter() - start:.1f} s")


@data.command("shapes-mmhal")
@_OUT
@click.option("--n", "n", type=click.IntRange(min=1), default=96, show_default=True, help="number of items")
@_SEED
@_SIZE
def shapes_mmhal(out, n, seed, image_size):
    """A shapes MMHal-Bench: 8 question types by index, judged by the world's oracle."""
    files = write_shapes_mmhal(out, n, seed, WorldConfig(image_size=image_size))
    click.echo(f"wrote {files.questions}: {files.n_items} items over {files.n_items} images")


@data.command("shapes-pope")
@_OUT
@click.option("--n", "n", type=click.IntRange(min=1), default=100, show_default=True, help="number of images")
@click.option("--split", type=click.Choice(POPE_SPLITS), default="random", show_default=True)
@_SEED
@_SIZE
def shapes_pope(out, n, split, seed, image_size):
    """A shapes POPE split (yes/no object probing, balanced 50/50)."""
    files = write_shapes_pope(out, n, seed, split, WorldConfig(image_size=image_size))
    click.echo(f"wrote {files.questions}: {files.n_items} questions over {n} images ({split} negatives)")
