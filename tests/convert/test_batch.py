"""`factedge convert --batch`: every entry attempted, failures summarised, exit non-zero; a rerun
skips up-to-date bundles and re-converts when a source file or an option changed.

Needs the patched native build (llama-quantize); skipped without it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from factedge.convert.batch import read_batch, run_batch, up_to_date
from factedge.edge.cli import run
from factedge.edge.errors import ConfigError, InputError
from factedge.edge.manifest import MANIFEST, read_manifest, sha256_file


@pytest.fixture(scope="session", autouse=True)  # before the tiny checkpoints (they need its vocab)
def native(native_tools):
    return native_tools


@pytest.fixture
def workspace(tmp_path, tiny_llava_hf, tiny_llava_linear) -> Path:
    """ckpt/hf: a copy we may edit; the linear LLaVA is used in place (by absolute path)."""
    shutil.copytree(tiny_llava_hf.root, tmp_path / "ckpt" / "hf")
    (tmp_path / "linear.txt").write_text(str(tiny_llava_linear.root))
    return tmp_path


TOML = """
[defaults]
quants = ["Q8_0"]
verify = false

[[checkpoint]]
src = "ckpt/hf"
out = "gguf/hf"

[[checkpoint]]
src = "ckpt/missing"
out = "gguf/missing"

[[checkpoint]]
src = "{linear}"
out = "gguf/linear"
mmproj_types = ["f32"]
"""

YAML = """
defaults:
  quants: Q8_0
  verify: false
checkpoint:
  - {{src: ckpt/hf, out: gguf/hf}}
  - {{src: {linear}, out: gguf/linear, base_type: f32}}
  - {{src: ckpt/hf, out: gguf/hf-adapter, lora: ckpt/no-such-lora}}
