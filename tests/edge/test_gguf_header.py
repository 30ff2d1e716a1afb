"""gguf_header reads what gguf-py's GGUFReader reads (metadata, tensor table), and refuses
truncated or foreign files with a typed error instead of crashing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from factedge.edge.errors import CorruptFileError, InputError
from factedge.edge.gguf_header import ArrayInfo, read_header
from factedge.edge.inspect import describe_gguf


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> Path:
    """A GGUF with every value type llama.cpp files use, a float and a Q8_0 tensor, odd alignment."""
    from gguf import GGMLQuantizationType, GGUFValueType, GGUFWriter
    from gguf.quants import quantize

    path = tmp_path_factory.mktemp("gguf") / "sample.gguf"
    w = GGUFWriter(path, "llama")
    w.add_uint32("general.alignment", 64)
    w.add_name("sample")
    w.add_key_value("t.u8", 200, GGUFValueType.UINT8)
    w.add_key_value("t.i8", -5, GGUFValueType.INT8)
    w.add_key_value("t.u16", 60000, GGUFValueType.UINT16)
    w.add_key_value("t.i16", -300, GGUFValueType.INT16)
    w.add_key_value("t.i32", -70000, GGUFValueType.INT32)
    w.add_key_value("t.u64", 2**40, GGUFValueType.UINT64)
    w.add_key_value("t.i64", -(2**40), GGUFValueType.INT64)
    w.add_key_value("t.f64", 0.125, GGUFValueType.FLOAT64)
    w.add_float32("t.f32", 1.5)
    w.add_bool("t.bool", True)
    w.add_string("factedge.fingerprint", "0123456789abcdef")
    w.add_array("tokenizer.ggml.tokens", ["<unk>", "héllo", "", "▁x"] * 50)
    w.add_array("t.floats", [0.5, 1.5, 2.5])
    rng = np.random.default_rng(0)
    w.add_tensor("a.weight", rng.standard_normal((3, 5)).astype(np.float32))
    q = rng.standard_normal((4, 64)).astype(np.float32)
    w.add_tensor("b.weight", quantize(q, GGMLQuantizationType.Q8_0), raw_dtype=GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_same_as_gguf_reader(sample):
    from gguf import GGUFReader

    h, r = read_header(sample), GGUFReader(sample)
    fields = {k: f for k, f in r.fields.items() if not k.startswith("GGUF.")}
    assert set(h.metadata) == set(fields)
    for key, f in fields.items():
        mine = h.metadata[key]
        if isinstance(mine, ArrayInfo):
            assert mine.count == len(f.data), key
        else:
            want = f.contents()
            assert mine == pytest.approx(want) if isinstance(want, float) else mine == want, key
    assert h.metadata["t.u64"] == 2**40 and h.metadata["t.i8"] == -5 and h.metadata["t.bool"] is True
    assert [(t.name, t.shape, t.ggml_type, t.nbytes) for t in h.tensors] == \
           [(t.name, tuple(int(d) for d in t.shape), int(t.tensor_type), int(t.n_bytes)) for t in r.tensors]
    assert [h.data_offset + t.offset for t in h.tensors] == [int(t.data_offset) for t in r.tensors]
    assert h.data_offset % 64 == 0 and h.tensors[1].nbytes == 4 * 2 * 34  # two Q8_0 blocks of 34 bytes per row
    summary = describe_gguf(sample)
    assert (summary.tensors, summary.vocab_size, summary.fingerprint) == (2, 200, "0123456789abcdef")


@pytest.mark.parametrize("cut", [3, 20, 200, -100])  # magic, counts, metadata, tensor data
def test_truncated_is_corrupt(sample, tmp_path, cut):
    raw = sample.read_bytes()
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(raw[:cut])
    with pytest.raises(CorruptFileError, match="cut.gguf: .*(truncated|bad magic)") as err:
        read_header(bad)
    assert "\n" not in str(err.value)


def test_foreign_files(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"GGUF" + (1).to_bytes(4, "little") + bytes(16))
    with pytest.raises(CorruptFileError, match="GGUF version 1 is not supported"):
        read_header(tmp_path / "x.gguf")
    (tmp_path / "y.gguf").write_bytes(b"GGUF" + (3).to_bytes(4, "little") + (2**60).to_bytes(8, "little") + bytes(8))
    with pytest.raises(CorruptFileError, match="header claims"):
        read_header(tmp_path / "y.gguf")
    with pytest.raises(InputError, match="no such GGUF file"):
        read_header(tmp_path / "z.gguf")
