"""Questions about a scene, their answers in the world's language, and reading them back.

A `QuestionSpec` is a question as data (topic, referents, options); it renders its text, answers
itself on any scene (so hallucinate.py corrupts an answer by answering on a perturbed scene), and
`parse_question` reads the text back (so the judge can check short answers like "B" or "No.").
Each item carries a `type` for PPO's correctness term: "yes_no" | "multiple_choice" | "open" |
"describe"; `truth` is the short answer that term compares with (a letter, "Yes"/"No", a count...).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, replace

from .claims import (COLOUR_WORDS, SHAPE_WORDS, SIZE_WORDS, Attrs, np_at_head, extract_claims,
                     first_number, first_word, position_in, tokens)
from .answers import parse_choice, parse_yes_no
from .describe import Mention, article, count_phrase, describe, position_phrase
from .scene import POSITION_NAMES, Obj, Scene, WorldConfig, above, left_of

DESCRIBE_PROMPTS = ("Describe the image briefly.", "What is in the image?", "Describe the shapes in the image.")
MC_SUFFIX = "Answer with the option's letter."
LETTERS = "ABCDEFGH"
REL_PHRASE = {"left_of": "to the left of", "right_of": "to the right of", "above": "above", "below": "below"}
OPPOSITE = {"left_of": "right_of", "right_of": "left_of", "above": "below", "below": "above"}
_REL_TEST = {"left_of": lambda a, b: left_of(a, b), "right_of": lambda a, b: left_of(b, a),
             "above": lambda a, b: above(a, b), "below": lambda a, b: above(b, a)}
TYPES = ("yes_no", "multiple_choice", "open", "describe")


def np_text(a: Attrs) -> str:
    return a.words()


def _match(scene: Scene, a: Attrs) -> list[Obj]:
    return scene.find(shape=a.shape, color=a.color, size=a.size)


@dataclass(frozen=True)
class QuestionSpec:
    topic: str  # describe count colour shape size exists relation position background compare at_position
    attrs: Attrs = Attrs()
    other: Attrs | None = None
    rel: str | None = None  # relation: left_of/right_of/above/below; compare: larger/smaller
    cell: tuple[int, int] | None = None  # at_position
    options: tuple[str, ...] | None = None  # multiple choice
    prompt: str | None = None  # describe

    @property
    def type(self) -> str:
        if self.options:
            return "multiple_choice"
        if self.topic in ("exists", "relation"):
            return "yes_no"
        return "describe" if self.topic == "describe" else "open"

    def stem(self) -> str:
        a = self.attrs
        t = self.topic
        if t == "describe":
            return self.prompt or DESCRIBE_PROMPTS[0]
        if t == "count":
            noun = a.words() if not a.empty() else "object"
            return f"How many {noun}s are there?"
        if t == "colour":
            return f"What colour is the {np_text(a)}?"
        if t == "background":
            return "What colour is the background?"
        if t == "shape":
            return f"Which shape is {a.color}?" if self.options else f"What shape is the {np_text(a)}?"
        if t == "size":
            return f"Is the {np_text(a)} large or small?"
        if t == "exists":
            return f"Is there {article(np_text(a))} {np_text(a)} in the image?"
        if t == "relation":
            return f"Is the {np_text(a)} {REL_PHRASE[self.rel]} the {np_text(self.other)}?"
        if t == "position":
            return f"Where is the {np_text(a)}?"
        if t == "compare":
            return f"Which is {self.rel}, the {np_text(a)} or the {np_text(self.other)}?"
        if t == "at_position":
            return f"What is at the {POSITION_NAMES[self.cell]} of the image?"
        raise ValueError(f"unknown topic {t!r}")

    def text(self) -> str:
        if not self.options:
            return self.stem()
        lines = [f"{LETTERS[i]}. {o}" for i, o in enumerate(self.options)]
        return "\n".join([self.stem(), *lines, MC_SUFFIX])

    # ---- answers -------------------------------------------------------------------------------
    def value(self, scene: Scene) -> str | None:
        """The short true answer on `scene` ("2", "blue", "yes", "red circle", "none"...)."""
        t, a = self.topic, self.attrs
        found = _match(scene, a)
        if t == "describe":
            return describe(scene)
        if t == "count":
            return str(len(found))
        if t == "background":
            return scene.background
        if t in ("colour", "shape", "size", "position"):
            if len(found) != 1:
                return "none" if not found else None
            o = found[0]
            return {"colour": o.color, "shape": o.shape, "size": o.size, "position": POSITION_NAMES[o.cell]}[t]
        if t == "exists":
            return "yes" if found else "no"
        if t == "relation":
            others = _match(scene, self.other)
            return "yes" if any(_REL_TEST[self.rel](x, y) for x in found for y in others if x is not y) else "no"
        if t == "compare":
            others = _match(scene, self.other)
            if len(found) != 1 or len(others) != 1:
                return None
            x, y = found[0], others[0]
            if x.size == y.size:
                return "same"
            big, small = (x, y) if x.size == "large" else (y, x)
            return (big if self.rel == "larger" else small).name
        if t == "at_position":
            here = [o for o in scene.objects if o.cell == self.cell]
            return here[0].name if here else "nothing"
        raise ValueError(f"unknown topic {t!r}")

    def truth(self, scene: Scene) -> str | None:
        """What PPO's correctness term compares with: the letter, "Yes"/"No", or the short value."""
        v = self.value(scene)
        if self.options:
            return LETTERS[self.options.index(v)] if v in self.options else None
        if self.type == "yes_no" and v:
            return v.capitalize()
        return v

    def answer(self, scene: Scene) -> str:
        """The reference answer text in the world's language."""
        v = self.value(scene)
        a, t = self.attrs, self.topic
        if self.options:
            return self.truth(scene) or ""
        if t == "describe":
            return v
        if t == "count":
            return count_phrase(int(v), a.words() if not a.empty() else "object") + "."
        if t == "background":
            return f"The background is {v}."
        if v == "none":
            return f"There is no {np_text(a)} in the image."
        if t == "colour" or t == "size":
            return f"The {np_text(a)} is {v}."
        if t == "shape":
            return f"The {np_text(a)} is {article(v)} {v}."
        if t == "position":
            return f"The {np_text(a)} is {position_phrase(_match(scene, a)[0].cell)}."
        if t == "exists":
            found = _match(scene, a)
            return f"Yes. There is {Mention.of(found[0]).text()}." if found else \
                f"No. There is no {np_text(a)} in the image."
        if t == "relation":
            x, y = np_text(a), np_text(self.other)
            if v == "yes":
                return f"Yes. The {x} is {REL_PHRASE[self.rel]} the {y}."
            flipped = replace(self, rel=OPPOSITE[self.rel])
            if flipped.value(scene) == "yes":
                return f"No. The {x} is {REL_PHRASE[flipped.rel]} the {y}."
            return f"No. The {x} is not {REL_PHRASE[self.rel]} the {y}."
        if t == "compare":
            return "They are the same size." if v == "same" else f"The {v} is {self.rel}."
        if t == "at_position":
            here = [o for o in scene.objects if o.cell == self.cell]
            return f"There is {Mention.of(here[0]).text()}." if here else \
                f"There is nothing at the {POSITION_NAMES[self.cell]}."
        raise ValueError(f"unknown topic {t!r}")

    def check(self, scene: Scene, text: str) -> bool | None:
        """Is the direct answer in `text` right? None when `text` gives none."""
        v = self.value(scene)
        if self.options:
            got = parse_choice(text, LETTERS[:len(self.options)])
            return None if got is None else got == self.truth(scene)
        t = self.topic
        if t in ("exists", "relation"):
            got = parse_yes_no(text)
            return None if got is None else got == v
        if t == "count":
            got = first_number(text)
            return None if got is None else str(got) == v
        if v == "none":  # asked about an absent object: right = says it is not there
            absent = any(c.kind == "count" and c.n == 0 for c in extract_claims(text))
            return True if absent else (None if not tokens(text) else False)
        if t in ("colour", "background"):
            got = first_word(text, COLOUR_WORDS)
        elif t == "shape":
            got = first_word(text, SHAPE_WORDS)
        elif t == "size":
            got = first_word(text, SIZE_WORDS)
        elif t == "position":
            pos = position_in(text)
            return None if pos is None else pos.holds(_match(scene, self.attrs)[0].cell)
        elif t in ("compare", "at_position"):
            return _check_named(text, v)
        else:
            return None
        return None if got is None else got == v


