"""Where the store's bytes live: the few file operations the commit protocol needs.

:class:`Backend` is the interface; :class:`LocalBackend` implements it on a local folder
and :class:`infra.s3.S3Backend` on an S3 bucket. Paths are plain strings in the backend's
``fs``/``pa_filesystem`` namespace: absolute paths locally, ``bucket/key`` on S3.

The one operation that needs care is :meth:`Backend.create_exclusive`: it must publish a
whole file or nothing, and fail when the file exists, because that is how two writers of
the same manifest agree on a winner.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from typing import IO

CHUNK = 8 * 2**20


class Backend:
    """File operations over one root. Subclasses implement every method below."""

    root: str  # the store root inside ``fs``/``pa_filesystem``
    uri: str  # the canonical URI that reopens this store

    @property
    def fs(self):  # fsspec.AbstractFileSystem
        raise NotImplementedError

    @property
    def pa_filesystem(self):  # pyarrow.fs.FileSystem
        raise NotImplementedError

    def join(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def read_bytes(self, path: str) -> bytes:
        """The whole file; FileNotFoundError when there is none."""
        raise NotImplementedError

    def open_read(self, path: str) -> IO[bytes]:
        raise NotImplementedError

    def write_bytes(self, path: str, data: bytes) -> None:
        """Create or overwrite ``path`` (parents are created as needed)."""
        raise NotImplementedError

    def make_dirs(self, path: str) -> None:
        """Create folder ``path`` where folders exist (locally); S3 has none, so nothing to do there."""

    def create_exclusive(self, path: str, data: bytes) -> bool:
        """Publish ``data`` at ``path`` atomically unless a file is there: True if we created it."""
        raise NotImplementedError

    def replace(self, path: str, data: bytes) -> None:
        """Atomically replace ``path``: readers see the old or the new bytes, never a mix."""
        raise NotImplementedError

    def list_files(self, path: str) -> dict[str, int]:
        """Every file below ``path`` (recursively) as {path relative to ``path``: size}; {} if none."""
        raise NotImplementedError

    def list_dirs(self, path: str) -> list[str]:
        """Names of the immediate sub-folders of ``path``; [] if none."""
        raise NotImplementedError

    def remove(self, path: str) -> None:
        """Remove a file or a folder with everything below it; missing is fine."""
        raise NotImplementedError

    def hash_file(self, path: str) -> tuple[int, str]:
        """(size, sha256 hex) of a stored file, streamed."""
        digest, size = hashlib.sha256(), 0
        with self.open_read(path) as handle:
            for chunk in iter(lambda: handle.read(CHUNK), b""):
                digest.update(chunk)
                size += len(chunk)
        return size, digest.hexdigest()


class LocalBackend(Backend):
    """A folder on this machine. ``create_exclusive`` writes a temp file, then ``os.link``s it
    into place, which fails if the target exists: readers never see a half-written file."""

    def __init__(self, root: str):
        self.root = os.path.abspath(os.path.expanduser(root))
        self.uri = self.root
        self._fs = None
        self._pa = None

    def __reduce__(self):
        return (LocalBackend, (self.root,))

    @property
    def fs(self):
        if self._fs is None:
            from fsspec.implementations.local import LocalFileSystem

            self._fs = LocalFileSystem(auto_mkdir=True)
        return self._fs

    @property
    def pa_filesystem(self):
        if self._pa is None:
            import pyarrow.fs

            self._pa = pyarrow.fs.LocalFileSystem()
        return self._pa

    def read_bytes(self, path: str) -> bytes:
        with open(path, "rb") as handle:
            return handle.read()

    def open_read(self, path: str) -> IO[bytes]:
        return open(path, "rb")

    def write_bytes(self, path: str, data: bytes) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as handle:
            handle.write(data)

    def make_dirs(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)

    def _write_temp(self, path: str, data: bytes) -> str:
        directory = os.path.dirname(path)
        os.makedirs(directory, exist_ok=True)
        temp = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
        with open(temp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        return temp

    def create_exclusive(self, path: str, data: bytes) -> bool:
        temp = self._write_temp(path, data)
        try:
            os.link(temp, path)
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(temp)

    def replace(self, path: str, data: bytes) -> None:
        os.replace(self._write_temp(path, data), path)

    def list_files(self, path: str) -> dict[str, int]:
        found: dict[str, int] = {}
        for directory, _, names in os.walk(path):
            for name in names:
                full = os.path.join(directory, name)
                found[os.path.relpath(full, path).replace(os.sep, "/")] = os.path.getsize(full)
        return found

    def list_dirs(self, path: str) -> list[str]:
        try:
            return sorted(entry.name for entry in os.scandir(path) if entry.is_dir())
        except FileNotFoundError:
            return []

    def remove(self, path: str) -> None:
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.exists(path):
            os.unlink(path)

