"""Where the store's bytes live: the few file operations the commit protocol needs.

:class:`Backend` is the interface; :class:`LocalBackend` implements it on a local folder
and :class:`infra.s3.S3Backend` on an S3 bucket. Paths are plain strings in the backend's
``fs``/``pa_filesystem`` namespace: absolute paths locally, ``bucket/key`` on S3.

The operations that need care:

- :meth:`Backend.create_exclusive` must publish a whole file or nothing, and fail when the
  file exists, because that is how two writers of the same manifest agree on a winner.
- :meth:`Backend.make_durable` is called on every data file before its manifest is
  published. Locally it fsyncs each file and every folder from the file's up to the root, and
  ``create_exclusive``/``replace`` fsync the folder after linking, so after a power cut a
  manifest never sits over data that did not reach the disk. On S3 a PUT is durable once
  answered, so there is nothing to do.
- :meth:`Backend.compare_and_swap` replaces a small file only if its current content is the
  one the caller decided on (pointer moves): under an ``flock`` locally, with ``If-Match`` on S3.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cached_property
from typing import IO

CHUNK = 8 * 2**20


@dataclass(frozen=True)
class FileInfo:
    size: int  # bytes
    modified: float  # last modification, seconds since the epoch (S3: the server's LastModified)


def is_temp_name(name: str) -> bool:
    """``.NAME.<32 hex>.tmp``: what an atomic write leaves behind when its process dies mid-write."""
    parts = name.rsplit(".", 2)
    return (
        name.startswith(".")
        and len(parts) == 3
        and parts[2] == "tmp"
        and len(parts[1]) == 32
        and all(c in "0123456789abcdef" for c in parts[1])
    )


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

    def copy(self, source: str, target: str) -> None:
        """Copy file ``source`` to ``target`` inside the store without passing the bytes through
        this process where the store can (an in-kernel copy locally, a server-side copy on S3)."""
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
        return {rel: info.size for rel, info in self.list_info(path).items()}

    def list_info(self, path: str) -> dict[str, FileInfo]:
        """Every file below ``path`` (recursively) with its size and modification time; {} if none."""
        raise NotImplementedError

    def make_durable(self, paths: Iterable[str]) -> None:
        """Make written files (and the folders that name them) survive a power cut before a
        manifest that lists them is published."""

    def compare_and_swap(self, path: str, data: bytes, matches: Callable[[bytes | None], bool]) -> bool:
        """Replace ``path`` with ``data`` only if ``matches(current bytes, or None when absent)``
        holds, atomically with respect to other ``compare_and_swap`` callers: True if replaced."""
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

    def __reduce__(self):
        return (LocalBackend, (self.root,))

    @cached_property
    def fs(self):
        from fsspec.implementations.local import LocalFileSystem

        return LocalFileSystem(auto_mkdir=True)

    @cached_property
    def pa_filesystem(self):
        import pyarrow.fs

        return pyarrow.fs.LocalFileSystem()

    def read_bytes(self, path: str) -> bytes:
        with open(path, "rb") as handle:
            return handle.read()

    def open_read(self, path: str) -> IO[bytes]:
        return open(path, "rb")

    def write_bytes(self, path: str, data: bytes) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as handle:
            handle.write(data)

    def copy(self, source: str, target: str) -> None:
        # A copy, not a hard link: a file written over in place (a repair, a drill) must not
        # change the output it was copied from.
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copyfile(source, target)

    def make_dirs(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)

    def _sync_dir(self, directory: str) -> None:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def make_durable(self, paths: Iterable[str]) -> None:
        """fsync each file, then each folder from the files' folders up to the root (a new file is
        only durable once the folder entry that names it is)."""
        folders: set[str] = set()
        for path in paths:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            folder = os.path.dirname(path)
            while folder.startswith(self.root) and folder not in folders:
                folders.add(folder)
                if folder == self.root:
                    break
                folder = os.path.dirname(folder)
        for folder in sorted(folders, key=len, reverse=True):  # deepest first
            self._sync_dir(folder)

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
        except FileExistsError:
            return False
        finally:
            os.unlink(temp)
        self._sync_dir(os.path.dirname(path))  # the new name survives a power cut
        return True

    def replace(self, path: str, data: bytes) -> None:
        os.replace(self._write_temp(path, data), path)
        self._sync_dir(os.path.dirname(path))

    def compare_and_swap(self, path: str, data: bytes, matches: Callable[[bytes | None], bool]) -> bool:
        # An flock on a sibling lock file serialises every swapper of ``path``; the kernel drops it
        # when its holder dies, so a crash never leaves the pointer locked.
        directory, name = os.path.split(path)
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, f".{name}.lock"), "a+b") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                try:
                    current = self.read_bytes(path)
                except FileNotFoundError:
                    current = None
                if not matches(current):
                    return False
                self.replace(path, data)
                return True
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    def list_info(self, path: str) -> dict[str, FileInfo]:
        found: dict[str, FileInfo] = {}
        for directory, _, names in os.walk(path):
            for name in names:
                full = os.path.join(directory, name)
                try:
                    stat = os.stat(full)
                except FileNotFoundError:  # removed while we walked
                    continue
                found[os.path.relpath(full, path).replace(os.sep, "/")] = FileInfo(stat.st_size, stat.st_mtime)
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