def _check_named(text: str, truth: str | None) -> bool | None:
    words = tokens(text)
    if not words or truth is None:
        return None
    if truth in ("same", "nothing"):
        return truth in words or ("no" in words and truth == "nothing")
    colour, shape = first_word(text, COLOUR_WORDS), first_word(text, SHAPE_WORDS)
    if colour is None and shape is None:
        return None
    return f"{colour} {shape}" == truth


# ---- reading questions back -------------------------------------------------------------------
def _attrs(phrase: str) -> Attrs | None:
    t = tokens(phrase)
    if not t:
        return None
    np = np_at_head(t, len(t) - 1)
    return None if np is None or np.ambiguous or np.start != 0 and t[0] not in ("the", "a", "an") else np.attrs


_PATTERNS = [
    ("count", re.compile(r"how many (.+?) (?:are there|are in|can you see|do you see)")),
    ("background", re.compile(r"what colou?r is the background")),
    ("colour", re.compile(r"what colou?r is the (.+?)\?")),
    ("shape_mc", re.compile(r"which shape is (\w+)\?")),
    ("shape", re.compile(r"what shape is the (.+?)\?")),
    ("size", re.compile(r"is the (.+?) (?:large|small|big) or (?:large|small|little)\?")),
    ("exists", re.compile(r"is there (?:a|an|any) (.+?) in the (?:image|picture)\?")),
    ("relation", re.compile(r"is the (.+?) (to the left of|to the right of|above|below) the (.+?)\?")),
    ("position", re.compile(r"where is the (.+?)\?")),
    ("compare", re.compile(r"which is (larger|smaller|bigger), the (.+?) or the (.+?)\?")),
    ("at_position", re.compile(r"what is (?:at|in|on) the (.+?)(?: of the (?:image|picture))?\?")),
    ("describe", re.compile(r"(describe|what is in the (?:image|picture)|what do you see|what can you see)")),
]
_OPTION = re.compile(r"^([A-H])\.\s*(.+)$")


