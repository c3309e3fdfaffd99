"""Listing a source on the driver: which files, of which kind, and a fingerprint of them.

The fingerprint (each file's path, size and modification time or ETag) goes into the ingest
stage's key, so a scheduled re-run on changed data builds a new images table while an
unchanged dataset returns the committed one at once.
"""

from __future__ import annotations

import hashlib
import posixpath
from dataclasses import dataclass
from typing import Any, Literal

import fsspec
import pyarrow.fs as pafs

from infra.config import StageInputError
from infra.store import Store

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
BUILTIN = ("digits", "shapes")
ID_HEX = 20  # 80 bits of sha1: no collisions at any dataset size we will meet


@dataclass(frozen=True)
class SourceFile:
    path: str  # full path inside the source filesystem
    rel: str  # path relative to the source root, posix separators
    size: int
    version: str  # mtime or ETag: what changes when the file's content does


@dataclass(frozen=True)
class Source:
    kind: Literal["digits", "shapes", "folder", "parquet"]
    root: str
    files: tuple[SourceFile, ...]
    fs: Any  # fsspec filesystem (None for built-in sets)
    pa_fs: pafs.FileSystem | None
    fingerprint: str


def content_id(data: bytes | str) -> str:
    raw = data.encode() if isinstance(data, str) else data
    return hashlib.sha1(raw).hexdigest()[:ID_HEX]


def source_filesystem(store: Store, source: str) -> tuple[Any, pafs.FileSystem, str]:
    """(fsspec filesystem, pyarrow filesystem, path) for a source.

    An ``s3://`` source on an S3 store uses the store's clients (same endpoint, keys, region:
    MinIO, moto, ...); on a local store, s3fs's defaults (the AWS environment variables).
    """
    protocol, path = fsspec.core.split_protocol(source)
    if protocol in (None, "file", "local"):
        local = fsspec.filesystem("file")
        return local, pafs.LocalFileSystem(), local._strip_protocol(path)
    store_fs = store.fs
    if protocol in ("s3", "s3a") and "s3" in store_fs.protocol:
        return store_fs, store.pa_filesystem, path
    fs = fsspec.filesystem(protocol)
    return fs, pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def _version(info: dict[str, Any]) -> str:
    for key in ("ETag", "etag", "mtime", "LastModified", "last_modified", "updated", "created"):
        if info.get(key) is not None:
            return str(info[key])
    return ""


def _hidden(rel: str) -> bool:
    return any(part.startswith((".", "_")) for part in rel.split("/"))


def _fingerprint(kind: str, files: tuple[SourceFile, ...]) -> str:
    digest = hashlib.sha256(kind.encode())
    for f in files:
        digest.update(f"\n{f.rel}\t{f.size}\t{f.version}".encode())
    return digest.hexdigest()


def builtin_fingerprint(kind: str) -> str:
    """A built-in set is versioned by the code that makes it (digits: scikit-learn's copy)."""
    if kind == "digits":
        import sklearn

        return f"sklearn-digits/{sklearn.__version__}"
    return f"{kind}/procedural"  # its size and seed are in the stage's config section


def resolve_source(store: Store, source: str) -> Source:
    """List the source's files and fingerprint them; decide folder vs Parquet by what it holds."""
    if source in BUILTIN:
        return Source(source, source, (), None, None, builtin_fingerprint(source))
    fs, pa_fs, root = source_filesystem(store, source)
    if not fs.exists(root):
        raise StageInputError(
            f"ingest source {source!r} does not exist: pass {' or '.join(repr(b) for b in BUILTIN)}, "
            "an image folder or a Parquet file/folder"
        )
    if fs.isfile(root):
        infos = {root: fs.info(root)}
        base = posixpath.dirname(root.rstrip("/"))
    else:
        infos = fs.find(root, detail=True)
        base = root.rstrip("/")
    files = []
    for path, info in sorted(infos.items()):
        rel = posixpath.relpath(path, base) if base else path
        if info.get("type", "file") != "file" or _hidden(rel):
            continue
        files.append(SourceFile(path, rel, int(info.get("size") or 0), _version(info)))
    images = tuple(f for f in files if f.rel.lower().endswith(IMAGE_EXTENSIONS))
    tables = tuple(f for f in files if f.rel.lower().endswith(".parquet"))
    if images and tables:
        raise StageInputError(
            f"ingest source {source!r} holds both image files ({len(images)}) and Parquet files "
            f"({len(tables)}); point 'ingest.source' at a folder with only one kind"
        )
    if not images and not tables:
        raise StageInputError(
            f"ingest source {source!r} holds no images ({', '.join(IMAGE_EXTENSIONS)}) and no .parquet files"
        )
    kind = "folder" if images else "parquet"
    chosen = images or tables
    return Source(kind, root, chosen, fs, pa_fs, _fingerprint(kind, chosen))
