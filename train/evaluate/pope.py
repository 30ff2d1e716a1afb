"""POPE (Li et al. 2023): "Is there a <object> in the image?" yes/no probes of object hallucination.

Format: JSONL (or a JSON list) of `question_id`, `image`, `text`, `label` ("yes"/"no"); one file per
split (random / popular / adversarial), the split read from a `split`/`category` field or the file
name (`coco_pope_random.jsonl` -> random). Answers are parsed as LLaVA-RLHF's
`summarize_eval_pope.py` does: keep the text before the first ".", drop commas, split on spaces;
"no" if a word is exactly `No`, `no` or `not`, else "yes". Metrics with "yes" as the positive class:
accuracy, precision, recall, F1 and the share of "yes" answers (yes-ratio; 0.5 = unbiased).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

from factedge.edge.errors import InputError
from factedge.train.evaluate.backends import Backend
from factedge.train.evaluate.data import read_records, resolve_image

SPLITS = ("random", "popular", "adversarial")
# LLaVA-RLHF's eval_pope.sh appends this to every POPE question (LLaVA-1.5's short-answer prompt)
PROMPT_SUFFIX = "\nAnswer the question using a single word or phrase."
NO_WORDS = ("No", "no", "not")


@dataclass(frozen=True)
class PopeItem:
    question_id: str
    image: Path
    text: str
    label: str  # "yes" | "no"
    split: str


@dataclass
class PopeOptions:
    prompt_suffix: str = PROMPT_SUFFIX
    max_tokens: int = 64  # LLaVA-RLHF's --short_eval
    limit: int | None = None  # first N items of each split


def _split_of(record: dict, path: Path) -> str:
    for key in ("split", "category"):
        if isinstance(record.get(key), str) and record[key]:
            return record[key]
    stem = path.stem.lower()
    for split in SPLITS:
        if stem.endswith(split) or f"_{split}" in stem:
            return split
    return stem


def _label(value, path: Path, where: str) -> str:
    text = str(value).strip().lower()
    if text not in ("yes", "no"):
        raise InputError(f"{where}: label must be yes or no, not {value!r}", path)
    return text


def load_pope(paths: Sequence[Path], images: Path | None = None) -> list[PopeItem]:
    """Items of every file, in file order; images must exist locally (see data.resolve_image)."""
    items: list[PopeItem] = []
    for path in paths:
        path = Path(path)
        for i, rec in enumerate(read_records(path)):
            where = f"item {i}"
            missing = [k for k in ("image", "text", "label") if k not in rec]
            if missing:
                raise InputError(f"{where}: missing {', '.join(missing)}", path)
            image = resolve_image([str(rec["image"])], base=path.parent, images=images, source=path, where=where)
            items.append(PopeItem(str(rec.get("question_id", i)), image, str(rec["text"]),
                                  _label(rec["label"], path, where), _split_of(rec, path)))
    return items


def parse_yes_no(answer: str) -> str:
    """The paper's parsing: "no" when the first sentence has the word No/no/not, else "yes"."""
    text = answer.split(".")[0] if "." in answer else answer
    words = text.replace(",", "").split(" ")
    return "no" if any(w in NO_WORDS for w in words) else "yes"


@dataclass
class PopeMetrics:
    n: int
    tp: int
    fp: int
    tn: int
    fn: int
    accuracy: float
    precision: float
    recall: float
    f1: float
    yes_ratio: float

    @classmethod
    def compute(cls, preds: Iterable[str], labels: Iterable[str]) -> "PopeMetrics":
        pairs = list(zip(preds, labels, strict=True))
        tp = sum(p == "yes" and g == "yes" for p, g in pairs)
        fp = sum(p == "yes" and g == "no" for p, g in pairs)
        tn = sum(p == "no" and g == "no" for p, g in pairs)
        fn = sum(p == "no" and g == "yes" for p, g in pairs)
        n = len(pairs)
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        return cls(n, tp, fp, tn, fn, (tp + tn) / n if n else 0.0, precision, recall, f1,
                   (tp + fp) / n if n else 0.0)


@dataclass
class PopeRecord:
    question_id: str
    split: str
    label: str
    answer: str
    pred: str
    tokens: int


@dataclass
class PopeResult:
    records: list[PopeRecord]
    metrics: dict[str, PopeMetrics]  # per split, plus "all"
    speed: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"metrics": {k: asdict(v) for k, v in self.metrics.items()},
                "records": [asdict(r) for r in self.records], "speed": self.speed}


def pope_metrics(records: Sequence[PopeRecord]) -> dict[str, PopeMetrics]:
    """Metrics per split (in first-seen order) and over all items ("all")."""
    splits = list(dict.fromkeys(r.split for r in records))
    out = {s: PopeMetrics.compute([r.pred for r in records if r.split == s], [r.label for r in records if r.split == s])
           for s in splits}
    out["all"] = PopeMetrics.compute([r.pred for r in records], [r.label for r in records])
    return out


def limit_per_split(items: Sequence[PopeItem], limit: int | None) -> list[PopeItem]:
    if limit is None:
        return list(items)
    seen: dict[str, int] = {}
    out = []
    for item in items:
        if seen.get(item.split, 0) < limit:
            seen[item.split] = seen.get(item.split, 0) + 1
            out.append(item)
    return out


def run_pope(backend: Backend, items: Sequence[PopeItem], options: PopeOptions | None = None,
             progress: Callable[[int, int], None] | None = None) -> PopeResult:
    """Ask every item greedily, parse, score."""
    options = options or PopeOptions()
    items = limit_per_split(items, options.limit)
    gens = backend.answer_many([(item.image, item.text + options.prompt_suffix) for item in items], options.max_tokens,
                               progress)
    records = [PopeRecord(item.question_id, item.split, item.label, gen.text, parse_yes_no(gen.text), len(gen.tokens))
               for item, gen in zip(items, gens)]
    return PopeResult(records, pope_metrics(records), backend.speed())