def parse_question(text: str | None) -> QuestionSpec | None:
    """The spec of a question in the world's phrasing (as `QuestionSpec.text()` writes it), else None."""
    if not text:
        return None
    lines = [ln.strip() for ln in text.replace("<image>", "").strip().splitlines() if ln.strip()]
    if not lines:
        return None
    options = tuple(m.group(2).strip() for ln in lines[1:] if (m := _OPTION.match(ln)))
    stem = lines[0].lower()
    for topic, pat in _PATTERNS:
        m = pat.search(stem)
        if not m:
            continue
        spec = _spec_from(topic, m, lines[0])
        if spec is not None:
            return replace(spec, options=options or None)
    return None


def _spec_from(topic: str, m: re.Match, original: str) -> QuestionSpec | None:
    if topic == "describe":
        return QuestionSpec("describe", prompt=original)
    if topic == "background":
        return QuestionSpec("background")
    if topic == "shape_mc":
        colour = COLOUR_WORDS.get(m.group(1))
        return QuestionSpec("shape", Attrs(color=colour)) if colour else None
    if topic == "relation":
        a, b = _attrs(m.group(1)), _attrs(m.group(3))
        rel = {"to the left of": "left_of", "to the right of": "right_of"}.get(m.group(2), m.group(2))
        return QuestionSpec("relation", a, b, rel) if a and b else None
    if topic == "compare":
        a, b = _attrs(m.group(2)), _attrs(m.group(3))
        rel = "larger" if m.group(1) in ("larger", "bigger") else "smaller"
        return QuestionSpec("compare", a, b, rel) if a and b else None
    if topic == "at_position":
        pos = position_in(m.group(1))
        cells = [c for c in POSITION_NAMES if pos and pos.holds(c)]
        return QuestionSpec("at_position", cell=cells[0]) if len(cells) == 1 else None
    phrase = m.group(1)
    if topic == "count" and phrase in ("objects", "shapes", "things"):
        return QuestionSpec("count")
    a = _attrs(phrase)
    if a is None:
        return None
    return None if a.empty() else QuestionSpec(topic, a)


# ---- choosing questions for a scene -------------------------------------------------------------
def _unique_np(scene: Scene, obj: Obj, rng: random.Random) -> Attrs:
    """The shortest description that names `obj` alone (shape, colour+object, or colour+shape)."""
    options = [Attrs(shape=obj.shape), Attrs(color=obj.color), Attrs(color=obj.color, shape=obj.shape)]
    ok = [a for a in options[:2] if len(_match(scene, a)) == 1]
    return rng.choice(ok) if ok and rng.random() < 0.5 else options[2]


def _absent_kind(scene: Scene, cfg: WorldConfig, rng: random.Random) -> Attrs:
    present = {(o.color, o.shape) for o in scene.objects}
    absent = [(c, s) for c in cfg.colors for s in cfg.shapes if (c, s) not in present]
    near = [k for k in absent if any(k[0] == c or k[1] == s for c, s in present)]  # adversarial-ish
    c, s = rng.choice(near if near and rng.random() < 0.5 else absent)
    return Attrs(color=c, shape=s)


