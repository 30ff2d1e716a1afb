"""edge.atomic: a file or folder appears complete or not at all; the previous version survives a failure."""

import pytest

from factedge.edge.errors import OutputError
from factedge.edge.atomic import building_dir, write_json


def test_publishes_only_when_complete(tmp_path):
    out = tmp_path / "model"
    with building_dir(out, "the model folder") as tmp:
        (tmp / "a.txt").write_text("1")
        assert not out.exists()
    assert (out / "a.txt").read_text() == "1"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_failure_keeps_the_old_folder_and_leaves_no_temp(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "a.txt").write_text("old")
    with pytest.raises(OutputError, match="cannot write the adapter"):
        with building_dir(out, "the adapter") as tmp:
            (tmp / "a.txt").write_text("new")
            raise OSError(28, "No space left on device")
    assert (out / "a.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    with pytest.raises(ValueError):
        with building_dir(out, "x") as tmp:
            raise ValueError("boom")
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_write_json_is_all_or_nothing(tmp_path, monkeypatch):
    import json
    import os

    path = tmp_path / "sub" / "a.json"
    write_json(path, {"b": 1, "a": "é"}, sort_keys=True)
    assert path.read_text(encoding="utf-8") == '{\n  "a": "é",\n  "b": 1\n}\n'

    def full(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(OutputError, match="a.json: cannot write: No space left on device"):
        write_json(path, {"new": True})
    assert json.loads(path.read_text()) == {"a": "é", "b": 1}
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.json"]  # no temp file left
