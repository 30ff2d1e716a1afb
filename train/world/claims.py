"""Read claims out of free text about a shapes scene: the parsing half of the judge.

Small and forgiving on purpose: it understands the world's own language exactly and common variants
("two red circles", "there is no green triangle", "the square is blue", "the red circle is to the left
of the blue square", "on a black background"). Anything it cannot read produces no claim, so
degenerate model output (empty, repeated, truncated) is "not informative", never "hallucinated" —
unless it does name something (a shape or colour word with a head noun) that is not in the image.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SHAPE_WORDS = {"circle": "circle", "square": "square", "triangle": "triangle",
               # shapes the world never draws: naming one is always a hallucination
               "rectangle": "rectangle", "star": "star", "hexagon": "hexagon", "oval": "oval",
               "diamond": "diamond", "pentagon": "pentagon", "heart": "heart", "cross": "cross",
               "ball": "circle", "disc": "circle", "disk": "circle", "dot": "circle", "box": "square"}
GENERIC_HEADS = {"object", "shape", "thing", "item", "figure"}
COLOUR_WORDS = {c: c for c in ("red", "green", "blue", "yellow", "white", "purple", "orange", "pink",
                               "black", "grey", "brown", "cyan", "magenta")}
COLOUR_WORDS["gray"] = "grey"
SIZE_WORDS = {"small": "small", "little": "small", "tiny": "small", "large": "large", "big": "large",
              "huge": "large"}
ADVERBS = {"very", "bright", "dark", "light", "solid", "plain", "rather", "quite", "fairly"}
NUMBERS = {"zero": 0, "no": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6,
           "seven": 7, "eight": 8, "nine": 9, "ten": 10}
EXIST_DETS = {"a", "an", "another", "single", "some", "several", "many", "any"}
DEFINITE_DETS = {"the", "this", "that", "these", "those", "each", "every", "both", "all"}
NEGATORS = {"not", "without", "never", "nor", "neither"}
EXACT_CUES = {"only", "exactly", "just", "precisely"}
FILLERS = {"is", "are", "located", "placed", "positioned", "situated", "sits", "sitting", "lies",
           "lying", "which", "that", "it", "appears", "seems", "can", "be", "seen", "found", "drawn"}
POSITION_WORDS = {"top", "bottom", "upper", "lower", "left", "right", "centre", "center", "middle",
                  "corner", "side", "half", "part", "edge", "area", "region"}
IMAGE_NOUNS = {"image", "picture", "frame", "canvas", "photo", "scene", "photograph"}
_TOKEN = re.compile(r"[a-z]+|\d+|[.,;:!?]|\n")
_END = {".", "!", "?", ";", "\n"}


def _head_forms() -> dict[str, tuple[str | None, bool]]:
    forms: dict[str, tuple[str | None, bool]] = {}
    for word, shape in [*SHAPE_WORDS.items(), *((g, None) for g in GENERIC_HEADS)]:
        forms[word] = (shape, False)
        forms[word + ("es" if word.endswith(("x", "s")) else "s")] = (shape, True)
    return forms


HEAD_FORMS = _head_forms()


def plural_head(word: str) -> tuple[str | None, bool] | None:
    """(shape or None for a generic head, is_plural) for a head noun, else None."""
    return HEAD_FORMS.get(word)


@dataclass(frozen=True)
class Attrs:
    size: str | None = None
    color: str | None = None
    shape: str | None = None

    def words(self) -> str:
        return " ".join(w for w in (self.size, self.color, self.shape or "object") if w)

    def empty(self) -> bool:
        return self.size is None and self.color is None and self.shape is None

    def merge(self, other: "Attrs") -> "Attrs | None":
        """Both descriptions at once, or None if they contradict (red and blue)."""
        out = {}
        for name in ("size", "color", "shape"):
            a, b = getattr(self, name), getattr(other, name)
            if a is not None and b is not None and a != b:
                return None
            out[name] = a if a is not None else b
        return Attrs(**out)


@dataclass(frozen=True)
class Position:
    col: int | None = None
    row: int | None = None

    def holds(self, cell: tuple[int, int]) -> bool:
        return (self.col is None or cell[0] == self.col) and (self.row is None or cell[1] == self.row)


@dataclass(frozen=True)
class Claim:
    """kind: exists | count | attr | relation | background.

    exists: something matching `attrs` (at `pos`) is there; count: exactly `n` things match `attrs`;
    attr: the thing matching `attrs` also matches `pred` (at `pos`); relation: `attrs` is `rel`
    (left_of/right_of/above/below) of `other`; background: the background is `color`.
    """

    kind: str
    text: str
    attrs: Attrs = Attrs()
    n: int | None = None
    pos: Position | None = None
    pred: Attrs | None = None
    rel: str | None = None
    other: Attrs | None = None
    color: str | None = None
    every: bool = False  # attr about a plural referent ("both shapes are large"): true of each one


def tokens(text: str) -> list[str]:
    text = text.lower().replace("n't", " not").replace("’", "'")
    return _TOKEN.findall(text)


def sentences(text: str) -> list[tuple[list[str], bool]]:
    """Token lists per sentence, each with whether it is a question (then it claims nothing)."""
    out, cur = [], []
    for tok in tokens(text):
        if tok in _END:
            if cur:
                out.append((cur, tok == "?"))
            cur = []
        else:
            cur.append(tok)
    if cur:
        out.append((cur, False))
    return out


@dataclass
class _NP:
    start: int
    head: int
    det: str | None
    attrs: Attrs
    plural: bool
    ambiguous: bool


def np_at_head(t: list[str], h: int, floor: int = 0) -> _NP | None:
    head = plural_head(t[h])
    if head is None:
        return None
    shape, plural = head
    sizes, colours, ambiguous = [], [], False
    j = h - 1
    while j >= floor:
        w = t[j]
        if w in SIZE_WORDS:
            sizes.append(SIZE_WORDS[w])
        elif w in COLOUR_WORDS:
            colours.append(COLOUR_WORDS[w])
        elif w in ADVERBS:
            pass
        elif w in ("and", "or") and j - 1 >= floor and (t[j - 1] in COLOUR_WORDS or t[j - 1] in SIZE_WORDS):
            ambiguous = True
        else:
            break
        j -= 1
    ambiguous = ambiguous or len(set(sizes)) > 1 or len(set(colours)) > 1
    det = None
    if j >= floor and (t[j] in NUMBERS or t[j].isdigit() or t[j] in EXIST_DETS or t[j] in DEFINITE_DETS):
        det = t[j]
        if det == "single" and j - 1 >= floor and t[j - 1] in ("a", "one"):
            j -= 1
    else:
        j += 1
    attrs = Attrs(sizes[0] if sizes else None, colours[0] if colours else None, shape)
    return _NP(j, h, det, attrs, plural, ambiguous)


def _np_forward(t: list[str], k: int) -> _NP | None:
    """The noun phrase starting at k (determiner, adjectives, head), if there is one."""
    m = k
    if m < len(t) and (t[m] in DEFINITE_DETS or t[m] in EXIST_DETS or t[m] in NUMBERS):
        m += 1
    while m < len(t) and (t[m] in SIZE_WORDS or t[m] in COLOUR_WORDS or t[m] in ADVERBS):
        m += 1
    if m < len(t) and plural_head(t[m]) is not None:
        return np_at_head(t, m, floor=k)
    return None


def _position(words: list[str]) -> Position | None:
    ws = set(words)
    row = 0 if ws & {"top", "upper"} else 2 if ws & {"bottom", "lower"} else None
    col = 0 if "left" in ws else 2 if "right" in ws else None
    if ws & {"centre", "center", "middle"}:
        if row is None and col is None:
            row, col = 1, 1
        elif col is None:
            col = 1
        elif row is None:
            row = 1
    if row is None and col is None:
        return None
    return Position(col, row)


_REL_OF = {"left": "left_of", "right": "right_of", "top": "above", "bottom": "below"}
_REL_WORD = {"above": "above", "over": "above", "below": "below", "under": "below", "beneath": "below",
             "underneath": "below"}


def _tail(t: list[str], k: int):
    """After a noun phrase: ('pos', Position, end) | ('rel', rel, NP2) | ('pred', Attrs|NP2, end) | None."""
    copula = False
    while k < len(t) and t[k] in FILLERS:
        copula = copula or t[k] in ("is", "are")
        k += 1
    if k >= len(t) or t[k] == "not":
        return None
    w = t[k]
    if w in _REL_WORD:
        np2 = _np_forward(t, k + 1)
        return ("rel", _REL_WORD[w], np2) if np2 else None
    if w in ("left", "right") and k + 1 < len(t) and t[k + 1] == "of":
        np2 = _np_forward(t, k + 2)
        return ("rel", _REL_OF[w], np2) if np2 else None
    if w in ("to", "on", "at", "in", "near"):
        m = k + 1
        if m < len(t) and t[m] in ("the", "its"):
            m += 1
        words = []
        while m < len(t) and t[m] in POSITION_WORDS:
            words.append(t[m])
            m += 1
        if not words:
            return None
        if m < len(t) and t[m] == "of":
            after = m + 1 + (m + 1 < len(t) and t[m + 1] == "the")
            if after < len(t) and t[after] in IMAGE_NOUNS:
                pos = _position(words)
                return ("pos", pos, after + 1) if pos else None
            np2 = _np_forward(t, m + 1)
            rels = [_REL_OF[x] for x in words if x in _REL_OF]
            return ("rel", rels[0], np2) if np2 and len(rels) == 1 else None
        pos = _position(words)
        return ("pos", pos, m) if pos else None
    if copula and (w in SIZE_WORDS or w in COLOUR_WORDS):
        np2 = _np_forward(t, k)
        if np2 is not None:
            return ("pred", np2, np2.head + 1)
        size = SIZE_WORDS.get(w)
        color = COLOUR_WORDS.get(w)
        nxt = t[k + 1] if k + 1 < len(t) else None
        if nxt is not None and nxt in ("and", "or") and k + 2 < len(t) and \
                (t[k + 2] in SIZE_WORDS or t[k + 2] in COLOUR_WORDS):
            return None  # "large and red" / "red or blue": not worth the risk
        return ("pred", Attrs(size, color, None), k + 1)
    if copula and w in ("a", "an", "one"):
        np2 = _np_forward(t, k)
        return ("pred", np2, np2.head + 1) if np2 else None
    return None


def _negated(t: list[str], start: int) -> bool:
    for j in range(start - 1, max(-1, start - 5), -1):
        if t[j] in (",", ":"):
            return False
        if t[j] in NEGATORS:
            return True
    return False


def _exact(t: list[str], np: _NP, n: int) -> bool:
    if n != 1:
        return True
    before = t[max(0, np.start - 2):np.start]
    return bool(before and (before[-1] in EXACT_CUES or before[-1] in ("is", "are") and "there" in before))


def _background_claims(t: list[str]) -> list[Claim]:
    out = []
    for i, w in enumerate(t):
        colour = None
        if w == "background":
            k = i - 1
            while k >= 0 and t[k] in ADVERBS:
                k -= 1
            if k >= 0 and t[k] in COLOUR_WORDS:
                colour = COLOUR_WORDS[t[k]]
            else:
                k = i + 1
                while k < len(t) and t[k] in ("colour", "color", "is", "of", "the", "image", "appears"):
                    k += 1
                if k < len(t) and t[k] in COLOUR_WORDS and "not" not in t[i:k]:
                    colour = COLOUR_WORDS[t[k]]
        elif w in IMAGE_NOUNS and i > 0 and t[i - 1] in COLOUR_WORDS and (i < 2 or t[i - 2] in ("a", "an")):
            colour = COLOUR_WORDS[t[i - 1]]  # "a black image with ..."
        if colour is not None:
            out.append(Claim("background", " ".join(t[max(0, i - 3):i + 3]), color=colour))
    return out


def extract_claims(text: str) -> list[Claim]:
    """Every checkable claim in `text`, in reading order."""
    claims: list[Claim] = []
    for t, is_question in sentences(text):
        if is_question:
            continue
        claims += _background_claims(t)
        consumed: set[int] = set()
        for h in range(len(t)):
            if h in consumed or t[h] not in HEAD_FORMS:
                continue
            np = np_at_head(t, h)
            if np is None or np.ambiguous:
                continue
            span = " ".join(t[np.start:np.head + 1])
            det = np.det
            n = NUMBERS.get(det) if det in NUMBERS else int(det) if det and det.isdigit() else None
            if det in ("any", "a", "an", "single") and _negated(t, np.start):
                n = 0
            elif n is not None and n > 0 and _negated(t, np.start):
                continue  # "not two circles": too vague to check
            counted = n is not None and (n == 0 or _exact(t, np, n))
            if counted:
                claims.append(Claim("count", span, np.attrs, n=n))
                if n == 0:
                    continue
            tail = _tail(t, np.head + 1)
            if tail is None:
                if not counted and not np.attrs.empty():
                    claims.append(Claim("exists", span, np.attrs))
                continue
            kind, a, b = tail
            if kind == "pos" and np.plural and np.det in DEFINITE_DETS:  # "both shapes are on the left"
                claims.append(Claim("attr", " ".join(t[np.start:b]), np.attrs, pred=Attrs(), pos=a, every=True))
            elif kind == "pos":
                claims.append(Claim("exists", " ".join(t[np.start:b]), np.attrs, pos=a))
            elif kind == "rel":
                consumed.add(b.head)
                if not b.ambiguous:
                    claims.append(Claim("relation", " ".join(t[np.start:b.head + 1]), np.attrs, rel=a,
                                        other=b.attrs))
            else:  # predication: "the square is blue" / "the red object is a circle (on the left)"
                pred = a.attrs if isinstance(a, _NP) else a
                if isinstance(a, _NP):
                    consumed.add(a.head)
                pos = None
                after = _tail(t, b)
                if after and after[0] == "pos":
                    pos, b = after[1], after[2]
                claims.append(Claim("attr", " ".join(t[np.start:b]), np.attrs, pred=pred, pos=pos,
                                    every=np.plural or np.det in ("both", "all", "each", "every")))
    return claims


def first_number(text: str) -> int | None:
    """The first count in an answer: a digit, a number word, or "no"/"none" (= 0)."""
    t = tokens(text)
    for i, w in enumerate(t):
        if w.isdigit():
            return int(w)
        if w == "none":
            return 0
        if w == "no":
            rest = t[i + 1:i + 4]
            if any(plural_head(x) for x in rest):
                return 0
            continue
        if w in NUMBERS:
            return NUMBERS[w]
    return None


def first_word(text: str, vocab: dict) -> str | None:
    for w in tokens(text):
        if w in vocab:
            return vocab[w]
        head = plural_head(w) if vocab is SHAPE_WORDS else None
        if head and head[0]:
            return head[0]
    return None


def position_in(text: str) -> Position | None:
    t = tokens(text)
    words = [w for w in t if w in POSITION_WORDS]
    return _position(words) if words else None
