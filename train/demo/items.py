"""The demo's questions: fresh shapes-world images the model never saw, each with two questions.

Scenes come from their own seed stream (`derive_seed(seed, "demo", i, attempt)`; training uses the
"train"/"heldout" streams) and any scene that looks like one the recipe trained or held out on is
redrawn, so the answers show generalisation, not recall. Each image gets one describe question
(where SFT data carried injected hallucinations) and one short question (yes/no or multiple choice),
whose answer the judge checks directly.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from factedge.edge.atomic import write_bytes
from factedge.train.world.export import png_bytes, read_scenes
from factedge.train.world.questions import QA, make_spec, qa_of
from factedge.train.world.render import render
from factedge.train.world.scene import Scene, WorldConfig, derive_seed, scene_for

SHORT_TOPICS = (("exists", False), ("relation", False), ("count", True), ("colour", True), ("shape", True))


@dataclass(frozen=True)
class DemoItem:
    image: Path
    scene: Scene
    qa: QA


def world_config(world) -> WorldConfig:
    """The recipe's world settings (world.json), or the defaults when there is no world (a stand-in)."""
    manifest = getattr(world, "manifest", None) if world is not None else None
    if manifest is None or not Path(manifest).is_file():
        return WorldConfig()
    cfg = json.loads(Path(manifest).read_text())["config"]
    return WorldConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()})


def seen_signatures(world) -> set:
    """Signatures of every scene the recipe wrote (train and held-out)."""
    seen = set()
    for split in (world, getattr(world, "heldout", None)) if world is not None else ():
        if split is not None and Path(split.scenes).is_file():
            seen |= {s.signature() for s in read_scenes(split.scenes).values()}
    return seen


def fresh_scenes(n: int, seed: int, cfg: WorldConfig, avoid: set) -> list[Scene]:
    scenes = []
    for i in range(n):
        for attempt in range(1000):
            scene = scene_for(derive_seed(seed, "demo", i, attempt), cfg)
            if scene.signature() not in avoid:
                break
        scenes.append(scene)
    return scenes


def _short_question(scene: Scene, rng: random.Random, cfg: WorldConfig) -> QA:
    """A yes/no or multiple-choice question that is well posed on `scene`."""
    for _ in range(100):
        topic, mc = rng.choice(SHORT_TOPICS)
        spec = make_spec(topic, scene, rng, cfg, mc=mc)
        if spec is not None and spec.truth(scene):
            return qa_of(spec, scene)
    return qa_of(make_spec("exists", scene, rng, cfg), scene)  # always posable


def demo_items(out: Path, n_images: int, seed: int, world=None) -> list[DemoItem]:
    """Render `n_images` fresh images into `out` and pair each with a describe and a short question."""
    cfg = world_config(world)
    items = []
    for i, scene in enumerate(fresh_scenes(n_images, seed, cfg, seen_signatures(world))):
        image = Path(out) / f"demo-{seed}-{i}.png"
        if not image.is_file():
            write_bytes(image, png_bytes(render(scene, cfg.image_size)))
        rng = random.Random(derive_seed(seed, "demo", i, "questions"))
        describe = qa_of(make_spec("describe", scene, rng, cfg), scene)
        items += [DemoItem(image, scene, describe), DemoItem(image, scene, _short_question(scene, rng, cfg))]
    return items
