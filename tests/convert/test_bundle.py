"""convert_checkpoint: one bundle per layout, a truthful manifest, every GGUF carrying the fingerprint,
and a failure that leaves nothing behind.

Needs the patched native build; skipped without it.
"""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path

import pytest

from factedge.convert.bundle import ConvertOptions, convert_checkpoint
from factedge.edge.errors import ConfigError, NativeError, OutputError
from factedge.edge.gguf_header import read_header
from factedge.edge.manifest import FINGERPRINT_KEY, LORA_MERGED_KEY, MANIFEST, read_manifest, sha256_file

FAST = {"verify": False, "quants": ["Q8_0"]}

# bundle name -> (fixture, options beyond FAST, layout, image size, LoRA in the manifest)
CASES = {
    "llava-hf": ("tiny_llava_hf", {}, "llava-hf", 224, None),
    "llava-hf-sharded": ("tiny_llava_hf_sharded", {}, "llava-hf", 224, None),
    "llava": ("tiny_llava", {}, "llava", 336, None),
    "llava-linear": ("tiny_llava_linear", {}, "llava", 224, None),
    "llava-rlhf": ("tiny_llava_rlhf", {}, "llava-rlhf", 224, "merged"),
    "llava-rlhf-adapter": ("tiny_llava_rlhf", {"lora_mode": "adapter"}, "llava-rlhf", 224, "adapter"),
}


@pytest.fixture(scope="session", autouse=True)  # before the tiny checkpoints (they need its vocab)
def native(native_tools):
    return native_tools


@pytest.fixture(scope="module")
def bundles(request, tmp_path_factory, native):
    """Bundles built on first use, shared by the tests of this module."""
    built: dict[str, tuple[Path, Path]] = {}
    root = tmp_path_factory.mktemp("bundles")

    def get(name: str) -> tuple[Path, Path]:
        """(checkpoint model folder, bundle folder)"""
        if name not in built:
            tiny = request.getfixturevalue(CASES[name][0])
            out = root / name
            convert_checkpoint(Path(tiny.root), out, ConvertOptions(**FAST, **CASES[name][1]))
            built[name] = (Path(tiny.model_dir), out)
        return built[name]

    return get


def _field(path: Path, key: str):
    return read_header(path).metadata[key]


def _types(path: Path) -> dict[str, str]:
    from gguf import GGMLQuantizationType

    return {t.name: GGMLQuantizationType(t.ggml_type).name for t in read_header(path).tensors}


