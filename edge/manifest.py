"""The bundle manifest: which files belong together, and the proof that they do.

`factedge convert` writes `manifest.json` beside the GGUF files; the edge runtime reads it to pick a
quant and to refuse an mmproj or adapter that was made for another model. The *fingerprint* ties
LM + mmproj + adapter together: the LM width, a hash of the base weights, the image size and the
number of tokens per image. It is also written into every GGUF (`factedge.fingerprint`), so a loose
file can be checked without its manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from factedge.edge.errors import CorruptFileError, InputError, MismatchError

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
FINGERPRINT_KEY = "factedge.fingerprint"
LORA_MERGED_KEY = "factedge.lora_merged"  # true in an LM with the LoRA merged in: no adapter on top


@dataclass(frozen=True)
class Fingerprint:
    n_embd: int
    base_weights_sha256: str
    image_size: int
    tokens_per_image: int

    @property
    def id(self) -> str:
        """Short stable id of the whole fingerprint (what GGUF files carry)."""
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


@dataclass
class BundleFile:
    name: str
    role: str  # "model" | "mmproj" | "adapter"
    dtype: str  # "F16", "Q4_K_M", "f16", "q8_0", ...
    sha256: str
    size: int


@dataclass
class Manifest:
    fingerprint: Fingerprint
    files: list[BundleFile]
    source: dict[str, Any] = field(default_factory=dict)  # layout, path, per-file sha256, adapter
    lora: str | None = None  # None, "merged" or "adapter"
    fidelity: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)  # conversion options (for up-to-date checks)
    format: int = FORMAT_VERSION

    def by_role(self, role: str) -> list[BundleFile]:
        return [f for f in self.files if f.role == role]

    def file(self, role: str, dtype: str | None = None) -> BundleFile:
        """The file of that role (and dtype, case-insensitive), else the first of that role."""
        files = self.by_role(role)
        if dtype is not None:
            files = [f for f in files if f.dtype.lower() == dtype.lower()]
        if not files:
            have = ", ".join(f"{f.role}:{f.dtype}" for f in self.files)
            raise InputError(f"bundle has no {role}{' ' + dtype if dtype else ''} (it has {have})")
        return files[0]

    def to_json(self) -> str:
        data = asdict(self)
        data["fingerprint"]["id"] = self.fingerprint.id
        return json.dumps(data, indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_json(cls, text: str, path: Path | None = None) -> "Manifest":
        try:
            data = json.loads(text)
            fp = data.pop("fingerprint")
            fp.pop("id", None)
            files = [BundleFile(**f) for f in data.pop("files")]
            if not all(isinstance(f.name, str) and f.name and f.name == Path(f.name).name
                       and f.name not in (".", "..") for f in files):
                raise ValueError("file names must be plain names inside the bundle")
            if data.get("format") != FORMAT_VERSION:
                raise CorruptFileError(f"manifest format {data.get('format')} is not {FORMAT_VERSION}", path)
            return cls(fingerprint=Fingerprint(**fp), files=files, **data)
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:  # AttributeError: not an object
            raise CorruptFileError(f"not a factedge manifest ({exc!r})", path) from exc


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """sha256 of a regular file (a FIFO or device is refused: reading it could block forever)."""
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise InputError("not a regular file", path)
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_manifest(bundle: Path) -> Manifest:
    path = Path(bundle) / MANIFEST
    if not path.is_file():
        raise InputError("not a factedge bundle (no manifest.json)", bundle)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CorruptFileError(f"cannot read the manifest ({exc})", path) from exc
    return Manifest.from_json(text, path)


def check_pairing(expected: str, found: str | None, path: Path, what: str) -> None:
    """Refuse a file whose fingerprint id differs from the model's."""
    if found is None:
        raise MismatchError(f"{what} carries no {FINGERPRINT_KEY}; it was not made by factedge convert", path)
    if found != expected:
        raise MismatchError(f"{what} was made for another model (fingerprint {found}, model has {expected})", path)
