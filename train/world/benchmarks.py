"""Shapes versions of MMHal-Bench and POPE, in their original file formats.

shapes-MMHal: `n` items, question type by index (i % 8) in MMHal's order: attribute, adversarial
object (asks about an absent object; the right answer says it is not there), comparison (size),
counting, spatial relation, environment (background colour), holistic description, other (what is
at a corner). Fields as MMHal's json: question_type, question_topic, image_id, image_src,
image_path, image_content (object labels), question, gt_answer.

shapes-POPE: for `n` images, up to 3 present objects ("yes") and as many absent ones ("no"), so each
split is exactly 50/50. Negatives as POPE defines them: random (any absent object), popular (the
absent objects most frequent over the benchmark's images), adversarial (absent objects that co-occur
most with the present ones, sharing a colour or shape with one ranked first). The three splits share
the same images. Files: images/, scenes.json (for the judge), shapes_mmhal.json / shapes_pope_<split>.jsonl.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from factedge.edge.atomic import write_bytes
from factedge.edge.errors import ConfigError, InputError

from .claims import Attrs
from .export import png_bytes, write_world_json
from .questions import QuestionSpec, make_spec
from .render import render
from .scene import Scene, WorldConfig, derive_seed, scene_for

MMHAL_TYPES = ("attribute", "adversarial object", "comparison", "counting", "spatial relation",
               "environment", "holistic description", "other")
POPE_SPLITS = ("random", "popular", "adversarial")
HOLISTIC_PROMPT = "Describe the image in detail."


@dataclass
class BenchmarkFiles:
    root: Path
    images: Path
    scenes: Path
    questions: Path  # shapes_mmhal.json or shapes_pope_<split>.jsonl
    n_items: int


def _mmhal_spec(qtype: str, scene: Scene, rng: random.Random, cfg: WorldConfig) -> QuestionSpec | None:
    if qtype == "attribute":
        return make_spec(rng.choice(("colour", "shape", "size")), scene, rng, cfg)
    if qtype == "adversarial object":
        shapes = {o.shape for o in scene.objects}
        absent = [s for s in cfg.shapes if s not in shapes]
        if absent:
            return QuestionSpec("colour", Attrs(shape=rng.choice(absent)))
        present = {(o.color, o.shape) for o in scene.objects}
        kinds = [(c, s) for c in cfg.colors for s in cfg.shapes if (c, s) not in present]
        c, s = rng.choice(kinds)
        return QuestionSpec("size", Attrs(color=c, shape=s))
    if qtype == "comparison":
        return make_spec("compare", scene, rng, cfg)
    if qtype == "counting":
        return make_spec("count", scene, rng, cfg)
    if qtype == "spatial relation":
        return make_spec(rng.choice(("relation", "position")), scene, rng, cfg)
    if qtype == "environment":
        return make_spec("background", scene, rng, cfg)
    if qtype == "holistic description":
        return QuestionSpec("describe", prompt=HOLISTIC_PROMPT)
    return make_spec("at_position", scene, rng, cfg)


def _write_images(root: Path, scenes: dict[str, Scene], cfg: WorldConfig) -> tuple[Path, Path]:
    images = root / "images"
    for name, scene in scenes.items():
        write_bytes(images / name, png_bytes(render(scene, cfg.image_size)))
    scenes_path = root / "scenes.json"
    write_world_json(scenes_path, {k: s.to_dict() for k, s in scenes.items()})
    return images, scenes_path


def write_shapes_mmhal(out: str | Path, n: int = 96, seed: int = 0, cfg: WorldConfig | None = None) -> BenchmarkFiles:
    """`n` MMHal-style items (type = index % 8), one image each."""
    cfg = cfg or WorldConfig()
    if n < 1:
        raise InputError(f"n must be at least 1, got {n}")
    root = Path(out)
    items, scenes = [], {}
    for i in range(n):
        qtype = MMHAL_TYPES[i % len(MMHAL_TYPES)]
        for attempt in range(1000):
            s = derive_seed(seed, "mmhal", i, attempt)
            scene, rng = scene_for(s, cfg), random.Random(s)
            spec = _mmhal_spec(qtype, scene, rng, cfg)
            if spec is not None and spec.value(scene) is not None:
                break
        else:
            raise ConfigError(f"cannot pose a {qtype!r} question in this world")
        name = f"{i:07d}.png"
        scenes[name] = scene
        items.append({"question_type": qtype, "question_topic": f"shapes/{spec.topic}", "image_id": f"{i:07d}",
                      "image_src": f"images/{name}", "image_path": f"images/{name}",
                      "image_content": [o.label for o in scene.objects], "question": spec.text(),
                      "gt_answer": spec.answer(scene)})
    images, scenes_path = _write_images(root, scenes, cfg)
    path = root / "shapes_mmhal.json"
    write_world_json(path, items)
    return BenchmarkFiles(root, images, scenes_path, path, len(items))


def _ranked_negatives(split: str, scene: Scene, freq: Counter, cooc: Counter, kinds: list, rng: random.Random):
    present = {(o.color, o.shape) for o in scene.objects}
    absent = [k for k in kinds if k not in present]
    if split == "random":
        return rng.sample(absent, len(absent))
    if split == "popular":
        return sorted(absent, key=lambda k: -freq[k])  # stable: ties keep the dataset's fixed order
    shares = lambda k: sum(k[0] == c or k[1] == s for c, s in present)  # noqa: E731
    return sorted(absent, key=lambda k: (-(shares(k) > 0), -sum(cooc[(p, k)] for p in present), -shares(k)))


def write_shapes_pope(out: str | Path, n: int = 100, seed: int = 0, split: str = "random",
                      cfg: WorldConfig | None = None) -> BenchmarkFiles:
    """POPE jsonl over `n` images: per image up to 3 present + as many absent objects (50/50)."""
    cfg = cfg or WorldConfig()
    if split not in POPE_SPLITS:
        raise ConfigError(f"unknown POPE split {split!r}; choose from {', '.join(POPE_SPLITS)}")
    if n < 1:
        raise InputError(f"n must be at least 1, got {n}")
    root = Path(out)
    scenes = {f"{i:07d}.png": scene_for(derive_seed(seed, "pope", i), cfg) for i in range(n)}
    order = random.Random(derive_seed(seed, "pope-order"))
    kinds = [(c, s) for c in cfg.colors for s in cfg.shapes]
    order.shuffle(kinds)  # the fixed tie-break order of this benchmark
    freq, cooc = Counter(), Counter()
    for scene in scenes.values():
        present = [(o.color, o.shape) for o in scene.objects]
        freq.update(present)
        cooc.update((a, b) for a in present for b in present if a != b)
    lines, qid = [], 1
    for i, (name, scene) in enumerate(scenes.items()):
        rng = random.Random(derive_seed(seed, "pope", split, i))
        positives = rng.sample([(o.color, o.shape) for o in scene.objects], min(3, len(scene.objects)))
        negatives = _ranked_negatives(split, scene, freq, cooc, kinds, rng)[:len(positives)]
        for (pc, ps), (nc, ns) in zip(positives, negatives):
            for (c, s), label in (((pc, ps), "yes"), ((nc, ns), "no")):
                lines.append({"question_id": qid, "image": name, "text": f"Is there a {c} {s} in the image?",
                              "label": label})
                qid += 1
    images, scenes_path = _write_images(root, scenes, cfg)
    path = root / f"shapes_pope_{split}.jsonl"
    write_bytes(path, "".join(json.dumps(x) + "\n" for x in lines).encode())
    return BenchmarkFiles(root, images, scenes_path, path, len(lines))
