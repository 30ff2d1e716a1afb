"""Controlled hallucinations: corrupt a true description or answer so that it claims something false.

Used twice: injected into a share of SFT descriptions (as GPT-written LLaVA-Instruct data carries
hallucinations, so the SFT model hallucinates at a known base rate), and as the worse side of the
preference pairs the reward model learns from. Every corruption is checked by the judge before it is
returned, so "injected" always means "detected".

Descriptions are corrupted at the mention level (one extra object, a wrong colour/shape/size/
position, a wrong count), answers by answering the same question on a perturbed scene.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

from .claims import Position
from .describe import Description, Mention, description_of
from .judge import judge
from .questions import OPPOSITE, REL_PHRASE, QuestionSpec
from .scene import GRID, POSITION_NAMES, Obj, Scene, WorldConfig

DESCRIPTION_KINDS = ("extra_object", "wrong_color", "wrong_shape", "wrong_count", "wrong_size", "wrong_position")
# the worse side of preference pairs may also under-count: one object left out *and* the count lowered to
# match, a shorter text that is still false (without it "longer = worse" would be a sound shortcut)
MISSING_OBJECT = "missing_object"
PAIR_KINDS = DESCRIPTION_KINDS + (MISSING_OBJECT,)
_KIND_WEIGHTS = dict(zip(PAIR_KINDS, (3, 2, 2, 1, 1, 1, 8)))


@dataclass(frozen=True)
class Corruption:
    text: str
    kinds: tuple[str, ...]
    n_hallucinations: int  # as the judge counts them (an extra object also makes the count wrong)


def _free_kind(taken: set, cfg: WorldConfig, rng: random.Random, color=None, shape=None):
    kinds = [(c, s) for c in cfg.colors for s in cfg.shapes if (c, s) not in taken
             and (color is None or c == color) and (shape is None or s == shape)]
    return rng.choice(kinds) if kinds else None


def _lenient(cell: tuple[int, int]) -> Position:
    """How the judge reads the world's name of `cell` ("on the left" = anywhere in column 0)."""
    name = POSITION_NAMES[cell]
    words = name.split()
    row = 0 if "top" in words else 2 if "bottom" in words else None
    col = 0 if "left" in words else 2 if "right" in words else None
    return Position(1, 1) if name == "centre" else Position(col, row)


def _apply(desc: Description, kind: str, scene: Scene, cfg: WorldConfig, rng: random.Random,
           touched: set[int]) -> Description | None:
    mentions = list(desc.mentions)
    taken = {(o.color, o.shape) for o in scene.objects} | {(m.color, m.shape) for m in mentions}
    free_idx = [i for i in range(len(mentions)) if i not in touched]
    if kind == "extra_object":
        cells = [c for c in POSITION_NAMES if c not in {m.cell for m in mentions}]
        kind_ = _free_kind(taken, cfg, rng)
        if not cells or kind_ is None:
            return None
        new = Mention(rng.choice(cfg.sizes), kind_[0], kind_[1], rng.choice(cells))
        return replace(desc, count=desc.count + 1).with_mentions([*mentions, new])
    if kind == MISSING_OBJECT:  # drop an untouched mention (a corrupted one would take its error along)
        if len(mentions) < 2 or desc.count != len(mentions) or not free_idx:
            return None
        i = rng.choice(free_idx)
        del mentions[i]
        shifted = {j - (j > i) for j in touched}
        touched.clear()
        touched.update(shifted)
        return Description(desc.count - 1, tuple(mentions))
    if kind == "wrong_count":
        options = [n for n in (desc.count - 1, desc.count + 1) if n >= 1]
        return replace(desc, count=rng.choice(options))
    if not free_idx:
        return None
    i = rng.choice(free_idx)
    m = mentions[i]
    if kind == "wrong_color":
        k = _free_kind(taken, cfg, rng, shape=m.shape)
        new = replace(m, color=k[0]) if k else None
    elif kind == "wrong_shape":
        k = _free_kind(taken, cfg, rng, color=m.color)
        new = replace(m, shape=k[1]) if k else None
    elif kind == "wrong_size":
        sizes = [s for s in cfg.sizes if s != m.size]
        new = replace(m, size=rng.choice(sizes)) if sizes else None
    else:  # wrong_position: a cell whose name the judge reads as excluding the true one
        cells = [c for c in POSITION_NAMES if not _lenient(c).holds(m.cell)]
        new = replace(m, cell=rng.choice(cells)) if cells else None
    if new is None:
        return None
    touched.add(i)
    mentions[i] = new
    return Description(desc.count, tuple(mentions))


