"""The LM quantizer: libllama's `llama_model_quantize` in a child process (convert/quantize_worker.py).

It replaces the `llama-quantize` binary in conversions, so it must give the binary's bytes exactly,
know every quant name the converter offers, and fail with the file and libllama's reason.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from factedge.convert.quantize import quantize_language_model
from factedge.edge.file_types import LM_QUANTS
from factedge.edge.errors import NativeError


@pytest.fixture(scope="module")
def f16_model(make_bundle, tiny_llava_hf) -> Path:
    return make_bundle(tiny_llava_hf, "f16-source", quants=[]) / "model-f16.gguf"


def test_every_offered_quant_name_has_a_libllama_ftype(native_tools):
    from factedge.convert.quantize_worker import ftype_of
    from factedge.edge.native import load_llama_cpp

    llama_cpp = load_llama_cpp()
    values = {name: ftype_of(llama_cpp, name) for name in LM_QUANTS}
    assert values["F32"] == 0 and values["F16"] == 1 and values["Q8_0"] == 7 and values["Q4_K_M"] == 15
    assert len(set(values.values())) == len(LM_QUANTS)  # no two names collapse onto one type
    with pytest.raises(ValueError, match="Q9_Z"):
        ftype_of(llama_cpp, "Q9_Z")


@pytest.mark.parametrize("quant", ["Q4_K_M", "Q8_0", "Q5_K_M"])
def test_worker_writes_the_bytes_llama_quantize_writes(f16_model, tmp_path, quant):
    from factedge.edge.native import build_info, tool

    if not build_info().get("tools", True):
        pytest.skip("llama-quantize not built (FACTEDGE_TOOLS=OFF); scripts/test.sh builds it")
    ours = quantize_language_model(f16_model, tmp_path / "ours.gguf", quant, threads=2)
    theirs = tmp_path / "theirs.gguf"
    proc = subprocess.run([str(tool("llama-quantize")), str(f16_model), str(theirs), quant, "2"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-1000:]
    assert ours.stat().st_size == theirs.stat().st_size > 0
    assert ours.read_bytes() == theirs.read_bytes()


def test_failure_names_the_file_and_libllama_reason_and_leaves_nothing(native_tools, tmp_path):
    bad = tmp_path / "notes.gguf"
    bad.write_text("not a model\n")
    dst = tmp_path / "out" / "model-Q8_0.gguf"
    dst.parent.mkdir()
    with pytest.raises(NativeError, match="quantizing to Q8_0 failed.*failed to load model") as info:
        quantize_language_model(bad, dst, "Q8_0", threads=1)
    assert str(bad) in str(info.value)
    assert list(dst.parent.iterdir()) == []  # neither the output nor its temporary name
