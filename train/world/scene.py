"""Scenes of the shapes world: what is in an image, before any pixels or words.

The world is built for a tiny LLaVA with a frozen random CLIP (32-px patches at 224 px): objects are
big (1/5 or more of the image side), never overlap, sit one per cell of a 3x3 grid (so left/right/
above/below are unambiguous) and use a few strongly distinct colours. A (colour, shape) pair occurs at
most once per scene, so "the red circle" always names exactly one object.
"""

from __future__ import annotations

import hashlib
import random
from functools import cached_property
from dataclasses import asdict, dataclass, fields

from factedge.edge.errors import ConfigError, InputError

GRID = 3  # the scene is a GRID x GRID board of cells, at most one object per cell
SHAPES = ("circle", "square", "triangle")
COLOURS = ("red", "green", "blue", "yellow")
SIZES = ("small", "large")
BACKGROUNDS = ("black", "grey")

# sRGB of every colour name the world may use (objects and backgrounds); far apart on purpose
PALETTE = {
    "red": (230, 30, 30),
    "green": (30, 180, 50),
    "blue": (40, 70, 230),
    "yellow": (240, 210, 20),
    "white": (250, 250, 250),
    "purple": (150, 50, 200),
    "black": (0, 0, 0),
    "grey": (128, 128, 128),
}
# object extent (width = height) as a fraction of the image side
SIZE_EXTENT = {"small": 0.2, "large": 0.3}

# the world's names for the 9 cells, as (column, row) with row 0 at the top
POSITION_NAMES = {
    (0, 0): "top left", (1, 0): "top", (2, 0): "top right",
    (0, 1): "left", (1, 1): "centre", (2, 1): "right",
    (0, 2): "bottom left", (1, 2): "bottom", (2, 2): "bottom right",
}


