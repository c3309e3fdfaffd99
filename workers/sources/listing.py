"""Listing a source on the driver: which files, of which kind, and a fingerprint of them.

The fingerprint (each file's path, size and modification time or ETag) goes into the ingest
stage's key, so a scheduled re-run on changed data builds a new images table while an
unchanged dataset returns the committed one at once.

Files the source holds but ingest does not read are counted, never dropped in silence: hidden
names (any path part starting with ``.`` or ``_``: ``.DS_Store``, Spark's ``_SUCCESS``) and
extensions of the other kind or of no kind fewstep reads (``.heic``, ``.avif``, ``.txt``, ...).
:attr:`Source.skipped` counts them and :attr:`Source.skipped_examples` names a few, with why;
the images card reports both. They are not part of the fingerprint (a new ``notes.txt`` does
not re-run the pipeline).
"""

from __future__ import annotations

import hashlib
import logging
import posixpath
from dataclasses import dataclass
from typing import Any, Literal

import fsspec
import pyarrow.fs as pafs

from infra.config import StageInputError
from infra.store import Store

log = logging.getLogger("fewstep.ingest")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
BUILTIN = ("digits", "shapes", "glyphs")
ID_HEX = 20  # 80 bits of sha1: no collisions at any dataset size we will meet
SKIPPED_EXAMPLES = 3  # how many skipped files a source names (with the reason)


@dataclass(frozen=True)
class SourceFile:
    path: str  # full path inside the source filesystem
    rel: str  # path relative to the source root, posix separators
    size: int
    version: str  # mtime or ETag: what changes when the file's content does


@dataclass(frozen=True)
class Source:
    kind: Literal["digits", "shapes", "glyphs", "folder", "parquet"]
    root: str
    files: tuple[SourceFile, ...]
    fs: Any  # fsspec filesystem (None for built-in sets)
    pa_fs: pafs.FileSystem | None
    fingerprint: str
    skipped: int = 0  # files under the root that are not read (hidden names, other extensions)
    skipped_examples: tuple[str, ...] = ()  # "rel/path: why", the first few in path order


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


def _extension(rel: str) -> str:
    name = rel.rsplit("/", 1)[-1]
    return name[name.rfind(".") :].lower() if "." in name else ""


def _skip_reason(rel: str, kind: str) -> str:
    """Why a listed file is not read by a source of ``kind`` (folder or parquet)."""
    if _hidden(rel):
        return "hidden name (starts with '.' or '_')"
    wanted = "an image (" + ", ".join(IMAGE_EXTENSIONS) + ")" if kind == "folder" else "a .parquet file"
    extension = _extension(rel)
    return f"{'extension ' + repr(extension) if extension else 'no extension'}: not {wanted}"


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
    listed, hidden = [], []
    for path, info in sorted(infos.items()):
        rel = posixpath.relpath(path, base) if base else path
        if info.get("type", "file") != "file":
            continue
        (hidden if _hidden(rel) else listed).append(SourceFile(path, rel, int(info.get("size") or 0), _version(info)))
    images = tuple(f for f in listed if f.rel.lower().endswith(IMAGE_EXTENSIONS))
    tables = tuple(f for f in listed if f.rel.lower().endswith(".parquet"))
    if images and tables:
        raise StageInputError(
            f"ingest source {source!r} holds both image files ({len(images)}) and Parquet files "
            f"({len(tables)}); point 'ingest.source' at a folder with only one kind"
        )
    if not images and not tables:
        others = sorted([*listed, *hidden], key=lambda f: f.rel)
        seen = f"; it holds {len(others)} other file(s), e.g. {others[0].rel!r}" if others else ""
        raise StageInputError(
            f"ingest source {source!r} holds no images ({', '.join(IMAGE_EXTENSIONS)}) and no .parquet files{seen}"
        )
    kind = "folder" if images else "parquet"
    chosen = images or tables
    read = {f.path for f in chosen}
    skipped = sorted((f for f in [*listed, *hidden] if f.path not in read), key=lambda f: f.rel)
    examples = tuple(f"{f.rel}: {_skip_reason(f.rel, kind)}" for f in skipped[:SKIPPED_EXAMPLES])
    if skipped:
        log.warning("ingest: %d file(s) in %r are not read, e.g. %s", len(skipped), source, examples[0])
    return Source(kind, root, chosen, fs, pa_fs, _fingerprint(kind, chosen), len(skipped), examples)