def make_spec(topic: str, scene: Scene, rng: random.Random, cfg: WorldConfig | None = None,
              mc: bool = False) -> QuestionSpec | None:
    """A question of `topic` that is well posed on `scene` (None if it cannot be asked here)."""
    cfg = cfg or WorldConfig()
    objs = scene.objects
    obj = rng.choice(objs)
    if topic == "describe":
        return QuestionSpec("describe", prompt=rng.choice(DESCRIBE_PROMPTS))
    if topic == "count":
        kind = rng.choice(("shape", "colour", "all"))
        if mc:
            return QuestionSpec("count", options=tuple(str(n) for n in range(cfg.min_objects, cfg.max_objects + 1)))
        if kind == "all":
            return QuestionSpec("count")
        pick = rng.choice(cfg.shapes) if kind == "shape" else rng.choice(cfg.colors)
        return QuestionSpec("count", Attrs(shape=pick) if kind == "shape" else Attrs(color=pick))
    if topic == "colour":
        a = Attrs(shape=obj.shape)
        if len(_match(scene, a)) != 1:
            return None
        opts = tuple(rng.sample(cfg.colors, len(cfg.colors))) if mc else None
        return QuestionSpec("colour", a, options=opts)
    if topic == "shape":
        a = Attrs(color=obj.color)
        if len(_match(scene, a)) != 1:
            return None
        return QuestionSpec("shape", a, options=tuple(rng.sample(cfg.shapes, len(cfg.shapes))) if mc else None)
    if topic == "size":
        return QuestionSpec("size", _unique_np(scene, obj, rng))
    if topic == "position":
        return QuestionSpec("position", _unique_np(scene, obj, rng))
    if topic == "background":
        return QuestionSpec("background")
    if topic == "exists":
        present = rng.random() < 0.5
        return QuestionSpec("exists", Attrs(color=obj.color, shape=obj.shape) if present
                            else _absent_kind(scene, cfg, rng))
    if topic in ("relation", "compare"):
        if len(objs) < 2:
            return None
        x, y = rng.sample(objs, 2)
        a, b = Attrs(color=x.color, shape=x.shape), Attrs(color=y.color, shape=y.shape)
        if topic == "compare":
            return QuestionSpec("compare", a, b, rng.choice(("larger", "smaller")))
        rels = [r for r, on in (("left_of", x.cell[0] != y.cell[0]), ("right_of", x.cell[0] != y.cell[0]),
                                ("above", x.cell[1] != y.cell[1]), ("below", x.cell[1] != y.cell[1])) if on]
        return QuestionSpec("relation", a, b, rng.choice(rels))
    if topic == "at_position":
        return QuestionSpec("at_position", cell=obj.cell) if obj.cell in ((0, 0), (2, 0), (1, 1), (0, 2), (2, 2)) \
            else None
    raise ValueError(f"unknown topic {topic!r}")


@dataclass(frozen=True)
class QA:
    type: str  # yes_no | multiple_choice | open | describe
    topic: str
    question: str
    answer: str  # reference answer text
    truth: str  # short answer for the correctness term
    spec: QuestionSpec


def qa_of(spec: QuestionSpec, scene: Scene) -> QA:
    return QA(spec.type, spec.topic, spec.text(), spec.answer(scene), spec.truth(scene) or "", spec)


# SFT / PPO mix: (topic, multiple choice?, weight)
VQA_MIX = (("exists", False, 3), ("count", False, 2), ("relation", False, 2), ("colour", False, 1),
           ("shape", False, 1), ("size", False, 1), ("position", False, 1), ("background", False, 1),
           ("colour", True, 1), ("shape", True, 1), ("count", True, 1))


def describe_qa(scene: Scene, rng: random.Random) -> QA:
    return qa_of(make_spec("describe", scene, rng), scene)


def vqa_items(scene: Scene, rng: random.Random, k: int, cfg: WorldConfig | None = None) -> list[QA]:
    """`k` different questions (not descriptions) that are well posed on `scene`."""
    out: list[QA] = []
    seen: set[str] = set()
    for _ in range(20 * k):
        if len(out) >= k:
            break
        topic, mc, _w = rng.choices(VQA_MIX, weights=[w for *_, w in VQA_MIX])[0]
        spec = make_spec(topic, scene, rng, cfg, mc=mc)
        if spec is None or spec.stem() in seen or spec.truth(scene) in (None, ""):
            continue
        seen.add(spec.stem())
        out.append(qa_of(spec, scene))
    return out
