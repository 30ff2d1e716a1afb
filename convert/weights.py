"""Index the tensors of checkpoint weight files without loading them, and load one on demand.

Checkpoints are tens of GB: we read only safetensors headers (validated against the file size, so a
truncated download is caught before any conversion starts) and pickle metadata (`torch.load` with
`mmap=True`, which touches no tensor data). Pickles are opened ONLY with `weights_only=True`: a
`.bin` that needs arbitrary code to unpickle is refused, never executed.
"""

from __future__ import annotations

import json
import math
import pickle
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from factedge.edge.errors import CorruptFileError, InputError, UnsafePickleError

_MAX_HEADER = 100 * 1024 * 1024  # safetensors itself refuses headers above 100 MB
_ITEMSIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4,
    "U64": 8, "I64": 8, "F64": 8,
}  # fmt: skip

# Where a folder's weights live, most preferred first: (index file, single file).
WEIGHT_STEMS: tuple[tuple[str, str], ...] = (
    ("model.safetensors.index.json", "model.safetensors"),
    ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ("adapter_model.safetensors.index.json", "adapter_model.safetensors"),
    ("adapter_model.bin.index.json", "adapter_model.bin"),
)


@dataclass(frozen=True)
class TensorRef:
    """Where one tensor lives and what it looks like, known without reading its data."""

    file: Path
    key: str
    shape: tuple[int, ...]
    dtype: str


def _corrupt(path: Path, reason: str) -> CorruptFileError:
    return CorruptFileError(reason, path)


def safetensors_header(path: Path) -> dict[str, TensorRef]:
    """Parse and check a safetensors header: every tensor's bytes must fit its shape and the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise _corrupt(path, f"truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:
                raise _corrupt(path, f"bad safetensors header: length {n} does not fit a {size}-byte file")
            raw = fh.read(n)
    except FileNotFoundError as exc:
        raise InputError("weights file missing", path) from exc
    except OSError as exc:
        raise InputError(f"cannot read weights file: {exc.strerror}", path) from exc
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _corrupt(path, f"bad safetensors header: not JSON ({exc})") from exc
    except RecursionError:
        raise _corrupt(path, "bad safetensors header: nested too deeply") from None
    if not isinstance(header, dict):
        raise _corrupt(path, "bad safetensors header: not a JSON object")
    data_len = size - 8 - n
    refs: dict[str, TensorRef] = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(_whole(d) for d in info["shape"]), info["data_offsets"]
            begin, end = _whole(begin), _whole(end)
            itemsize = _ITEMSIZE[dtype]
        except (KeyError, TypeError, ValueError) as exc:
            raise _corrupt(path, f"bad safetensors header entry for {key!r}") from exc
        if end - begin != math.prod(shape) * itemsize or begin < 0:
            raise _corrupt(path, f"size mismatch for tensor {key!r}: {end - begin} bytes for shape {list(shape)} {dtype}")
        if end > data_len:
            raise _corrupt(path, f"truncated: tensor {key!r} ends at byte {end} but only {data_len} data bytes present")
        refs[key] = TensorRef(path, key, shape, dtype)
    return refs


def _whole(value) -> int:
    """A header number: a non-negative int (JSON strings, floats and booleans are refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{value!r} is not a non-negative integer")
    return value


def _torch_load(path: Path):
    """`torch.load` the only way we allow: weights_only, memory-mapped; typed errors naming the file."""
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except FileNotFoundError as exc:
        raise InputError("weights file missing", path) from exc
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL (\S+)", str(exc))
        what = f"it imports {found[1]}" if found else str(exc).split("WeightsUnpickler error:")[-1].strip()[:120]
        raise UnsafePickleError(f"pickle needs more than tensors to load ({what}); refused, not executed", path) from exc
    except RuntimeError as exc:
        if "mmap can only be used" in str(exc):
            raise CorruptFileError("legacy (pre-zip) torch pickle; re-save it with torch>=1.6", path) from exc
        reason = str(exc).split(". This is an internal")[0].splitlines()[0][:160]
        raise CorruptFileError(f"not a readable torch checkpoint (truncated?): {reason}", path) from exc
    except (EOFError, ValueError, OSError) as exc:
        raise CorruptFileError(f"not a readable torch checkpoint: {exc}", path) from exc
    if not isinstance(obj, dict):
        raise CorruptFileError(f"expected a state dict, found {type(obj).__name__}", path)
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def pickle_header(path: Path) -> dict[str, TensorRef]:
    """Names, shapes and dtypes of a `.bin` state dict (mmap: no tensor data is read)."""
    state = _torch_load(path)
    if not state:
        raise CorruptFileError("state dict holds no tensors", path)
    return {k: TensorRef(path, k, tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in state.items()}


def file_header(path: Path) -> dict[str, TensorRef]:
    if not path.is_file():
        raise InputError("weights file missing (or not a regular file)", path)
    return safetensors_header(path) if path.suffix == ".safetensors" else pickle_header(path)


def load_tensor(ref: TensorRef):
    """Materialise one tensor (a fresh CPU torch.Tensor)."""
    if ref.file.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(ref.file), framework="pt", device="cpu") as fh:
                return fh.get_tensor(ref.key)
        except (SafetensorError, OSError) as exc:
            raise CorruptFileError(f"cannot read tensor {ref.key!r}: {exc}", ref.file) from exc
    state = _torch_load(ref.file)
    if ref.key not in state:
        raise CorruptFileError(f"tensor {ref.key!r} vanished from the file", ref.file)
    return state[ref.key]


def loader(ref: TensorRef) -> Callable[[], object]:
    return lambda: load_tensor(ref)


def shard_files(index_file: Path) -> list[Path]:
    """The shard files an HF `*.index.json` names (each must exist)."""
    try:
        weight_map = json.loads(index_file.read_text(encoding="utf-8"))["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError,
            RecursionError) as exc:
        raise CorruptFileError(f"bad shard index: {exc!r}", index_file) from exc
    if not all(isinstance(n, str) and n == Path(n).name for n in names):
        raise CorruptFileError("bad shard index: shard names must be plain file names", index_file)
    files = [index_file.parent / name for name in names]
    for file in files:
        if not file.is_file():
            raise InputError(f"shard named by {index_file.name} is missing", file)
    return files


def find_weight_files(folder: Path, stems: Iterable[tuple[str, str]] = WEIGHT_STEMS) -> tuple[list[Path], Path | None]:
    """(weight files, shard index or None) of `folder`, sharded or single, safetensors preferred."""
    for index_name, single_name in stems:
        if (folder / index_name).is_file():
            return shard_files(folder / index_name), folder / index_name
        if (folder / single_name).is_file():
            return [folder / single_name], None
    return [], None


def index_files(files: Iterable[Path]) -> dict[str, TensorRef]:
    """Every tensor of `files` by its key (a key found in two files is an error)."""
    refs: dict[str, TensorRef] = {}
    for file in files:
        for key, ref in file_header(file).items():
            if key in refs:
                raise CorruptFileError(f"tensor {key!r} also in {refs[key].file.name}", file)
            refs[key] = ref
    return refs
