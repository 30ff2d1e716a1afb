"""Write a GGUF file tensor by tensor, atomically.

`gguf.GGUFWriter.add_tensor` keeps every array in memory until the end; a 13B model would need
26 GB. We declare all tensor infos first (names, shapes, types are known from the config), write the
header, then produce and write one tensor at a time, so peak memory is about the largest tensor.
The file is written under a temporary name in the destination folder and renamed into place only
when complete; any failure removes it and raises OutputError (or the producer's own typed error).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from factedge.edge.errors import ConfigError, MismatchError, OutputError

Progress = Callable[[int, int, str], None]  # (tensors written, tensors total, GGUF name just written)


@dataclass(frozen=True)
class PlannedTensor:
    """One output tensor: its GGUF name, torch-order shape, GGML type, and how to produce its array."""

    name: str
    shape: tuple[int, ...]
    qtype: Any  # gguf.GGMLQuantizationType (F32, F16, BF16, or Q8_0 quantized by ggml)
    produce: Callable[[], np.ndarray]


def _numpy_dtype(qtype) -> np.dtype:
    from gguf import GGMLQuantizationType as Q

    # BF16 travels as raw uint16 bits, quantized types as their ggml blocks' bytes
    table = {Q.F32: np.float32, Q.F16: np.float16, Q.BF16: np.uint16, Q.Q8_0: np.uint8}
    if qtype not in table:
        raise ConfigError(f"tensor type {qtype!r} cannot be streamed (F32, F16, BF16, Q8_0)")
    return np.dtype(table[qtype])


def stored_shape(shape: tuple[int, ...], qtype) -> tuple[int, ...]:
    """The numpy shape of a tensor as stored: quantized rows become their bytes."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q

    if qtype in (Q.F32, Q.F16, Q.BF16):
        return tuple(shape)
    block, type_size = GGML_QUANT_SIZES[qtype]
    return (*shape[:-1], shape[-1] // block * type_size)


def to_numpy(tensor, qtype) -> np.ndarray:
    """A torch tensor as a contiguous numpy array in the GGML type's storage dtype."""
    import torch
    from gguf import GGMLQuantizationType as Q

    if qtype == Q.Q8_0:  # ggml's own kernel, never a re-implementation
        from factedge.convert.quantize import ggml_quantize

        matrix = tensor.float().contiguous().numpy()
        return ggml_quantize(matrix.reshape(-1, matrix.shape[-1]), qtype).reshape(stored_shape(matrix.shape, qtype))
    if qtype == Q.BF16:  # torch rounds to nearest even, as ggml_fp32_to_bf16 does
        return tensor.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16)
    torch_dtype = torch.float32 if qtype == Q.F32 else torch.float16
    return tensor.to(torch_dtype).contiguous().numpy()


def all_finite(array: np.ndarray, chunk_rows: int = 1024) -> bool:
    """np.isfinite over row blocks: a whole-matrix check would allocate a mask (and, through torch,
    a float32 copy) as large as the biggest tensor, doubling the streaming writer's peak memory."""
    rows = array.reshape(array.shape[0], -1) if array.ndim > 1 else array.reshape(1, -1)
    return all(bool(np.isfinite(rows[i:i + chunk_rows]).all()) for i in range(0, rows.shape[0], chunk_rows))


def set_kv(writer, key: str, value: Any) -> None:
    """Add a metadata value, typed from the Python value (bool, int, float, str, list of those)."""
    from gguf import GGUFValueType as V

    if key in writer.kv_data[0]:
        raise ConfigError(f"metadata key {key!r} is already set")
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_key_value(key, value, V.INT64 if value < 0 or value >= 2**32 else V.UINT32)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_key_value(key, value, V.STRING)  # add_string drops empty strings
    elif isinstance(value, (list, tuple)) and value:
        writer.add_array(key, list(value))
    else:
        raise ConfigError(f"metadata key {key!r}: unsupported value {value!r}")


def add_provenance(writer, layout: str, component: str, extra_kv: dict[str, Any]) -> None:
    """factedge's own keys: which layout and component a file came from, plus the caller's
    (the bundle fingerprint, source hashes)."""
    set_kv(writer, "factedge.layout", layout)
    set_kv(writer, "factedge.component", component)
    for key, value in extra_kv.items():
        set_kv(writer, key, value)


def _temp_path(out: Path) -> Path:
    return out.with_name(f".{out.name}.{os.getpid()}.tmp")


def write_gguf(
    out_path: str | Path,
    arch: str,
    metadata: Callable[[Any], None],
    plan: Iterable[PlannedTensor],
    *,
    progress: Progress | None = None,
) -> Path:
    """Stream `plan` into a GGUF at `out_path`; `metadata(writer)` adds the key/values."""
    from gguf import GGUFWriter

    out = Path(out_path)
    if not out.parent.is_dir():
        raise OutputError("output folder does not exist", out.parent)
    if out.is_dir():
        raise OutputError("output path is a folder", out)
    plan = list(plan)
    tmp = _temp_path(out)
    writer = GGUFWriter(tmp, arch)
    done = False
    try:
        metadata(writer)
        for t in plan:
            dtype, shape = _numpy_dtype(t.qtype), stored_shape(t.shape, t.qtype)
            writer.add_tensor_info(t.name, shape, dtype, math.prod(shape) * dtype.itemsize, raw_dtype=t.qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for i, t in enumerate(plan):
            array = t.produce()
            if tuple(array.shape) != stored_shape(t.shape, t.qtype) or array.dtype != _numpy_dtype(t.qtype):
                raise MismatchError(f"tensor {t.name}: produced {array.dtype}{list(array.shape)}, planned {list(t.shape)}")
            writer.write_tensor_data(array)
            del array
            if progress is not None:
                progress(i + 1, len(plan), t.name)
        for fh in writer.fout or []:
            fh.flush()
            os.fsync(fh.fileno())
        writer.close()
        os.replace(tmp, out)
        done = True
    except OSError as exc:
        raise OutputError(f"cannot write GGUF: {exc.strerror or exc}", out) from exc
    finally:
        if not done:
            _close_quietly(writer)
            tmp.unlink(missing_ok=True)
    return out


def _close_quietly(writer) -> None:
    """Close after a failure: closing flushes buffered bytes, which fails again on a full disk; the
    first error is the one to report, and the temp file must still be removed."""
    for fh in writer.fout or []:
        try:
            fh.close()
        except OSError:
            pass
    writer.fout = None
