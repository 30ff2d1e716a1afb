"""Which images a caller may name: the line between a trusted caller and a network client.

In-process callers (the library, `factedge ask`, the REPL) are the user: any local path is theirs to
read. A server's clients are not: they send images inline as data: URIs, and read local files only
inside folders the user chose to expose (`factedge serve --allow-dir`). A refused path gets the same
answer whether or not the file exists, so a client cannot probe the file system; symbolic links are
followed before the check, so a link inside an exposed folder cannot lead out of it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from factedge.edge.errors import InputError


class RemoteImageError(InputError):
    """An image was given as an http(s) URL: factedge never goes online to fetch it."""


class ImageAccessError(InputError):
    """A client named a local file the server does not expose."""


@dataclass(frozen=True)
class ImageAccess:
    local_files: bool = True  # any local path (the caller is the user)
    allow_dirs: tuple[Path, ...] = ()  # with local_files=False: folders whose files may be read

    @classmethod
    def exposing(cls, folders) -> "ImageAccess":
        """No local files but those below `folders` (each must be an existing folder)."""
        dirs = []
        for folder in folders or ():
            real = Path(os.path.realpath(folder))
            if not real.is_dir():
                raise InputError("--allow-dir must name an existing folder", folder)
            dirs.append(real)
        return cls(local_files=False, allow_dirs=tuple(dirs))

    def resolve(self, url: str) -> str:
        """The source to open for an image_url: a data: URI unchanged, a permitted local path, or an error."""
        if url.startswith("data:"):
            return url
        if url.lower().startswith(("http://", "https://")):
            raise RemoteImageError("http(s) image URLs are not fetched (factedge is offline); "
                                   "send the image as a data: URI")
        path = url[len("file://"):] if url.startswith("file://") else url
        if self.local_files:
            return path
        if not self.allow_dirs:
            raise ImageAccessError("local image paths are not served (this server exposes no folder; "
                                   "see `factedge serve --allow-dir`); send the image as a data: URI")
        if not os.path.isabs(path):
            raise ImageAccessError("a local image path must be absolute and inside an exposed folder")
        real = Path(os.path.realpath(path))
        if not any(real == d or d in real.parents for d in self.allow_dirs):
            raise ImageAccessError("that image path is not inside a folder this server exposes")
        return str(real)


__all__ = ["ImageAccess", "ImageAccessError", "RemoteImageError"]
