"""`factedge ask --images / --batch`: many questions into a JSONL of answers, the serial answers token
for token, a bad job failing alone, an interrupted run resumed, and nothing overwritten unasked.

Needs the patched native build; skipped without it.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from factedge.edge.errors import ConfigError, InputError, OutputError

MAX_TOKENS = 8  # rlhf_vision's default (tests/edge/conftest.py)
Q = "What is in the image?"


@pytest.fixture(scope="session", autouse=True)
def native(native_tools):
    return native_tools


@pytest.fixture(scope="module")
def bundle(make_bundle, tiny_llava_rlhf):
    return make_bundle(tiny_llava_rlhf, name="tiny-rlhf")


@pytest.fixture(scope="module")
def vision(rlhf_vision):
    return rlhf_vision


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("imgs")
    for i, name in enumerate(["b.png", "a.JPG", "c.webp"]):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (30, 50, 3), dtype=np.uint8)).save(out / name)
    (out / "notes.txt").write_text("not an image")
    return out


def _lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_folder_answers_are_the_serial_ones(vision, folder, tmp_path):
    from factedge.edge.ask_many import answer_jobs, jobs_from_folder
    from factedge.edge.batch import BatchOptions

    jobs = jobs_from_folder(folder, Q)
    assert [j.id for j in jobs] == ["a.JPG", "b.png", "c.webp"]
    seen = []
    s = answer_jobs(vision, jobs, tmp_path / "out.jsonl", batch=BatchOptions(parallel=2, seq_ctx=400),
                    progress=lambda step, done, total: seen.append((done, total)))
    assert (s.total, s.answered, s.failed, s.resumed) == (3, 3, 0, 0) and seen[-1] == (3, 3)
    got = {r["id"]: r for r in _lines(tmp_path / "out.jsonl")}
    for j in jobs:
        ref = vision.ask(Q, j.image)
        assert got[j.id]["answer"] == ref.text and got[j.id]["tokens"] == len(ref.tokens) == MAX_TOKENS
        assert got[j.id]["error"] is None and got[j.id]["question"] == Q
    assert not (tmp_path / "out.jsonl.partial").exists()


def test_batch_file_bad_job_fails_alone_and_resume_skips_done(vision, folder, tmp_path):
    from factedge.edge.ask_many import answer_jobs, jobs_from_jsonl, partial_path
    from factedge.edge.batch import BatchOptions

    batch = tmp_path / "jobs.jsonl"
    rows = [{"image": str(folder / "a.JPG"), "question": "Colour?", "id": "x1"},
            {"image": "missing.png"},  # relative to the file; no question: the default one
            {"question": "No image at all?", "id": 7},
            {"image": str(folder / "b.png"), "question": "Shape?"}]
    batch.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    jobs = jobs_from_jsonl(batch, Q)
    assert [j.id for j in jobs] == ["x1", "2", "7", "4"] and jobs[1].image == tmp_path / "missing.png"
    out = tmp_path / "answers.jsonl"
    earlier = {"id": "x1", "answer": "from an earlier run", "error": None}
    partial_path(out).write_text(json.dumps(earlier) + "\n" + '{"id": "7", "answ')  # killed mid-line
    s = answer_jobs(vision, jobs, out, batch=BatchOptions(parallel=3, seq_ctx=400))
    assert (s.resumed, s.answered, s.failed) == (1, 2, 1)
    got = {r["id"]: r for r in _lines(out)}
    assert set(got) == {"x1", "2", "7", "4"} and got["x1"] == earlier
    assert "missing.png" in got["2"]["error"] and got["2"]["answer"] is None
    assert got["7"]["answer"] == vision.ask("No image at all?").text
    assert got["4"]["answer"] == vision.ask("Shape?", folder / "b.png").text


def test_existing_output_is_not_replaced_unasked(vision, folder, tmp_path):
    from factedge.edge.ask_many import answer_jobs, jobs_from_folder

    out = tmp_path / "out.jsonl"
    out.write_text("mine\n")
    with pytest.raises(OutputError, match="--overwrite"):
        answer_jobs(vision, jobs_from_folder(folder, Q), out)
    assert out.read_text() == "mine\n" and list(tmp_path.iterdir()) == [out]
    answer_jobs(vision, jobs_from_folder(folder, Q), out, overwrite=True)
    assert len(_lines(out)) == 3


@pytest.mark.parametrize("text, problem", [('{"image": "a.png"', "line 1 is not JSON"),
                                           ('["a.png"]', "not a JSON object"),
                                           ('{"image": "a.png"}', "no question"),
                                           ('{"image": 3, "question": "q"}', "path string"),
                                           ('{"question": "q", "id": "a"}\n{"question": "r", "id": "a"}', "used twice"),
                                           ("\n\n", "no jobs")])
def test_bad_batch_files_name_the_line(tmp_path, text, problem):
    from factedge.edge.ask_many import jobs_from_jsonl

    path = tmp_path / "jobs.jsonl"
    path.write_text(text)
    with pytest.raises(InputError, match=problem) as err:
        jobs_from_jsonl(path)
    assert str(path) in str(err.value)


def test_cli(bundle, folder, tmp_path, capsys):
    from factedge.edge.cli import run

    out = tmp_path / "o.jsonl"
    base = ["ask", Q, "--model", str(bundle), "--max-tokens", str(MAX_TOKENS), "--threads", "1"]
    assert run(base + ["--images", str(folder), "--out", str(out), "--parallel", "2", "--seq-ctx", "400"]) == 0
    assert len(_lines(out)) == 3 and "3 answered, 0 failed" in capsys.readouterr().err
    assert run(base + ["--images", str(folder), "--out", str(out)]) == 3  # exists, no --overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert run(base + ["--images", str(folder), "--image", str(folder / "a.JPG"), "--out", str(out)]) == 2
    assert run(base + ["--images", str(folder)]) == 2  # no --out
    assert run(base + ["--images", str(folder), "--out", str(out), "--parallel", "0"]) == 2
    bad = tmp_path / "jobs.jsonl"
    bad.write_text('{"image": "missing.png", "question": "q"}\n')
    assert run(base + ["--batch", str(bad), "--out", str(tmp_path / "b.jsonl")]) == 1  # the job failed
    assert "1 failed" in capsys.readouterr().err and len(_lines(tmp_path / "b.jsonl")) == 1


def test_sources_are_checked():
    from factedge.edge.ask_many import check_sources

    with pytest.raises(ConfigError):
        check_sources(None, None, None, None)
    with pytest.raises(ConfigError):
        check_sources(None, None, None, "")
    check_sources(None, None, __file__, None)
