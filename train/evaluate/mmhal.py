"""MMHal-Bench (Sun et al. 2023): 96 questions, 8 types, answers rated 0-6 by a judge.

Format: a JSON list (or JSONL) of items with `question`, `image_src` (a URL in the real set) and/or
`image_path`, `image_content` (object labels), `gt_answer`, optionally `question_type`. The types
come in a fixed order, item i having type i % 8 (how MMHal's script groups them); an item's own
`question_type` is used when it names one of the eight. Greedy answers; mean score, hallucination
rate (share of ratings < 3) and mean score per type, as the paper reports them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from factedge.convert.hparams import read_json
from factedge.edge.errors import InputError
from factedge.train.evaluate.backends import Backend
from factedge.train.evaluate.data import read_records, resolve_image
from factedge.train.evaluate.judges import Judge
from factedge.train.evaluate.mmhal_items import HALLUCINATION_BELOW, TYPES, MMHalItem, normalize_type  # noqa: F401

def _scenes_near(path: Path, scenes: Path | None) -> dict[str, dict]:
    """scenes.json (image id -> scene dict), from --scenes (required) or beside the benchmark, if present."""
    return read_json(scenes or (path.parent / "scenes.json"), required=scenes is not None)


def _scene_of(rec: dict, image: Path, scenes: dict[str, dict]) -> dict | None:
    for key in ("scene", "image_content"):
        if isinstance(rec.get(key), dict) and "objects" in rec[key]:
            return rec[key]
    for key in (rec.get("image_id"), image.stem, image.name):
        if key is not None and str(key) in scenes:
            return scenes[str(key)]
    return None


def load_mmhal(path: Path, images: Path | None = None, scenes: Path | None = None) -> list[MMHalItem]:
    """Items in file order, each with a local image (see data.resolve_image) and its scene if known."""
    path = Path(path)
    records = read_records(path)
    scene_map = _scenes_near(path, scenes)
    items = []
    for i, rec in enumerate(records):
        where = f"item {i}"
        if not isinstance(rec.get("question"), str):
            raise InputError(f"{where}: missing question", path)
        refs = [str(rec[k]) for k in ("image_path", "image_src", "image") if rec.get(k)]
        if not refs:
            raise InputError(f"{where}: no image_path or image_src", path)
        image = resolve_image(refs, base=path.parent, images=images, source=path, where=where)
        items.append(MMHalItem(i, rec["question"], image, rec.get("image_content"), str(rec.get("gt_answer", "")),
                               normalize_type(rec.get("question_type"), i), _scene_of(rec, image, scene_map), path))
    return items


@dataclass
class MMHalRecord:
    index: int
    question_type: str
    question: str
    answer: str
    score: int
    hallucinated: bool
    judge_parsed: bool
    explanation: str
    tokens: int


@dataclass
class TypeSummary:
    n: int
    mean_score: float
    hallucination_rate: float


@dataclass
class MMHalSummary:
    n: int
    mean_score: float
    hallucination_rate: float  # share of items rated < 3
    unparsed: int  # judge replies without a single rating (scored 0)
    per_type: dict[str, TypeSummary]

    @classmethod
    def compute(cls, records: Sequence[MMHalRecord]) -> "MMHalSummary":
        def stats(rs: Sequence[MMHalRecord]) -> tuple[int, float, float]:
            n = len(rs)
            if not n:
                return 0, 0.0, 0.0
            return n, sum(r.score for r in rs) / n, sum(r.score < HALLUCINATION_BELOW for r in rs) / n

        n, mean, rate = stats(records)
        per_type = {t: TypeSummary(*stats([r for r in records if r.question_type == t]))
                    for t in TYPES if any(r.question_type == t for r in records)}
        return cls(n, mean, rate, sum(not r.judge_parsed for r in records), per_type)


@dataclass
class MMHalOptions:
    max_tokens: int = 1024  # LLaVA-RLHF's model_vqa for MMHal (temperature 0)
    prompt_suffix: str = ""  # eval_mmhal.sh: --test-prompt ''
    limit: int | None = None


@dataclass
class MMHalResult:
    records: list[MMHalRecord]
    summary: MMHalSummary
    judge: str
    speed: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"summary": asdict(self.summary), "judge": self.judge,
                "records": [asdict(r) for r in self.records], "speed": self.speed}


def run_mmhal(backend: Backend, items: Sequence[MMHalItem], judge: "Judge", options: MMHalOptions | None = None,
              progress: Callable[[int, int], None] | None = None) -> MMHalResult:
    """Answer every item greedily, have the judge rate it, summarise."""
    options = options or MMHalOptions()
    items = list(items)[: options.limit] if options.limit is not None else list(items)
    gens = backend.answer_many([(item.image, item.question + options.prompt_suffix) for item in items],
                               options.max_tokens, progress)
    records = []
    for item, gen in zip(items, gens):
        verdict = judge.score(item, gen.text)
        records.append(MMHalRecord(item.index, item.question_type, item.question, gen.text, verdict.score,
                                   verdict.hallucinated, verdict.parsed, verdict.explanation, len(gen.tokens)))
    return MMHalResult(records, MMHalSummary.compute(records), judge.name, backend.speed())
