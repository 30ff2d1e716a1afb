"""`factedge convert / inspect / ask` as a user meets them: one error line naming the file and the
reason, a typed exit code, and nothing left behind (no output folder, no `.partial`, no temp file).

Commands run in-process through `factedge.edge.cli.run` (what `main()` calls); one test runs the real
entry point in a subprocess. Needs the patched native build; skipped without it.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from factedge.edge.cli import run
from factedge.edge.gguf_header import read_header
from factedge.edge.manifest import read_manifest

FAST = ["--quant", "Q8_0", "--no-verify"]


@pytest.fixture(scope="session", autouse=True)  # before the tiny checkpoints (they need its vocab)
def native(native_tools):
    return native_tools


@dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def error(self) -> str:
        """The one error line (asserting there is exactly one line on stderr)."""
        lines = self.err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("factedge: error: "), self.err
        return lines[0].removeprefix("factedge: error: ")


@pytest.fixture
def factedge(capsys):
    def invoke(*args) -> Result:
        capsys.readouterr()
        code = run([str(a) for a in args])
        out, err = capsys.readouterr()
        return Result(code, out, err)

    return invoke


@pytest.fixture(scope="module")
def bundle(tiny_llava_hf, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "bundle"
    code = run(["convert", str(tiny_llava_hf.root), "--out", str(out), *FAST])
    assert code == 0
    return out


# ---------------------------------------------------------------- success paths
def test_convert_and_inspect_bundle(bundle, factedge):
    manifest = read_manifest(bundle)
    r = factedge("inspect", bundle)
    assert r.code == 0 and r.err == ""
    lines = r.out.splitlines()
    assert lines[0].startswith(f"bundle {bundle}: llava-hf checkpoint, LoRA none, fingerprint {manifest.fingerprint.id}")
    assert "(n_embd 256, image 224 px, 256 tokens/image)" in lines[0]
    for f in manifest.files:
        n = len(read_header(bundle / f.name).tensors)
        row = next(line for line in lines if line.strip().startswith(f.name))
        assert re.search(rf"{f.role}\s+{f.dtype}\s+{f.size / 2**20:.1f} MiB\s+{n} tensors$", row), row
    assert lines[-1] == "pairing: ok"


def test_inspect_single_gguf(bundle, factedge):
    model = bundle / "model-Q8_0.gguf"
    r = factedge("inspect", model)
    assert r.code == 0
    header = read_header(model)
    assert r.out.splitlines()[0] == f"{model}: {len(header.tensors)} tensors, {len(header.metadata)} metadata keys, vocab 32064"
    assert len(header.tensors) == 3 + 9 * 2  # token_embd, output_norm, output + 9 per layer
    assert "  general.architecture = llama" in r.out and "  general.file_type = 7" in r.out
    assert f"  factedge.fingerprint = {read_manifest(bundle).fingerprint.id}" in r.out
    mm = factedge("inspect", bundle / "mmproj-f16.gguf")
    assert "  clip.projector_type = mlp" in mm.out and "  clip.vision.image_size = 224" in mm.out
    # LLaVA's feature layer -2 of 3: the last encoder layer is not stored
    assert "  clip.vision.block_count = 2" in mm.out


def test_convert_refuses_existing_output_before_any_work(bundle, tiny_llava_hf, factedge, monkeypatch):
    import factedge.convert.bundle as bundle_mod

    before = {p.name: p.stat().st_mtime_ns for p in bundle.iterdir()}
    monkeypatch.setattr(bundle_mod, "load_checkpoint", lambda *a, **k: pytest.fail("checkpoint read"))
    r = factedge("convert", tiny_llava_hf.root, "--out", bundle, *FAST)
    assert r.code == 3 and r.error == f"{bundle}: output exists (use --overwrite to replace it)"
    assert {p.name: p.stat().st_mtime_ns for p in bundle.iterdir()} == before


@pytest.mark.slow
def test_verify_json(bundle, tiny_llava_hf, factedge):
    r = factedge("verify", bundle, "--src", tiny_llava_hf.root, "--json")
    report = json.loads(r.out)
    assert r.code == (6 if report["failures"] else 0)
    assert set(report["logits"]) == {"F16", "Q8_0"} and len(report["embeddings"]["f16"]) == 3
    assert min(f["min_cosine"] for f in report["embeddings"]["f16"]) >= 0.999
    assert report["logits"]["F16"]["decided_agreement"] == 1.0 and report["logits"]["F16"]["decided_positions"] > 100


# ---------------------------------------------------------------- bad input
def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_adapter(src: Path, dst: Path, edit) -> Path:
    """A PEFT folder like `src` whose tensors went through `edit(dict) -> dict` (saved as safetensors)."""
    from safetensors.torch import save_file

    dst.mkdir(parents=True)
    shutil.copy(src / "adapter_config.json", dst / "adapter_config.json")
    sd = torch.load(src / "adapter_model.bin", weights_only=True)
    save_file({k: v.contiguous() for k, v in edit(sd).items()}, str(dst / "adapter_model.safetensors"))
    return dst


class _Evil:
    def __reduce__(self):
        return (os.getpid, ())


def _missing_shard(tmp, fx):
    src = _copy(fx("tiny_llava_hf_sharded").root, tmp / "src")
    (src / "model-00002-of-00002.safetensors").unlink()
    return [src], 2, r".*/src/model-00002-of-00002.safetensors: shard named by model.safetensors.index.json is missing"


def _truncated(tmp, fx):
    src = _copy(fx("tiny_llava_hf").root, tmp / "src")
    st = src / "model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    return [src], 2, r".*/src/model.safetensors: truncated: tensor '.+' ends at byte \d+ but only \d+ data bytes present"


def _bad_header(tmp, fx):
    src = _copy(fx("tiny_llava_hf").root, tmp / "src")
    st = src / "model.safetensors"
    raw = bytearray(st.read_bytes())
    raw[8:12] = b"\xff\xfe{x"
    st.write_bytes(bytes(raw))
    return [src], 2, r".*/src/model.safetensors: bad safetensors header: not JSON \(.+\)"


def _huge_header(tmp, fx):
    src = _copy(fx("tiny_llava_hf").root, tmp / "src")
    st = src / "model.safetensors"
    raw = bytearray(st.read_bytes())
    raw[:8] = struct.pack("<Q", 1 << 40)
    st.write_bytes(bytes(raw))
    return [src], 2, r".*/src/model.safetensors: bad safetensors header: length 1099511627776 does not fit a \d+-byte file"


def _unknown_layout(tmp, fx):
    src = tmp / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "model_type": "bert"}))
    return [src], 2, r".*/src/config.json: unknown layout: architectures \['BertModel'\] is neither .*"


def _not_a_checkpoint(tmp, fx):
    src = tmp / "src"
    src.mkdir()
    return [src], 2, r".*/src: unknown layout: looked for config.json and sft_model/config.json"


def _other_base_adapter(tmp, fx):
    rlhf = fx("tiny_llava_rlhf")
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    other = _edit_adapter(rlhf.adapter_dir, tmp / "src" / "other_lora", lambda sd: {**sd, key: torch.zeros(64, 512)})
    return [rlhf.root, "--lora", other], 2, (r".*/other_lora/adapter_model.safetensors: adapter was trained on a "
                                            r"different base: model.layers.0.self_attn.q_proj.weight is \[256, 512\] "
                                            r"in the adapter, \[256, 256\] in the base")


def _nan_adapter(tmp, fx):
    rlhf = fx("tiny_llava_rlhf")
    key = "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"

    def poison(sd):
        bad = sd[key].clone()
        bad[3, 5] = float("nan")
        return {**sd, key: bad}

    other = _edit_adapter(rlhf.adapter_dir, tmp / "src" / "nan_lora", poison)
    return [rlhf.root, "--lora", other], 4, (r".*/nan_lora/adapter_model.safetensors: model.layers.1.mlp.down_proj.weight "
                                             r"is not finite after merging the LoRA \(scale 0.25\)")


def _unsafe_pickle(tmp, fx):
    src = _copy(fx("tiny_llava").root, tmp / "src")  # its config names the CLIP folder by absolute path
    shard = src / "pytorch_model-00002-of-00002.bin"
    sd = torch.load(shard, weights_only=True)
    sd["evil"] = _Evil()
    torch.save(sd, shard)
    return [src], 2, (r".*/src/pytorch_model-00002-of-00002.bin: pickle needs more than tensors to load "
                      r"\(it imports .*getpid.*\); refused, not executed")


BAD_INPUTS = {f.__name__.strip("_"): f for f in (_missing_shard, _truncated, _bad_header, _huge_header, _unknown_layout,
                                                 _not_a_checkpoint, _other_base_adapter, _nan_adapter, _unsafe_pickle)}


def _tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_one_line_nonzero_nothing_left(case, request, tmp_path, factedge):
    args, code, pattern = BAD_INPUTS[case](tmp_path, request.getfixturevalue)
    outs = tmp_path / "outs"
    outs.mkdir()
    before = _tree(tmp_path)
    r = factedge("convert", *args, "--out", outs / "new" / "bundle", *FAST)
    assert r.code == code and r.out == ""
    assert re.fullmatch(pattern, r.error), r.error
    assert _tree(tmp_path) == before  # no output, no parents, no .partial, no temp file beside the sources


def test_unknown_quant_refused_before_any_work(tiny_llava_hf, tmp_path, factedge, monkeypatch):
    import factedge.convert.bundle as bundle_mod

    monkeypatch.setattr(bundle_mod, "load_checkpoint", lambda *a, **k: pytest.fail("checkpoint read"))
    r = factedge("convert", tiny_llava_hf.root, "--out", tmp_path / "out", "--quant", "Q4_K_M,Q9_X", "--no-verify")
    assert r.code == 2 and r.error.startswith("unknown quant type 'Q9_X'; known: Q8_0, Q6_K, Q5_K_M, Q4_K_M")
    r = factedge("convert", tiny_llava_hf.root, "--out", tmp_path / "out", "--mmproj-type", "q4", "--no-verify")
    assert r.code == 2 and r.error.startswith("unknown mmproj type 'q4'")
    assert list(tmp_path.iterdir()) == []


def test_unwritable_output(tiny_llava_hf, tmp_path, factedge, monkeypatch):
    """We run as root (chmod does not stop root): a parent that is a file; os.access saying no."""
    (tmp_path / "afile").write_text("x")
    r = factedge("convert", tiny_llava_hf.root, "--out", tmp_path / "afile" / "bundle", *FAST)
    assert r.code == 3 and r.error == f"{tmp_path / 'afile'}: cannot create the output folder: a parent is a file"
    ro = tmp_path / "ro"
    ro.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **k: False if Path(p) == ro else real(p, mode, **k))
    r = factedge("convert", tiny_llava_hf.root, "--out", ro / "bundle", *FAST)
    assert r.code == 3 and r.error == f"{ro}: output folder is not writable"
    assert _tree(tmp_path) == ["afile", "ro"]


def test_disk_full(tiny_llava_hf, tmp_path, factedge, monkeypatch):
    from gguf import GGUFWriter

    real = GGUFWriter.write_tensor_data
    calls = []

    def write(self, tensor, *a, **k):
        calls.append(1)
        if len(calls) == 30:  # inside the mmproj, after the LM files were written
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, tensor, *a, **k)

    monkeypatch.setattr(GGUFWriter, "write_tensor_data", write)
    r = factedge("convert", tiny_llava_hf.root, "--out", tmp_path / "bundle", *FAST)
    assert r.code == 3 and re.fullmatch(r".*/\.bundle\.partial-\d+-[0-9a-f]{6}/mmproj-f16.gguf: cannot write GGUF: No space left on device", r.error)
    assert list(tmp_path.iterdir()) == []


def test_real_entry_point_exit_code(tiny_llava_hf, tmp_path):
    """`main()` (the console script) exits with the typed code and prints one line, no traceback."""
    cmd = [sys.executable, "-c", "from factedge.edge.cli import main; main()", "convert", str(tiny_llava_hf.root),
           "--out", str(tmp_path / "out"), "--quant", "Q9_X"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("factedge: error: unknown quant type 'Q9_X'") and proc.stderr.count("\n") == 1
    proc = subprocess.run(cmd[:3] + ["inspect", str(tmp_path / "nothing.gguf")], capture_output=True, text=True, timeout=300)
    assert (proc.returncode, proc.stderr) == (2, f"factedge: error: {tmp_path / 'nothing.gguf'}: no such GGUF file\n")


# ---------------------------------------------------------------- ask
@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    from PIL import Image

    yy, xx = np.mgrid[0:300, 0:400]
    rgb = np.stack([xx * 255 // 399, yy * 255 // 299, (xx + yy) % 256], -1).astype(np.uint8)
    path = tmp_path_factory.mktemp("img") / "photo.png"
    Image.fromarray(rgb).save(path)
    return path


def test_ask_json(bundle, image, factedge):
    args = ("ask", "--model", bundle, "--image", image, "--max-tokens", "8", "--threads", "2", "--json",
            "What is in the image?")
    r = factedge(*args)
    assert r.code == 0, r.err
    data = json.loads(r.out)
    assert set(data) == {"answer", "tokens", "finish_reason", "stats"}
    assert isinstance(data["answer"], str) and all(isinstance(t, int) and 0 <= t < 32064 for t in data["tokens"])
    stats = data["stats"]
    assert stats["generated_tokens"] == len(data["tokens"]) <= 8
    assert data["finish_reason"] == ("length" if len(data["tokens"]) == 8 else "stop")
    assert stats["prompt_tokens"] > 256  # 256 image positions + the Vicuna prompt around them
    assert stats["load_s"] > 0 and stats["image_encode_s"] > 0 and stats["prompt_tps"] > 0
    again = json.loads(factedge(*args).out)  # temperature 0: greedy, the same tokens again
    assert again["tokens"] == data["tokens"] and again["answer"] == data["answer"]


def test_ask_stats_line(bundle, image, factedge):
    r = factedge("ask", "--model", bundle, "--image", image, "--max-tokens", "4", "--stats", "Describe it.")
    assert r.code == 0
    assert len(r.out.splitlines()) <= 1  # the answer (the tiny model may say nothing printable)
    assert re.fullmatch(r"load \d+\.\d\d s \| image encode \d+\.\d\d s \| prompt \d+ tok \d+\.\d tok/s \| "
                        r"generation \d tok \d+\.\d tok/s\n", r.err), r.err


def test_ask_bad_image(bundle, tmp_path, factedge):
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image")
    r = factedge("ask", "--model", bundle, "--image", junk, "hi")
    assert r.code == 2 and r.error == f"{junk}: not an image Pillow can read"
