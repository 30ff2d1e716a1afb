"""Read a GGUF file's header (metadata and tensor table) without touching its tensor data.

gguf-py's GGUFReader builds a numpy view for every element of every array, so opening a model with
LLaMA's 32000-token vocab costs seconds; `factedge ask` reads three headers before loading anything
(pairing checks) and `factedge inspect` reads one per bundle file. Here arrays are skipped (strings
by their lengths, numbers by seeking), so a header reads in milliseconds. Every length is checked
against the file size, and the tensor table must fit the file: a truncated download is reported as
such, not as a crash.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from factedge.edge.errors import CorruptFileError, InputError

MAGIC = b"GGUF"
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # ggml order (fastest-varying first), as stored
    ggml_type: int
    offset: int  # from the start of the data section
    nbytes: int


@dataclass
class GgufHeader:
    version: int
    metadata: dict[str, Any]  # arrays are given as ArrayInfo, not read
    tensors: list[TensorInfo] = field(default_factory=list)
    data_offset: int = 0


@dataclass(frozen=True)
class ArrayInfo:
    item_type: int
    count: int

    def __str__(self) -> str:
        return f"[{self.count} items]"


class _Reader:
    def __init__(self, fh: BinaryIO, size: int, path: Path):
        self.fh, self.size, self.path = fh, size, path

    def _bad(self, reason: str) -> CorruptFileError:
        return CorruptFileError(f"not a readable GGUF file ({reason})", self.path)

    def take(self, n: int) -> bytes:
        if n < 0 or self.fh.tell() + n > self.size:
            raise self._bad(f"truncated: needs {n} bytes at offset {self.fh.tell()} of {self.size}")
        return self.fh.read(n)

    def skip(self, n: int) -> None:
        if n < 0 or self.fh.tell() + n > self.size:
            raise self._bad(f"truncated: needs {n} bytes at offset {self.fh.tell()} of {self.size}")
        self.fh.seek(n, 1)

    def scalar(self, vtype: int):
        fmt = _SCALARS.get(vtype)
        if fmt is None:
            raise self._bad(f"unknown value type {vtype}")
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def u32(self) -> int:
        return self.scalar(4)

    def u64(self) -> int:
        return self.scalar(10)

    def string(self) -> str:
        return self.take(self.u64()).decode("utf-8", "replace")

    def value(self, vtype: int, read_array: bool = False):
        if vtype == _STRING:
            return self.string()
        if vtype != _ARRAY:
            return self.scalar(vtype)
        item_type, count = self.u32(), self.u64()
        if read_array and (item_type == _STRING or item_type in _SCALARS):
            if count > self.size:
                raise self._bad(f"array of {count} items in a {self.size}-byte file")
            return [self.value(item_type) for _ in range(count)]
        if item_type == _STRING:
            for _ in range(count):
                self.skip(self.u64())
        elif item_type in _SCALARS:
            self.skip(count * struct.calcsize(_SCALARS[item_type]))
        else:  # arrays of arrays: not used by llama.cpp files
            raise self._bad(f"unsupported array item type {item_type}")
        return ArrayInfo(item_type, count)


def _nbytes(shape: tuple[int, ...], ggml_type: int, reader: _Reader) -> int:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    except (ValueError, KeyError) as exc:
        raise reader._bad(f"unknown tensor type {ggml_type}") from exc
    n = 1
    for d in shape:
        n *= d
    return n // block * type_size


def read_header(path: Path, arrays: tuple[str, ...] = ()) -> GgufHeader:
    """Metadata and tensor table of a GGUF; CorruptFileError if it is not one or is truncated.
    Arrays are skipped (ArrayInfo) except the keys named in `arrays`, which are read as lists."""
    from gguf.constants import GGUF_DEFAULT_ALIGNMENT

    path = Path(path)
    if not path.is_file():
        raise InputError("no such GGUF file", path)
    size = path.stat().st_size
    try:
        with open(path, "rb") as fh:
            r = _Reader(fh, size, path)
            if r.take(4) != MAGIC:
                raise CorruptFileError("not a GGUF file (bad magic)", path)
            version = r.u32()
            if version not in (2, 3):
                raise r._bad(f"GGUF version {version} is not supported")
            n_tensors, n_kv = r.u64(), r.u64()
            if n_tensors > size or n_kv > size:
                raise r._bad(f"header claims {n_tensors} tensors and {n_kv} keys in a {size}-byte file")
            meta: dict[str, Any] = {}
            for _ in range(n_kv):
                key = r.string()
                meta[key] = r.value(r.u32(), key in arrays)
            header = GgufHeader(version, meta)
            for _ in range(n_tensors):
                name = r.string()
                n_dims = r.u32()
                if n_dims > 8:
                    raise r._bad(f"tensor {name!r} has {n_dims} dimensions")
                shape = tuple(r.u64() for _ in range(n_dims))
                ggml_type, offset = r.u32(), r.u64()
                header.tensors.append(TensorInfo(name, shape, ggml_type, offset, _nbytes(shape, ggml_type, r)))
            align = meta.get("general.alignment", GGUF_DEFAULT_ALIGNMENT)
            align = align if isinstance(align, int) and align > 0 else GGUF_DEFAULT_ALIGNMENT
            header.data_offset = -(-fh.tell() // align) * align
    except OSError as exc:
        raise InputError(f"cannot read GGUF file: {exc.strerror or exc}", path) from exc
    end = max((t.offset + t.nbytes for t in header.tensors), default=0)
    if header.data_offset + end > size:
        raise CorruptFileError(f"truncated GGUF: tensor data ends at byte {header.data_offset + end} "
                               f"but the file has {size}", path)
    return header