"""


def _batch(cli_capsys, path: Path) -> tuple[int, str, str]:
    code = run(["convert", "--batch", str(path)])
    out, err = cli_capsys.readouterr()
    return code, out, err


def _status(err: str) -> dict[str, str]:
    """checkpoint folder name -> status, from the per-entry lines on stderr."""
    rows = [line.split() for line in err.splitlines() if line.strip().split(" ")[0] in ("converted", "skipped", "failed")]
    return {Path(r[1]).name: r[0] for r in rows}


def _stamps(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def test_toml_batch_attempts_all_reports_failure_and_reruns(workspace, capsys):
    linear = workspace.joinpath("linear.txt").read_text()
    batch = workspace / "batch.toml"
    batch.write_text(TOML.format(linear=linear))
    gguf = workspace / "gguf"

    code, out, err = _batch(capsys, batch)
    assert code == 1
    assert _status(err) == {"hf": "converted", "missing": "failed", Path(linear).name: "converted"}
    assert "2 converted, 0 skipped, 1 failed" in out and "batch summary" in out
    assert f"factedge: error: {workspace / 'ckpt' / 'missing'}: checkpoint folder missing" in err.splitlines()
    assert sorted(p.name for p in gguf.iterdir()) == ["hf", "linear"]  # nothing for the failed entry, no .partial
    assert [f.name for f in read_manifest(gguf / "linear").files] == ["model-f16.gguf", "model-Q8_0.gguf", "mmproj-f32.gguf"]
    hf_before, linear_before = _stamps(gguf / "hf"), _stamps(gguf / "linear")
    fp_before = read_manifest(gguf / "hf").fingerprint.id

    code, out, err = _batch(capsys, batch)  # nothing changed: both skipped, untouched
    assert code == 1 and "0 converted, 2 skipped, 1 failed" in out
    assert _status(err) == {"hf": "skipped", "missing": "failed", Path(linear).name: "skipped"}
    assert (_stamps(gguf / "hf"), _stamps(gguf / "linear")) == (hf_before, linear_before)

    cfg = workspace / "ckpt" / "hf" / "config.json"  # same content, other bytes: a changed source file
    cfg.write_text(json.dumps(json.loads(cfg.read_text()), indent=4))
    code, out, err = _batch(capsys, batch)
    assert code == 1 and "1 converted, 1 skipped, 1 failed" in out
    assert _status(err) == {"hf": "converted", "missing": "failed", Path(linear).name: "skipped"}
    manifest = read_manifest(gguf / "hf")
    assert manifest.source["files"][str(cfg)] == sha256_file(cfg) and manifest.fingerprint.id != fp_before
    assert _stamps(gguf / "linear") == linear_before
    assert sorted(p.name for p in gguf.iterdir()) == ["hf", "linear"]


def test_yaml_batch_through_the_library(workspace):
    linear = workspace.joinpath("linear.txt").read_text()
    batch = workspace / "batch.yaml"
    batch.write_text(YAML.format(linear=linear))
    entries = read_batch(batch)
    assert [e.out for e in entries] == [workspace / "gguf" / n for n in ("hf", "linear", "hf-adapter")]
    assert entries[0].options.quants == ["Q8_0"] and entries[1].options.base_type == "f32"
    assert entries[2].options.lora == workspace / "ckpt" / "no-such-lora"  # paths relative to the batch file

    seen = []
    results = run_batch(entries, on_result=seen.append)
    assert seen == results and [r.status for r in results] == ["converted", "converted", "failed"]
    assert results[2].error == f"{workspace / 'ckpt' / 'no-such-lora' / 'adapter_config.json'}: LoRA adapter folder has no adapter_config.json"
    assert [f.dtype for f in read_manifest(workspace / "gguf" / "linear").files if f.role == "model"] == ["F32", "Q8_0"]
    assert all(r.seconds > 0 for r in results)

    again = run_batch(read_batch(batch))
    assert [r.status for r in again] == ["skipped", "skipped", "failed"]
    # an option that changes the output makes the entry stale; one that does not (verify) does not
    entries = read_batch(batch)
    entries[0].options.quants = ["Q8_0", "Q4_0"]
    entries[1].options.verify = True
    assert (up_to_date(entries[0]), up_to_date(entries[1])) == (False, True)
    results = run_batch(entries[:1])
    assert results[0].status == "converted"
    assert [f.dtype for f in read_manifest(workspace / "gguf" / "hf").files if f.role == "model"] == ["F16", "Q8_0", "Q4_0"]


def test_a_bundle_whose_files_changed_is_stale(workspace):
    linear = workspace.joinpath("linear.txt").read_text()
    batch = workspace / "batch.yaml"
    batch.write_text(YAML.format(linear=linear))
    entry = read_batch(batch)[0]
    assert run_batch([entry])[0].status == "converted" and up_to_date(entry)
    (entry.out / MANIFEST).write_text("{not json")
    assert not up_to_date(entry)  # an unreadable manifest is re-converted, not trusted


@pytest.mark.parametrize("text, message", [
    ('[[checkpoint]]\nsrc = "a"\nout = "b"\nquant = "Q8_0"\n', r"checkpoint #1: unknown option\(s\) quant"),
    ('[[checkpoint]]\nsrc = "a"\nout = "b"\n[[checkpoint]]\nsrc = "c"\nout = "d"\nquants = ["Q9"]\n', r"unknown quant type 'Q9'"),
    ('[[checkpoint]]\nsrc = "a"\n', r"checkpoint #1 needs `src` and `out`"),
    ("[defaults]\nverify = false\n", r"a batch file needs a non-empty list `checkpoint`"),
    ("[[checkpoint]\n", r"not valid TOML: "),
])
def test_bad_batch_file_refused_before_any_work(tmp_path, text, message, capsys):
    batch = tmp_path / "batch.toml"
    batch.write_text(text)
    with pytest.raises(ConfigError, match=message) as err:
        read_batch(batch)
    assert err.value.path == batch
    code = run(["convert", "--batch", str(batch)])
    _, stderr = capsys.readouterr()
    assert code == 2 and stderr.startswith(f"factedge: error: {batch}: ") and stderr.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["batch.toml"]


def test_missing_batch_file(tmp_path):
    with pytest.raises(InputError, match="cannot read batch file"):
        read_batch(tmp_path / "nope.yaml")
