"""Files that were not made for each other are refused: open_bundle / check_files raise MismatchError
naming the file, and `factedge inspect` lists every problem and exits non-zero.

Bundles are made with factedge.convert (torch) and the native llama-quantize; skipped without them.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from factedge.edge.bundle import BundleFiles, check_files, open_bundle
from factedge.edge.cli import run
from factedge.edge.errors import InputError, MismatchError, NativeError
from factedge.edge.gguf_header import read_header
from factedge.edge.manifest import FINGERPRINT_KEY, read_manifest

FAST = {"verify": False, "quants": ["Q8_0"]}


@pytest.fixture(scope="session", autouse=True)  # session: before the tiny checkpoints (they need its vocab)
def native():
    pytest.importorskip("torch")
    from factedge.edge.native import native_dir

    try:
        return native_dir()
    except NativeError as exc:
        pytest.skip(f"native llama.cpp build not available: {exc.reason}")


@pytest.fixture(scope="module")
def make_bundle(tmp_path_factory):
    from factedge.convert.bundle import ConvertOptions, convert_checkpoint

    root = tmp_path_factory.mktemp("pairing")

    def make(name: str, tiny, **extra) -> Path:
        convert_checkpoint(Path(tiny.root), root / name, ConvertOptions(**FAST, **extra))
        return root / name

    return make


@pytest.fixture(scope="module")
def bundle_a(make_bundle, tiny_llava_hf) -> Path:
    return make_bundle("a", tiny_llava_hf)


@pytest.fixture(scope="module")
def bundle_b(make_bundle, tiny_build) -> Path:
    """Same shapes as bundle_a (n_embd, image size, tokens), other weights: only the fingerprint differs."""
    return make_bundle("b", tiny_build("llava-hf", seed=1))


@pytest.fixture(scope="module")
def rlhf_adapter_bundle(make_bundle, tiny_llava_rlhf) -> Path:
    return make_bundle("rlhf", tiny_llava_rlhf, lora_mode="adapter")


def _copy(bundle: Path, dst: Path) -> Path:
    shutil.copytree(bundle, dst)
    return dst


def test_open_bundle_picks_and_checks(bundle_a):
    files = open_bundle(bundle_a)
    assert (files.model.name, files.mmproj.name, files.adapter, files.quant) == ("model-Q8_0.gguf", "mmproj-f16.gguf", None, "Q8_0")
    assert open_bundle(bundle_a, quant="f16").model.name == "model-f16.gguf"
    with pytest.raises(InputError, match=r"bundle has no model Q4_K_M \(it has model:F16, model:Q8_0, mmproj:f16\)"):
        open_bundle(bundle_a, quant="Q4_K_M")
    with pytest.raises(InputError, match="no manifest.json"):
        open_bundle(bundle_a.parent)


def test_same_shapes_other_weights_differ_only_in_fingerprint(bundle_a, bundle_b):
    a, b = read_manifest(bundle_a).fingerprint, read_manifest(bundle_b).fingerprint
    assert (a.n_embd, a.image_size, a.tokens_per_image) == (b.n_embd, b.image_size, b.tokens_per_image)
    assert a.id != b.id
    assert read_header(bundle_b / "mmproj-f16.gguf").metadata[FINGERPRINT_KEY] == b.id


def test_mmproj_of_another_checkpoint_refused(bundle_a, bundle_b, tmp_path):
    foreign = bundle_b / "mmproj-f16.gguf"
    with pytest.raises(MismatchError, match="mmproj was made for another model") as err:
        check_files(BundleFiles(bundle_a / "model-Q8_0.gguf", foreign))
    assert str(foreign) in str(err.value) and "\n" not in str(err.value)
    swapped = _copy(bundle_a, tmp_path / "swapped")
    shutil.copy(foreign, swapped / "mmproj-f16.gguf")
    with pytest.raises(MismatchError, match=r"swapped/mmproj-f16.gguf: mmproj was made for another model"):
        open_bundle(swapped)
    # a model file swapped in is caught against the manifest, even with a matching mmproj beside it
    shutil.copy(bundle_b / "model-Q8_0.gguf", swapped / "model-Q8_0.gguf")
    with pytest.raises(MismatchError, match=r"swapped/model-Q8_0.gguf: model file does not belong to this bundle"):
        open_bundle(swapped)


def test_adapter_of_another_base_refused(bundle_a, rlhf_adapter_bundle):
    adapter = rlhf_adapter_bundle / "adapter-f32.gguf"
    files = open_bundle(rlhf_adapter_bundle)
    assert files.adapter == adapter
    with pytest.raises(MismatchError, match="adapter was made for another model") as err:
        check_files(BundleFiles(bundle_a / "model-Q8_0.gguf", bundle_a / "mmproj-f16.gguf", adapter))
    assert str(adapter) in str(err.value)


def test_adapter_on_a_merged_model_refused(make_bundle, tiny_llava_rlhf, rlhf_adapter_bundle):
    """Merged and adapter bundles of one checkpoint share the base fingerprint (their mmprojs are
    interchangeable), but the adapter on top of the merged LM would apply the LoRA twice."""
    merged = make_bundle("rlhf-merged", tiny_llava_rlhf)
    adapter = rlhf_adapter_bundle / "adapter-f32.gguf"
    check_files(BundleFiles(rlhf_adapter_bundle / "model-Q8_0.gguf", merged / "mmproj-f16.gguf", adapter))
    with pytest.raises(MismatchError, match="adapter-f32.gguf: the model already has its LoRA merged in"):
        check_files(BundleFiles(merged / "model-Q8_0.gguf", merged / "mmproj-f16.gguf", adapter))


def test_unfingerprinted_mmproj_refused(bundle_a, tiny_llava_hf, tmp_path):
    from factedge.convert.layouts import load_checkpoint
    from factedge.convert.mmproj import write_mmproj

    loose = write_mmproj(load_checkpoint(tiny_llava_hf.root), tmp_path / "loose.gguf", ftype="f16")
    with pytest.raises(MismatchError, match="loose.gguf: mmproj carries no factedge.fingerprint"):
        check_files(BundleFiles(bundle_a / "model-Q8_0.gguf", loose))
    with pytest.raises(InputError, match="nope.gguf: file missing"):
        check_files(BundleFiles(bundle_a / "model-Q8_0.gguf", tmp_path / "nope.gguf"))


# ---------------------------------------------------------------- factedge inspect
def _inspect(capsys, *args) -> tuple[int, str, str]:
    code = run(["inspect", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def test_inspect_ok(bundle_a, capsys):
    code, out, err = _inspect(capsys, bundle_a)
    assert code == 0 and err == ""
    assert out.splitlines()[-1] == "pairing: ok"


def test_inspect_reports_swapped_file(bundle_a, bundle_b, tmp_path, capsys):
    swapped = _copy(bundle_a, tmp_path / "swapped")
    shutil.copy(bundle_b / "mmproj-f16.gguf", swapped / "mmproj-f16.gguf")
    code, out, _ = _inspect(capsys, swapped)
    a, b = read_manifest(bundle_a).fingerprint.id, read_manifest(bundle_b).fingerprint.id
    assert code == 1 and "pairing: PROBLEMS" in out
    assert f"  - mmproj-f16.gguf: fingerprint {b} is not the bundle's {a}" in out
    assert "  - mmproj-f16.gguf: sha256 differs from the manifest" in out
    assert "model-Q8_0.gguf:" not in out.split("pairing:")[1]  # the untouched files are not blamed


def test_inspect_reports_modified_truncated_and_missing(bundle_a, tmp_path, capsys):
    bad = _copy(bundle_a, tmp_path / "bad")
    model = bad / "model-Q8_0.gguf"
    raw = bytearray(model.read_bytes())
    raw[-100] ^= 0xFF  # one bit pattern in the tensor data: header intact, hash not
    model.write_bytes(bytes(raw))
    code, out, _ = _inspect(capsys, bad)
    assert code == 1
    assert out.split("pairing: PROBLEMS\n")[1] == "  - model-Q8_0.gguf: sha256 differs from the manifest (file changed or corrupt)\n"
    code, out, _ = _inspect(capsys, bad, "--no-hash")  # headers only: the flipped byte goes unseen
    assert code == 0 and "pairing: ok" in out

    mmproj = bad / "mmproj-f16.gguf"
    mmproj.write_bytes(mmproj.read_bytes()[: mmproj.stat().st_size // 2])
    (bad / "model-f16.gguf").unlink()
    code, out, _ = _inspect(capsys, bad, "--no-hash")
    problems = out.split("pairing: PROBLEMS\n")[1].splitlines()
    assert code == 1 and len(problems) == 2, out
    assert problems[0] == "  - model-f16.gguf: listed in the manifest but missing"
    assert problems[1].startswith("  - mmproj-f16.gguf: truncated GGUF: tensor data ends at byte")
    assert "unreadable" in out  # the file table says so instead of crashing


def test_inspect_single_file_errors(tmp_path, capsys):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"NOTGGUF" * 10)
    code, out, err = _inspect(capsys, junk)
    assert (code, out) == (2, "")
    assert err == f"factedge: error: {junk}: not a GGUF file (bad magic)\n"
    code, _, err = _inspect(capsys, tmp_path / "absent.gguf")
    assert code == 2 and err == f"factedge: error: {tmp_path / 'absent.gguf'}: no such GGUF file\n"
    code, _, err = _inspect(capsys, tmp_path)
    assert code == 2 and err == f"factedge: error: {tmp_path}: not a factedge bundle (no manifest.json)\n"
    (tmp_path / "manifest.json").write_text('"a string"')
    code, _, err = _inspect(capsys, tmp_path)
    assert code == 2 and err.startswith(f"factedge: error: {tmp_path / 'manifest.json'}: not a factedge manifest")


def test_ask_refuses_foreign_mmproj_before_loading(bundle_a, bundle_b, capsys):
    foreign = bundle_b / "mmproj-f16.gguf"
    code = run(["ask", "--model", str(bundle_a / "model-Q8_0.gguf"), "--mmproj", str(foreign), "hi"])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err.startswith(f"factedge: error: {foreign}: mmproj was made for another model") and err.count("\n") == 1


def test_a_damaged_file_is_refused_by_its_sha256_and_verified_once(make_bundle, tiny_llava_hf, tmp_path,
                                                                    monkeypatch):
    import factedge.edge.file_hashes as file_hashes
    from factedge.edge.errors import CorruptFileError

    monkeypatch.setenv("FACTEDGE_CACHE", str(tmp_path / "cache"))
    src = make_bundle("hashed", tiny_llava_hf)
    bundle = tmp_path / "b"
    shutil.copytree(src, bundle)
    hashed = []
    real = file_hashes.sha256_file
    monkeypatch.setattr(file_hashes, "sha256_file", lambda p: hashed.append(Path(p).name) or real(p))
    files = open_bundle(bundle)
    assert sorted(hashed) == sorted(p.name for p in (files.model, files.mmproj))
    open_bundle(bundle)  # unchanged: the cache answers, nothing is hashed again
    assert len(hashed) == 2
    data = bytearray(files.mmproj.read_bytes())
    data[-5] ^= 0x01  # one bit in the tensor data: the header still reads fine
    files.mmproj.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match="differs from the manifest") as info:
        open_bundle(bundle)
    assert info.value.path == files.mmproj
    open_bundle(bundle, verify_hashes=False)  # the escape hatch for a user who edited a file on purpose
