"""building_dir: a folder appears complete or not at all; the previous version survives a failure."""

import pytest

from factedge.edge.errors import OutputError
from factedge.train.atomic_dir import building_dir


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
