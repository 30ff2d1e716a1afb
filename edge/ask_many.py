"""Many questions in, a JSONL of answers out: `factedge ask --images FOLDER` / `--batch FILE.jsonl`.

The jobs come from a folder (every image, one question) or a JSONL file (one {"image", "question",
"id"} object per line; "image" relative to the file's folder; "id" defaults to the line number). They
are answered through the batch engine (edge/batch.py), several at once, and each answer is appended to
`<out>.partial` as soon as it is done, so an interrupted run loses nothing: run the same command again
and the ids already in the partial file are skipped. When every job has a line, the partial file is
renamed to `<out>`. A job that fails (an unreadable image, a prompt too long) gets a line with its
error; the others go on.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from factedge.edge.atomic import write_text
from factedge.edge.batch import BatchOptions, BatchSession, Request
from factedge.edge.errors import ConfigError, InputError, OutputError
from factedge.edge.file_types import IMAGE_SUFFIXES
from factedge.edge.sampling import SamplingOptions

if TYPE_CHECKING:
    from factedge.edge.vision_model import VisionModel

Progress = Callable[[str, int, int], None]  # (step, done, total), as edge/progress.py draws it
MAX_LINE_BYTES = 1 << 20  # a JSONL job line over 1 MiB is refused, not parsed


@dataclass(frozen=True)
class Job:
    id: str
    question: str
    image: Path | None
    image_text: str | None = None  # the image as the input wrote it (kept in the output)


@dataclass
class AskSummary:
    out: Path
    total: int
    resumed: int  # jobs already answered by an earlier, interrupted run
    answered: int
    failed: int
    generated_tokens: int
    wall_s: float


def jobs_from_folder(folder: Path, question: str) -> list[Job]:
    """Every image file directly in `folder` (sorted by name), each asked `question`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError("not a folder of images", folder)
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise InputError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in this folder", folder)
    return [Job(p.name, question, p, p.name) for p in files]


def jobs_from_jsonl(path: Path, question: str | None = None) -> list[Job]:
    """The jobs of a JSONL file; a bad line is an InputError naming the file and the line."""
    path = Path(path)
    if not path.is_file():
        raise InputError("batch file not found", path)
    jobs, seen = [], set()
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if len(raw) > MAX_LINE_BYTES:
                raise InputError(f"line {n} is over {MAX_LINE_BYTES} bytes", path)
            if not raw.strip():
                continue
            job = _job(raw, n, path, question)
            if job.id in seen:
                raise InputError(f"line {n}: id {job.id!r} is used twice", path)
            seen.add(job.id)
            jobs.append(job)
    if not jobs:
        raise InputError("the batch file has no jobs", path)
    return jobs


def _job(raw: bytes, n: int, path: Path, question: str | None) -> Job:
    try:
        obj = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"line {n} is not JSON ({exc})", path) from None
    if not isinstance(obj, dict):
        raise InputError(f"line {n} is not a JSON object", path)
    q, image, ident = obj.get("question", question), obj.get("image"), obj.get("id", str(n))
    if not isinstance(q, str) or not q.strip():
        raise InputError(f"line {n} has no question (and none was given on the command line)", path)
    if image is not None and not isinstance(image, str):
        raise InputError(f"line {n}: image must be a path string", path)
    if not isinstance(ident, (str, int)):
        raise InputError(f"line {n}: id must be a string or a number", path)
    resolved = None if image is None else (Path(image) if Path(image).is_absolute() else path.parent / image)
    return Job(str(ident), q, resolved, image)


def partial_path(out: Path) -> Path:
    return Path(out).with_name(Path(out).name + ".partial")


def answered_ids(partial: Path) -> list[str]:
    """The ids with a complete line in an earlier run's partial file; a torn last line (the run was
    killed mid-write) is dropped from the file so appending starts on a clean line."""
    if not partial.is_file():
        return []
    lines = partial.read_bytes().split(b"\n")
    kept, ids = [], []
    for line in lines:
        try:
            ids.append(str(json.loads(line)["id"]))
            kept.append(line)
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            continue
    if len(kept) != len([x for x in lines if x]):
        write_text(partial, "".join(x.decode("utf-8") + "\n" for x in kept))
    return ids


def answer_jobs(vision: "VisionModel", jobs: list[Job], out: Path, *, batch: BatchOptions | None = None,
                sampling: SamplingOptions | None = None, overwrite: bool = False,
                progress: Progress | None = None) -> AskSummary:
    """Answer `jobs` into the JSONL file `out` (see the module doc)."""
    out, start = Path(out), time.perf_counter()
    partial = partial_path(out)
    if out.exists() and not partial.exists() and not overwrite:
        raise OutputError("exists; pass --overwrite to replace it", out)
    if out.is_dir():
        raise OutputError("is a folder; give a file name for the answers", out)
    sampling = (sampling or vision.options.sampling).check()
    done = set(answered_ids(partial))
    todo = [j for j in jobs if j.id not in done]
    summary = AskSummary(out, len(jobs), len(jobs) - len(todo), 0, 0, 0, 0.0)
    report = progress or (lambda *_: None)
    report("answering", summary.resumed, len(jobs))
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(partial, "a", encoding="utf-8") as sink, BatchSession(vision, batch) as engine:
            for outcome in engine.run(Request(j.question, j.image, sampling) for j in todo):
                job = todo[outcome.index]
                sink.write(json.dumps(_record(job, outcome), ensure_ascii=False) + "\n")
                sink.flush()
                summary.failed += outcome.error is not None
                summary.answered += outcome.error is None
                summary.generated_tokens += len(outcome.answer.tokens) if outcome.answer else 0
                report("answering", summary.resumed + summary.answered + summary.failed, len(jobs))
        os.replace(partial, out)
    except OSError as exc:
        raise OutputError(f"cannot write the answers: {exc.strerror or exc}", out) from exc
    summary.wall_s = time.perf_counter() - start
    return summary


def _record(job: Job, outcome) -> dict:
    a = outcome.answer
    return {"id": job.id, "image": job.image_text, "question": job.question,
            "answer": a.text if a else None, "finish_reason": a.finish_reason if a else None,
            "tokens": len(a.tokens) if a else 0,
            "error": outcome.error.one_line() if outcome.error is not None else None}


def check_sources(image: Path | None, images: Path | None, batch: Path | None, question: str | None) -> None:
    """Exactly one input: --image (with a question), --images FOLDER (with a question) or --batch FILE."""
    given = [x for x in (image, images, batch) if x is not None]
    if len(given) > 1:
        raise ConfigError("give one of --image, --images or --batch")
    if batch is None and not question:
        raise ConfigError("a QUESTION is needed (except with --batch, whose lines carry their own)")
