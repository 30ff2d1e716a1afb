"""Make the slim copy of the pinned llama-cpp-python sdist that fits a 64 MiB upload (the GPU machine).

The pinned sdist is 73 MiB, three quarters of it llama.cpp's test models, docs and a .git folder the
build never reads. This drops them (keeping the LLaMA SPM vocab the tests use), byte-reproducibly: the
members keep their order and metadata, and the gzip header has no time stamp, so the same input always
gives the same file, whose sha256 CMakeLists.txt accepts beside the original's.

    python scripts/slim_sdist.py .cache/native/llama_cpp_python-0.3.36.tar.gz OUT.tar.gz
"""

from __future__ import annotations

import gzip
import hashlib
import sys
import tarfile

KEEP_MODELS = ("ggml-vocab-llama-spm.gguf",)  # and its .inp / .out
DROPPED = ("/.git/", "/vendor/llama.cpp/docs/", "/vendor/llama.cpp/.git", "/vendor/llama.cpp/models/")


def wanted(name: str) -> bool:
    path = "/" + name.split("/", 1)[-1] + ("/" if not name.endswith("/") else "")
    if "/vendor/llama.cpp/models/" in path:
        return any(f"/models/{keep}" in path for keep in KEEP_MODELS)
    return not any(d in path for d in DROPPED)


def slim(src: str, dst: str) -> str:
    with tarfile.open(src, "r:gz") as tin, open(dst, "wb") as raw:
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=9, mtime=0) as gz:
            with tarfile.open(fileobj=gz, mode="w", format=tin.format or tarfile.PAX_FORMAT) as tout:
                for member in tin:
                    if wanted(member.name):
                        tout.addfile(member, tin.extractfile(member) if member.isfile() else None)
    with open(dst, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


if __name__ == "__main__":
    print(slim(sys.argv[1], sys.argv[2]))