@dataclass(frozen=True)
class Obj:
    """One object; x, y = its centre as a fraction of the image side (y grows downwards)."""

    shape: str
    color: str
    size: str
    x: float
    y: float

    @cached_property
    def cell(self) -> tuple[int, int]:
        """(column, row) of the grid cell holding the centre."""
        return min(GRID - 1, int(self.x * GRID)), min(GRID - 1, int(self.y * GRID))

    @property
    def label(self) -> str:
        """"large red circle": the MMHal-style object label."""
        return f"{self.size} {self.color} {self.shape}"

    @property
    def name(self) -> str:
        """"red circle": unique within a scene."""
        return f"{self.color} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """The objects (in reading order: top row first, left to right), the background, the seed."""

    objects: tuple[Obj, ...]
    background: str
    seed: int = 0

    def to_dict(self) -> dict:
        return {"background": self.background, "seed": self.seed,
                "objects": [asdict(o) for o in self.objects]}

    @classmethod
    def from_dict(cls, d: dict) -> "Scene":
        try:
            objs = tuple(Obj(str(o["shape"]), str(o["color"]), str(o["size"]), float(o["x"]), float(o["y"]))
                         for o in d["objects"])
            return cls(objs, str(d["background"]), int(d.get("seed", 0)))
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"not a scene dict ({exc!r})") from exc

    def find(self, *, shape: str | None = None, color: str | None = None,
             size: str | None = None) -> list[Obj]:
        return [o for o in self.objects if (shape is None or o.shape == shape)
                and (color is None or o.color == color) and (size is None or o.size == size)]

    def signature(self) -> tuple:
        """What an image shows (cells, not exact coordinates): equal signatures = same picture to a viewer."""
        return self.background, tuple(sorted((o.cell, o.shape, o.color, o.size) for o in self.objects))


def left_of(a: Obj, b: Obj) -> bool:
    return a.cell[0] < b.cell[0]


def above(a: Obj, b: Obj) -> bool:
    return a.cell[1] < b.cell[1]


@dataclass
class WorldConfig:
    """Vocabulary and layout of scenes, plus the knobs of the exported data (see export.py)."""

    shapes: tuple[str, ...] = SHAPES
    colors: tuple[str, ...] = COLOURS
    sizes: tuple[str, ...] = SIZES
    backgrounds: tuple[str, ...] = BACKGROUNDS
    min_objects: int = 1
    max_objects: int = 4
    image_size: int = 224
    jitter: float = 0.5  # share of a cell's free room the centre may move by (0 = exact grid)
    # export knobs
    sft_hallucination_rate: float = 0.3  # share of SFT describe answers with one injected hallucination
    questions_per_image: int = 3  # SFT VQA / multiple-choice items per image (plus one describe item)
    reading_per_image: int = 0  # text-only SFT items answered from / checked against captions (reading.py)
    pairs_per_image: int = 2  # preference pairs per image
    describe_pair_share: float = 0.6  # share of preference pairs on describe prompts
    partial_pair_share: float = 0.15  # share of describe pairs whose better side is true but incomplete
    ppo_prompts_per_image: int = 2
    describe_prompt_share: float = 0.5  # share of PPO prompts that ask for a description
    heldout_fraction: float = 0.1  # held-out images per train image (at least 1)
    describe_length_bonus: float | None = None  # written as `length_bonus` on describe PPO prompts if set

    def __post_init__(self):
        for name in ("shapes", "colors", "sizes", "backgrounds"):
            setattr(self, name, tuple(getattr(self, name)))
        unknown = [c for c in self.colors + self.backgrounds if c not in PALETTE]
        if unknown:
            raise ConfigError(f"unknown colour(s) {unknown}; known: {sorted(PALETTE)}")
        if set(self.colors) & set(self.backgrounds):
            raise ConfigError("object colours and background colours must differ")
        if [s for s in self.shapes if s not in SHAPES] or [s for s in self.sizes if s not in SIZE_EXTENT]:
            raise ConfigError(f"shapes must be among {SHAPES}, sizes among {tuple(SIZE_EXTENT)}")
        if not self.shapes or not self.colors or not self.sizes or not self.backgrounds:
            raise ConfigError("shapes, colours, sizes and backgrounds must not be empty")
        most = min(GRID * GRID, len(self.shapes) * len(self.colors))
        if not 1 <= self.min_objects <= self.max_objects <= most:
            raise ConfigError(f"need 1 <= min_objects <= max_objects <= {most}")
        for name in ("sft_hallucination_rate", "describe_pair_share", "partial_pair_share", "describe_prompt_share", "jitter"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name} must be within [0, 1]")
        if self.image_size < 32:
            raise ConfigError("image_size must be at least 32")

    def to_dict(self) -> dict:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in fields(self)}


def derive_seed(*parts) -> int:
    """A 63-bit seed from any parts, stable across runs and Python versions (no hash randomisation)."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def random_scene(rng: random.Random, cfg: WorldConfig | None = None, *, seed: int = 0) -> Scene:
    """A scene drawn from `rng`: distinct cells, distinct (colour, shape) pairs, random sizes."""
    cfg = cfg or WorldConfig()
    n = rng.randint(cfg.min_objects, cfg.max_objects)
    cells = sorted(rng.sample(range(GRID * GRID), n))  # reading order
    kinds = rng.sample([(c, s) for c in cfg.colors for s in cfg.shapes], n)
    objs = []
    for cell, (color, shape) in zip(cells, kinds):
        size = rng.choice(cfg.sizes)
        col, row = cell % GRID, cell // GRID
        room = (1.0 / GRID - SIZE_EXTENT[size]) / 2 * cfg.jitter
        x = (col + 0.5) / GRID + rng.uniform(-room, room)
        y = (row + 0.5) / GRID + rng.uniform(-room, room)
        objs.append(Obj(shape, color, size, round(x, 4), round(y, 4)))
    return Scene(tuple(objs), rng.choice(cfg.backgrounds), seed)


def scene_for(seed: int, cfg: WorldConfig | None = None) -> Scene:
    """The scene of one integer seed (what export uses per image)."""
    return random_scene(random.Random(seed), cfg, seed=seed)