@pytest.mark.parametrize("name", list(CASES))
def test_bundle_per_layout(bundles, name):
    model_dir, out = bundles(name)
    _, extra, layout, image_size, lora = CASES[name]
    manifest = read_manifest(out)
    # the folder holds exactly the listed files, the manifest and the card: no temp or partial files
    listed = {f.name for f in manifest.files}
    assert sorted(os.listdir(out)) == sorted(listed | {MANIFEST, "README.md"})
    assert not out.with_name(out.name + ".partial").exists()
    for f in manifest.files:
        path = out / f.name
        assert (f.size, f.sha256) == (path.stat().st_size, sha256_file(path)), f.name
    roles = sorted((f.role, f.dtype) for f in manifest.files)
    want = [("mmproj", "f16"), ("model", "F16"), ("model", "Q8_0")]
    if extra.get("lora_mode") == "adapter":
        want.insert(0, ("adapter", "f32"))
    assert roles == want
    fp = manifest.fingerprint
    assert (fp.n_embd, fp.image_size, fp.tokens_per_image) == (256, image_size, (image_size // 14) ** 2)
    assert re.fullmatch(r"[0-9a-f]{16}", fp.id) and re.fullmatch(r"[0-9a-f]{64}", fp.base_weights_sha256)
    for f in manifest.files:
        meta = read_header(out / f.name).metadata
        assert meta[FINGERPRINT_KEY] == fp.id, f.name
        # only LM files with the LoRA merged in say so (an adapter on top of them would add it twice)
        assert meta.get(LORA_MERGED_KEY) == (True if lora == "merged" and f.role == "model" else None), f.name
    # the quantized file really is Q8_0 (2-D weights), norms stay F32
    types = _types(out / "model-Q8_0.gguf")
    assert types["blk.0.attn_q.weight"] == "Q8_0" and types["blk.0.attn_norm.weight"] == "F32"
    assert _field(out / "model-Q8_0.gguf", "general.file_type") == 7  # LLAMA_FTYPE_MOSTLY_Q8_0
    assert (manifest.source["layout"], manifest.lora) == (layout, lora)
    hashes = manifest.source["files"]
    assert hashes[str(model_dir / "config.json")] == sha256_file(model_dir / "config.json")
    assert all(Path(p).is_file() for p in hashes) and any(".safetensors" in p or ".bin" in p for p in hashes)
    assert manifest.options["quants"] == ["Q8_0"] and "verify" not in manifest.options
    card = (out / "README.md").read_text()
    assert all(f"`{f.name}`" in card for f in manifest.files) and fp.id in card
    assert "Not verified" in card


def test_fingerprint_ties_base_weights(bundles, tiny_build, tmp_path):
    """Same base -> same fingerprint (merged or adapter); another checkpoint -> another one."""
    merged, adapter = read_manifest(bundles("llava-rlhf")[1]), read_manifest(bundles("llava-rlhf-adapter")[1])
    assert merged.fingerprint == adapter.fingerprint
    by_name = {f.name: f.sha256 for f in merged.files}
    assert by_name["mmproj-f16.gguf"] == {f.name: f.sha256 for f in adapter.files}["mmproj-f16.gguf"]
    assert by_name["model-f16.gguf"] != {f.name: f.sha256 for f in adapter.files}["model-f16.gguf"]  # LoRA merged in
    hf = read_manifest(bundles("llava-hf")[1])
    other = convert_checkpoint(Path(tiny_build("llava-hf", seed=1).root), tmp_path / "seed1", ConvertOptions(**FAST))
    assert other.fingerprint.id != hf.fingerprint.id
    assert (other.fingerprint.n_embd, other.fingerprint.image_size) == (hf.fingerprint.n_embd, hf.fingerprint.image_size)


def test_conversion_is_deterministic(bundles, tmp_path):
    model_dir, out = bundles("llava-linear")
    again = convert_checkpoint(model_dir, tmp_path / "again", ConvertOptions(**FAST))
    first = read_manifest(out)
    assert [(f.name, f.sha256) for f in again.files] == [(f.name, f.sha256) for f in first.files]
    assert again.fingerprint == first.fingerprint


def test_verify_fills_fidelity_and_card(tiny_llava_hf, native, tmp_path):
    pytest.importorskip("transformers")
    out = tmp_path / "verified"
    manifest = convert_checkpoint(Path(tiny_llava_hf.root), out, ConvertOptions(verify=True, quants=["Q8_0"]))
    fid = read_manifest(out).fidelity
    assert fid == manifest.fidelity
    cosines = [f["min_cosine"] for f in fid["embeddings"]["f16"]]
    assert len(cosines) == 3 and min(cosines) >= 0.999
    assert set(fid["logits"]) == {"F16", "Q8_0"}
    f16 = fid["logits"]["F16"]
    # near-ties of the random weights flip with the machine's kernels: assert the decided positions
    assert f16["decided_agreement"] == 1.0 and f16["decided_positions"] > 100 and f16["mean_kl"] < 1e-3
    # tiny random weights give flat next-token distributions, so Q8_0's top-1 may fall below the
    # 0.99 promise: then it is listed as a failure (and the card says so) rather than hidden
    q8 = fid["logits"]["Q8_0"]
    assert 0.5 < q8["top1_agreement"] <= 1.0
    assert all(f.startswith("LM Q8_0") for f in fid["failures"])
    card = (out / "README.md").read_text()
    assert f"| mmproj f16 | image embeddings, min per-token cosine vs PyTorch | {min(cosines):.6f} |" in card
    for dtype, f in fid["logits"].items():
        assert f"| model {dtype} | top-1 agreement / mean KL after an image prompt | " \
               f"{f['top1_agreement'] * 100:.2f}% / {f['mean_kl']:.2e} |" in card
        assert f"{f['greedy_common']} of {len(f['greedy_ref'])} tokens" in card
        assert f"{f['decided_agreement'] * 100:.2f}% of {f['decided_positions']} positions" in card
    verdict = "All promised thresholds met." if not fid["failures"] else "Below threshold: " + "; ".join(fid["failures"])
    assert verdict in card and "Not verified" not in card


# ---------------------------------------------------------------- refusals and clean failure
def _entries(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


def test_unknown_quant_refused_before_any_work(tiny_llava_hf, tmp_path, monkeypatch):
    import factedge.convert.bundle as bundle

    monkeypatch.setattr(bundle, "load_checkpoint", lambda *a, **k: pytest.fail("checkpoint read"))
    for bad in ({"quants": ["Q9_X"]}, {"mmproj_types": ["q4_0"]}, {"base_type": "f8"}, {"lora_mode": "fuse"}):
        with pytest.raises(ConfigError):
            convert_checkpoint(Path(tiny_llava_hf.root), tmp_path / "out", ConvertOptions(**{**FAST, **bad}))
    assert _entries(tmp_path) == []
    # a batch file's "Q4_K_M, q8_0" string is split and normalised
    assert ConvertOptions(quants="Q4_K_M, q8_0").validated().quants == ["Q4_K_M", "Q8_0"]


def test_existing_output_refused_before_any_work(tiny_llava_hf, tmp_path, monkeypatch):
    import factedge.convert.bundle as bundle

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    monkeypatch.setattr(bundle, "load_checkpoint", lambda *a, **k: pytest.fail("checkpoint read"))
    with pytest.raises(OutputError, match="output exists .*--overwrite"):
        convert_checkpoint(Path(tiny_llava_hf.root), out, ConvertOptions(**FAST))
    # --overwrite never deletes a folder that is not a bundle
    with pytest.raises(OutputError, match="holds 'keep.txt', which factedge did not write"):
        convert_checkpoint(Path(tiny_llava_hf.root), out, ConvertOptions(**FAST, overwrite=True))
    with pytest.raises(OutputError, match="is a file"):
        convert_checkpoint(Path(tiny_llava_hf.root), out / "keep.txt", ConvertOptions(**FAST))
    assert _entries(tmp_path) == ["out"] and _entries(out) == ["keep.txt"]


def test_disk_full_mid_write_leaves_nothing_and_keeps_old_bundle(bundles, tmp_path, monkeypatch):
    """ENOSPC while streaming a GGUF (and again when the writer closes): OutputError, no temp files,
    no new parents; with --overwrite the previous bundle is untouched."""
    from gguf import GGUFWriter

    src, _ = bundles("llava-hf")
    calls = {"n": 0}
    real_write, real_close = GGUFWriter.write_tensor_data, GGUFWriter.close

    def write(self, tensor, *a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(self, tensor, *a, **k)

    def close(self):
        if calls["n"] >= 5 and self.fout:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # buffered bytes cannot be flushed either
        return real_close(self)

    monkeypatch.setattr(GGUFWriter, "write_tensor_data", write)
    monkeypatch.setattr(GGUFWriter, "close", close)
    with pytest.raises(OutputError, match=r"model-f16.gguf: cannot write GGUF: No space left on device") as err:
        convert_checkpoint(src, tmp_path / "new" / "deeper" / "out", ConvertOptions(**FAST))
    assert "\n" not in str(err.value)
    assert _entries(tmp_path) == []  # neither out, out.partial, temp files nor the parents it created

    monkeypatch.undo()
    old = tmp_path / "old"
    convert_checkpoint(src, old, ConvertOptions(**FAST))
    before = {p.name: sha256_file(p) for p in old.iterdir()}
    calls["n"] = 0
    monkeypatch.setattr(GGUFWriter, "write_tensor_data", write)
    with pytest.raises(OutputError, match="No space left"):
        convert_checkpoint(src, old, ConvertOptions(**FAST, overwrite=True))
    assert {p.name: sha256_file(p) for p in old.iterdir()} == before
    assert _entries(tmp_path) == ["old"]


def test_manifest_write_failure_leaves_nothing(bundles, tmp_path, monkeypatch):
    src, _ = bundles("llava-hf")
    real = Path.write_bytes

    def write_bytes(self, data):
        if self.name.startswith(f".{MANIFEST}.tmp-"):  # edge.atomic's temp name for the manifest
            real(self, b"{")  # a partial write, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", write_bytes)
    with pytest.raises(OutputError, match=r"manifest.json: cannot write: No space left on device"):
        convert_checkpoint(src, tmp_path / "out", ConvertOptions(**FAST))
    assert _entries(tmp_path) == []


def test_unwritable_output_refused_before_any_work(tiny_llava_hf, tmp_path, monkeypatch):
    """We run as root, so chmod does not stop writes: a parent that is a file, and os.access saying no."""
    import factedge.convert.bundle as bundle

    monkeypatch.setattr(bundle, "load_checkpoint", lambda *a, **k: pytest.fail("checkpoint read"))
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OutputError, match=r"afile: cannot create the output folder: a parent is a file"):
        convert_checkpoint(Path(tiny_llava_hf.root), tmp_path / "afile" / "sub" / "out", ConvertOptions(**FAST))
    ro = tmp_path / "ro"
    ro.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **k: False if Path(p) == ro else real(p, mode, **k))
    with pytest.raises(OutputError, match=r"ro: output folder is not writable"):
        convert_checkpoint(Path(tiny_llava_hf.root), ro / "out", ConvertOptions(**FAST))
    assert _entries(tmp_path) == ["afile", "ro"] and _entries(ro) == []


def test_missing_native_build_refused_before_any_work(tiny_llava_hf, tmp_path, monkeypatch):
    import factedge.convert.bundle as bundle

    def missing():
        raise NativeError("patched llama.cpp libraries not found", tmp_path / "lib")

    monkeypatch.setattr(bundle, "native_dir", missing)
    monkeypatch.setattr(bundle, "load_checkpoint", lambda *a, **k: pytest.fail("checkpoint read"))
    with pytest.raises(NativeError, match="libraries not found"):
        convert_checkpoint(Path(tiny_llava_hf.root), tmp_path / "out", ConvertOptions(**FAST))
    assert _entries(tmp_path) == []


def test_folders_beside_the_output_are_never_touched(tiny_llava_hf, tmp_path):
    """`<out>.old/` and `<out>.partial/` are names a user may have: factedge stages under fresh names."""
    out = tmp_path / "b"
    for name in ("b.old", "b.partial"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "mine.txt").write_text("the user's")
    convert_checkpoint(Path(tiny_llava_hf.root), out, ConvertOptions(**FAST))
    convert_checkpoint(Path(tiny_llava_hf.root), out, ConvertOptions(**FAST, overwrite=True))
    assert _entries(tmp_path) == ["b", "b.old", "b.partial"]
    assert all((tmp_path / n / "mine.txt").read_text() == "the user's" for n in ("b.old", "b.partial"))


def test_overwrite_refuses_a_bundle_the_user_added_files_to(tiny_llava_hf, tmp_path):
    out = tmp_path / "b"
    convert_checkpoint(Path(tiny_llava_hf.root), out, ConvertOptions(**FAST))
    (out / "notes.md").write_text("my notes")
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(OutputError, match="holds 'notes.md', which factedge did not write"):
        convert_checkpoint(Path(tiny_llava_hf.root), out, ConvertOptions(**FAST, overwrite=True))
    assert sorted(p.name for p in out.iterdir()) == before and (out / "notes.md").read_text() == "my notes"
    assert _entries(tmp_path) == ["b"]


def test_sigterm_while_quantizing_stops_the_worker_and_leaves_nothing(tiny_llava_hf, tmp_path):
    """A real `factedge convert` process gets SIGTERM while its quantize worker runs: it exits 143,
    the worker is gone, and no staging folder or output is left."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "b"
    script = tmp_path / "run.py"  # factedge convert, with a quantize worker that only sleeps
    script.write_text(
        "import os, sys\n"
        "import factedge.convert.quantize as q\n"
        "sleeper = 'import os, time; open(os.environ[\"PIDFILE\"], \"w\").write(str(os.getpid())); time.sleep(60)'\n"
        "q.quantize_command = lambda *a, **k: [sys.executable, '-c', sleeper]\n"
        "from factedge.edge.cli import main\n"
        "sys.argv[0] = 'factedge'\n"
        "main()\n")
    code = str(script)
    env = {**os.environ, "PIDFILE": str(tmp_path / "worker.pid")}
    proc = subprocess.Popen([sys.executable, code, "convert", str(tiny_llava_hf.root), "--out", str(out),
                             "--no-verify", "--quant", "Q8_0", "--base-type", "f32"], env=env,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (tmp_path / "worker.pid").exists() and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(0.3)
    worker = int((tmp_path / "worker.pid").read_text())
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 143, proc.stderr.read()
    time.sleep(0.2)
    with pytest.raises(ProcessLookupError):
        os.kill(worker, 0)
    assert _entries(tmp_path) == ["run.py", "worker.pid"]