def corrupt_description(scene: Scene, rng: random.Random, n: int = 1, cfg: WorldConfig | None = None,
                        kinds: tuple[str, ...] | None = None) -> Corruption:
    """The reference description with `n` injected hallucinations (each a different mention)."""
    cfg = cfg or WorldConfig()
    kinds = kinds or DESCRIPTION_KINDS
    weights = [_KIND_WEIGHTS[k] for k in kinds]
    count_kinds = ("wrong_count", "extra_object", MISSING_OBJECT)  # each changes the count: one per text
    for _ in range(50):
        desc, used, touched = description_of(scene), [], set()
        for _ in range(n):
            kind = rng.choices(kinds, weights=weights)[0]
            if kind in count_kinds and any(k in count_kinds for k in used):
                continue
            out = _apply(desc, kind, scene, cfg, rng, touched)
            if out is not None:
                desc = out
                used.append(kind)
        verdict = judge(scene, desc.text())
        if len(used) == n and len(verdict.hallucinations) >= n:
            return Corruption(desc.text(), tuple(used), len(verdict.hallucinations))
    raise RuntimeError("could not corrupt the description")  # unreachable for valid configs


def partial_description(scene: Scene, rng: random.Random) -> str | None:
    """A true but incomplete description: the right count, one or more objects left unmentioned (the
    better side of a pair against a complete description that claims something false); None for one object."""
    desc = description_of(scene)
    if len(desc.mentions) < 2:
        return None
    keep = sorted(rng.sample(range(len(desc.mentions)), rng.randint(1, len(desc.mentions) - 1)))
    return Description(desc.count, tuple(desc.mentions[i] for i in keep)).text()


# ---- answers: the same question answered on a slightly different scene ------------------------
def _cell_centre(cell: tuple[int, int]) -> tuple[float, float]:
    return (cell[0] + 0.5) / GRID, (cell[1] + 0.5) / GRID


def perturb(scene: Scene, rng: random.Random, cfg: WorldConfig) -> Scene:
    """One random change: recolour/reshape/resize/move/add/remove an object, or the background."""
    objs = list(scene.objects)
    taken = {(o.color, o.shape) for o in objs}
    empty = [c for c in POSITION_NAMES if c not in {o.cell for o in objs}]
    op = rng.choice(("color", "shape", "size", "move", "add", "remove", "background"))
    i = rng.randrange(len(objs))
    o = objs[i]
    if op == "color" and (k := _free_kind(taken, cfg, rng, shape=o.shape)):
        objs[i] = replace(o, color=k[0])
    elif op == "shape" and (k := _free_kind(taken, cfg, rng, color=o.color)):
        objs[i] = replace(o, shape=k[1])
    elif op == "size" and len(cfg.sizes) > 1:
        objs[i] = replace(o, size=rng.choice([s for s in cfg.sizes if s != o.size]))
    elif op == "move" and empty:
        x, y = _cell_centre(rng.choice(empty))
        objs[i] = replace(o, x=x, y=y)
    elif op == "add" and empty and (k := _free_kind(taken, cfg, rng)):
        x, y = _cell_centre(rng.choice(empty))
        objs.append(Obj(k[1], k[0], rng.choice(cfg.sizes), x, y))
    elif op == "remove" and len(objs) > 1:
        objs.pop(i)
    elif op == "background" and len(cfg.backgrounds) > 1:
        return replace(scene, background=rng.choice([b for b in cfg.backgrounds if b != scene.background]))
    objs.sort(key=lambda ob: (ob.cell[1], ob.cell[0]))
    return replace(scene, objects=tuple(objs))


def _flip_yes_no(scene: Scene, spec: QuestionSpec, rng: random.Random, cfg: WorldConfig) -> str:
    """The opposite answer with a matching (false) reason."""
    x = spec.attrs.words()
    if spec.topic == "exists":
        if spec.value(scene) == "yes":
            return f"No. There is no {x} in the image."
        empty = [c for c in POSITION_NAMES if c not in {o.cell for o in scene.objects}] or list(POSITION_NAMES)
        fake = Mention(rng.choice(cfg.sizes), spec.attrs.color, spec.attrs.shape, rng.choice(empty))
        return f"Yes. There is {fake.text()}."
    flipped = replace(spec, rel=OPPOSITE[spec.rel])
    y = spec.other.words()
    if spec.value(scene) == "yes":
        return f"No. The {x} is {REL_PHRASE[flipped.rel]} the {y}."
    return f"Yes. The {x} is {REL_PHRASE[spec.rel]} the {y}."


def corrupt_answer(scene: Scene, spec: QuestionSpec, rng: random.Random, cfg: WorldConfig | None = None,
                   n: int = 1) -> Corruption | None:
    """A wrong answer to `spec` in the world's language (None if none was found)."""
    cfg = cfg or WorldConfig()
    if spec.topic == "describe":
        return corrupt_description(scene, rng, n, cfg)
    question = spec.text()
    truth = spec.answer(scene)
    if spec.type == "yes_no" and not spec.options:
        text = _flip_yes_no(scene, spec, rng, cfg)
        verdict = judge(scene, text, question)
        return Corruption(text, ("flipped",), len(verdict.hallucinations)) if verdict.hallucinated else None
    for _ in range(60):
        fake = scene
        for _ in range(n):
            fake = perturb(fake, rng, cfg)
        try:
            text = spec.answer(fake)
        except (IndexError, TypeError, ValueError):  # question ill-posed on the fake scene
            continue
        if not text or text == truth:
            continue
        verdict = judge(scene, text, question)
        if verdict.hallucinated:
            return Corruption(text, ("perturbed_scene",), len(verdict.hallucinations))
    return None
