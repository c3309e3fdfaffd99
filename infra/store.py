"""The artifact store: content-addressed stage outputs on a local folder or S3 (DESIGN §4).

This module is the commit protocol; backends, manifests, checkpoints, roots and gc are modules of their own.

Layout under the root (a folder, or ``s3://bucket/prefix``)::

    stages/{stage}/{key}/manifest.json                 the commit record: it alone makes the output exist
    stages/{stage}/{key}/attempts/{attempt}/...        data files, one fresh folder per writer
    checkpoints/{stage}/{key}/step-{n:08d}/...         same protocol, one manifest per step
    pointers/{name}.json                               {"ref": "stage/key"}, moved by compare-and-swap
    runs/{run_id}.json                                 a pipeline run: status, heartbeat, refs (gc roots)
    pins/{name}.json                                   a ref a process serves (``serve --model``; a gc root)

Commit protocol: a :class:`StageWriter` writes every file under its own attempt folder,
reads each one back to verify size and sha256, makes the files durable (fsync of the files
and their folders, locally), then publishes ``manifest.json`` with an exclusive create
(``If-None-Match: *`` on S3, proven to work when the store opens; ``os.link`` locally, then
an fsync of the folder). Of two writers of one key exactly one creates the manifest; the
other gets the winner's manifest back. Readers only go through manifests (whose file paths
are checked to stay inside the stage folder), and every read checks the bytes against the
manifest, including the paths handed to Ray Data (:meth:`Store.verified_paths`).

Runs: a pipeline calls :meth:`Store.begin_run` when it starts, :meth:`Store.heartbeat_run`
every ``RUN_HEARTBEAT_S`` while it goes (:meth:`Store.keep_alive` does it from a thread) and
:meth:`Store.finish_run` at the end. ``fewstep gc`` collects nothing but temp files while a
run's heartbeat is younger than ``RUN_STALE_S``: a running run may reuse any committed output
and be writing any attempt.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlparse

import pyarrow as pa

from infra.backends import Backend, LocalBackend
from infra.checkpoints import CheckpointStore
from infra.errors import (
    AccessDenied,
    IntegrityError,
    InvalidName,
    InvalidStoreURI,
    NotCommitted,
    StoreError,
    UnknownScheme,
)
from infra.manifest import (
    MANIFEST,
    FileEntry,
    Manifest,
    check_file,
    check_relative_path,
    check_segment,
    new_attempt_id,
    read_checked,
    sha256_hex,
    split_ref,
    stage_key,
    to_jsonable,
)
from infra.roots import ANY, FAILED, FINISHED, RUN_HEARTBEAT_S, RUN_STALE_S, RUNNING, RootRecords
from infra.tables import parquet_bytes_to_table, table_to_parquet_bytes, with_metadata
from infra.version import CODE_VERSION

__all__ = [
    "Store",
    "StageWriter",
    "Manifest",
    "FileEntry",
    "CheckpointStore",
    "DEFAULT_STORE",
    "SERVING_POINTER",
    "ANY",
    "RUN_HEARTBEAT_S",
    "RUN_STALE_S",
    "RUNNING",
    "FINISHED",
    "FAILED",
    "split_ref",
]

DEFAULT_STORE = "./fewstep-store"
VERIFY_THREADS = 8

# The pointer promotion moves and the Serve app follows.
SERVING_POINTER = "serving/current"


def with_suffix(name: str, suffix: str) -> str:
    return name if name.endswith(suffix) else name + suffix


def open_backend(uri: str | None, *, check: bool = True, **s3_options: Any) -> Backend:
    """The backend for a store URI: a local path, ``file:///path`` or ``s3://bucket/prefix``.
    ``s3_options`` go to :func:`infra.s3.resolve_settings`; ``check`` probes the bucket."""
    uri = DEFAULT_STORE if uri is None else str(uri)
    if not uri.strip():
        raise InvalidStoreURI("store URI is empty; give a folder or s3://bucket/prefix (default ./fewstep-store)")
    parsed = urlparse(uri)
    scheme = parsed.scheme.lower() if "://" in uri else ""
    if scheme in ("", "file"):
        path = parsed.path if scheme == "file" else uri
        if scheme == "file" and parsed.netloc not in ("", "localhost"):
            raise InvalidStoreURI(
                f"store URI {uri!r} names host {parsed.netloc!r}; write a local folder as file:///abs/path"
            )
        if os.path.isfile(os.path.expanduser(path)):
            raise InvalidStoreURI(f"store {uri!r} is a file; give a folder (it is created on the first write)")
        return LocalBackend(path)
    if scheme == "s3":
        from infra.s3 import S3Backend, resolve_settings

        backend = S3Backend(resolve_settings(uri, **s3_options))
        if check:
            backend.probe()
            try:
                backend.prove_conditional_create()
            except AccessDenied:
                pass  # read-only keys: nothing can be committed with them, and the first write proves it
        return backend
    raise UnknownScheme(
        f"store URI {uri!r} has scheme {scheme!r}; fewstep stores live in a local folder "
        "(a path or file:///path) or on S3-compatible storage (s3://bucket/prefix)"
    )


class Store(RootRecords):
    """Committed stage outputs, checkpoints, and the records gc keeps them for (pointers, pins,
    runs: see :class:`infra.roots.RootRecords`) under one root. See the module docstring."""

    def __init__(self, backend: Backend):
        self.backend = backend

    @classmethod
    def open(
        cls,
        uri: str | None = None,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        check: bool = True,
    ) -> Store:
        """Open a store (``None`` -> ``./fewstep-store``). For S3, endpoint, region and keys default
        to the AWS environment variables; ``check`` lists the bucket once so a wrong bucket,
        credentials or endpoint fail here with a :class:`StoreError` that says what to fix."""
        return cls(
            open_backend(
                uri,
                endpoint_url=endpoint_url,
                region=region,
                access_key_id=access_key_id,
                secret_access_key=secret_access_key,
                check=check,
            )
        )

    def __reduce__(self):  # Ray tasks get a store that reconnects lazily, without a probe
        return (Store, (self.backend,))

    def __repr__(self) -> str:
        return f"Store({self.uri!r})"

    # -- where things are --------------------------------------------------------------------

    @property
    def uri(self) -> str:
        return self.backend.uri

    @property
    def root(self) -> str:
        """The root inside ``fs`` / ``pa_filesystem`` (an absolute path, or ``bucket/prefix``)."""
        return self.backend.root

    @property
    def fs(self):
        """An fsspec filesystem (LocalFileSystem or s3fs.S3FileSystem). On S3 its own retries are
        off: wrap calls in :func:`infra.errors.retry_transient` for the store's retry policy."""
        return self.backend.fs

    @property
    def pa_filesystem(self):
        """A ``pyarrow.fs.FileSystem`` for ``ray.data.read_parquet(..., filesystem=...)`` and pyarrow."""
        return self.backend.pa_filesystem

    def stage_dir(self, stage: str, key: str) -> str:
        return self.backend.join("stages", check_segment(stage, "stage name"), check_segment(key, "stage key"))

    def file_path(self, manifest: Manifest, name: str) -> str:
        """Path of a manifest's file (or of a folder of files, e.g. a Ray Data output) inside
        ``fs``/``pa_filesystem``, for messages and reports. It is NOT checked: to read the bytes
        with another engine (Ray Data, pyarrow, pandas) use :meth:`verified_paths`."""
        base = self.stage_dir(manifest.stage, manifest.key)
        if name in manifest.files:
            return f"{base}/{manifest.files[name].path}"
        members = self._members(manifest, name)
        folders = {entry.path.rsplit("/", 1)[0] for _, entry in members}
        if len(folders) != 1:
            raise StoreError(
                f"files under {name!r} of {manifest.ref} lie in {len(folders)} folders; use file_path per file"
            )
        return f"{base}/{folders.pop()}"

    # -- keys and manifests ------------------------------------------------------------------

    def stage_key(
        self, stage: str, config: Mapping[str, Any], inputs: Sequence[Manifest] = (), code_version: str | None = None
    ) -> str:
        """hash(stage, config, input manifest digests, code version): the content address.
        ``code_version`` is the stage's own (:func:`infra.version.code_version`); default the package's."""
        return stage_key(stage, config, inputs, code_version or CODE_VERSION)

    def get(self, stage: str, key: str) -> Manifest | None:
        """The committed manifest of ``stage/key``, or None when there is none."""
        path = f"{self.stage_dir(stage, key)}/{MANIFEST}"
        try:
            data = self.backend.read_bytes(path)
        except FileNotFoundError:
            return None
        manifest = Manifest.from_json(data, f"manifest of {stage}/{key} at {path}")
        if (manifest.stage, manifest.key) != (stage, key):
            raise IntegrityError(
                f"{path} describes {manifest.ref}, not {stage}/{key}; it was copied to the wrong place"
            )
        return manifest

    def get_ref(self, ref: str) -> Manifest:
        stage, key = split_ref(ref)
        manifest = self.get(stage, key)
        if manifest is None:
            raise NotCommitted(
                f"{ref!r} is not committed in {self.uri}; `fewstep status --store {self.uri}` lists what is"
            )
        return manifest

    def list_manifests(self, stage: str | None = None) -> list[Manifest]:
        """Every committed manifest (of one stage, if given), oldest first."""
        base = (
            self.backend.join("stages")
            if stage is None
            else self.backend.join("stages", check_segment(stage, "stage name"))
        )
        depth = 3 if stage is None else 2  # stage/key/manifest.json or key/manifest.json
        found = [rel.split("/") for rel in self.backend.list_files(base)]
        refs = [
            (parts[0], parts[1]) if stage is None else (stage, parts[0])
            for parts in found
            if len(parts) == depth and parts[-1] == MANIFEST
        ]
        with ThreadPoolExecutor(VERIFY_THREADS) as pool:
            manifests = [m for m in pool.map(lambda sk: self.get(*sk), refs) if m is not None]
        return sorted(manifests, key=lambda m: (m.created_at, m.ref))

    # -- writing ------------------------------------------------------------------------------

    def begin(
        self,
        stage: str,
        key: str,
        *,
        config: Mapping[str, Any],
        inputs: Sequence[Manifest] = (),
        code_version: str | None = None,
    ) -> StageWriter:
        return StageWriter(self, stage, key, config=config, inputs=inputs, code_version=code_version)

    # -- reading (always verified) ------------------------------------------------------------

    def _entry(self, manifest: Manifest, name: str) -> FileEntry:
        try:
            return manifest.files[name]
        except KeyError:
            raise NotCommitted(f"{manifest.ref} has no file {name!r}; its files are {sorted(manifest.files)}") from None

    def _members(self, manifest: Manifest, name: str) -> list[tuple[str, FileEntry]]:
        members = sorted((n, e) for n, e in manifest.files.items() if n.startswith(name.rstrip("/") + "/"))
        if not members:
            raise NotCommitted(f"{manifest.ref} has no file or folder {name!r}; its files are {sorted(manifest.files)}")
        return members

    def _read_entry(self, manifest: Manifest, name: str, entry: FileEntry) -> bytes:
        folder = self.stage_dir(manifest.stage, manifest.key)
        remedy = f"the output is damaged: delete {folder} and re-run the stage"
        return read_checked(self.backend, manifest.ref, name, f"{folder}/{entry.path}", entry, remedy)

    def read_bytes(self, manifest: Manifest, name: str) -> bytes:
        return self._read_entry(manifest, name, self._entry(manifest, name))

    def read_json(self, manifest: Manifest, name: str) -> Any:
        return json.loads(self.read_bytes(manifest, name))

    def read_table(self, manifest: Manifest, name: str, columns: Sequence[str] | None = None) -> pa.Table:
        """A Parquet file of the manifest, or every ``*.parquet`` under folder ``name`` concatenated."""
        if name in manifest.files:
            parts = [(name, manifest.files[name])]
        else:
            parts = [(n, e) for n, e in self._members(manifest, name) if n.endswith(".parquet")]
        tables = [parquet_bytes_to_table(self._read_entry(manifest, n, e)) for n, e in parts]
        table = tables[0] if len(tables) == 1 else pa.concat_tables(tables)
        return table.select(list(columns)) if columns is not None else table

    def read_tensors(self, manifest: Manifest, name: str) -> dict[str, Any]:
        from infra.weights import tensors_from_bytes  # torch is imported only when tensors are

        return tensors_from_bytes(self.read_bytes(manifest, name), f"file {name!r} of {manifest.ref}")

    def load_model(self, manifest: Manifest, name: str, *, build: Callable[[dict], Any] | None = None):
        """Rebuild the module saved by ``write_model(name, ...)``: ``name.json`` spec + ``name`` weights."""
        from infra.weights import build_and_load

        spec = self.read_json(manifest, f"{name}.json")
        return build_and_load(spec, self.read_tensors(manifest, name), f"model {name!r} of {manifest.ref}", build)

    def verify(self, manifest: Manifest, names: Sequence[str] | None = None) -> None:
        """Stream and check every file (or ``names``): for data that Ray reads via :meth:`file_path`."""
        base = self.stage_dir(manifest.stage, manifest.key)
        entries = [(n, self._entry(manifest, n)) for n in (names or manifest.files)]

        def check(item: tuple[str, FileEntry]) -> None:
            name, entry = item
            path = f"{base}/{entry.path}"
            try:
                size, digest = self.backend.hash_file(path)
            except FileNotFoundError:
                raise IntegrityError(
                    f"file {name!r} of {manifest.ref} is missing at {path}; delete {base} and re-run the stage"
                ) from None
            check_file(manifest.ref, name, path, entry, size, digest)

        with ThreadPoolExecutor(VERIFY_THREADS) as pool:
            list(pool.map(check, entries))

    def verified_paths(self, manifest: Manifest, name: str) -> list[str]:
        """The paths, inside ``fs``/``pa_filesystem``, of file ``name`` or of every file under folder
        ``name``, each streamed and checked (size + sha256) against the manifest first: what to hand
        to ``ray.data.read_parquet(paths, filesystem=store.pa_filesystem)``. A corrupt, truncated or
        missing file raises :class:`IntegrityError` naming it, before any engine reads a byte."""
        names = [name] if name in manifest.files else [member for member, _ in self._members(manifest, name)]
        self.verify(manifest, names)
        base = self.stage_dir(manifest.stage, manifest.key)
        return [f"{base}/{manifest.files[member].path}" for member in names]

    # -- checkpoints ----------------------------------------------------------------------------

    def checkpoints(self, stage: str, key: str, code_version: str | None = None) -> CheckpointStore:
        return CheckpointStore(
            self.backend,
            check_segment(stage, "stage name"),
            check_segment(key, "stage key"),
            code_version or CODE_VERSION,
        )


class StageWriter:
    """Writes one attempt of a stage output; :meth:`commit` makes it visible (see module docstring).

    Use as a context manager. Leaving the block by an exception leaves only the attempt
    folder, which no reader sees and ``fewstep gc`` removes.
    """

    def __init__(
        self,
        store: Store,
        stage: str,
        key: str,
        *,
        config: Mapping[str, Any],
        inputs: Sequence[Manifest],
        code_version: str | None = None,
    ):
        self.store = store
        self.code_version = code_version or CODE_VERSION
        self.stage, self.key = check_segment(stage, "stage name"), check_segment(key, "stage key")
        self.config = to_jsonable(dict(config), "config")
        self.inputs = list(inputs)
        self.attempt = new_attempt_id()
        self.prefix = f"{store.stage_dir(stage, key)}/attempts/{self.attempt}"
        store.backend.make_dirs(self.prefix)  # so other writers (pyarrow, Ray Data) can write into it
        self._files: dict[str, tuple[str, int | None, str | None]] = {}  # name -> (relative path, size, sha256)
        self._result: Manifest | None = None

    @property
    def ref(self) -> str:
        return f"{self.stage}/{self.key}"

    def __enter__(self) -> StageWriter:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if kind is None and self._result is None:
            raise StoreError(
                f"the writer of {self.ref} was closed without commit(); call writer.commit(metrics) in the with-block"
            )

    # -- files ----------------------------------------------------------------------------------

    def _claim(self, name: str, path: str) -> None:
        check_relative_path(name, "file name")
        check_relative_path(path, "file path")
        if self._result is not None:
            raise StoreError(f"{self.ref} is already committed; start a new writer to change it")
        taken = {p for p, _, _ in self._files.values()}
        if name in self._files or path in taken:
            raise InvalidName(
                f"{self.ref} already has a file named {name!r} or stored at {path!r}; names must be unique"
            )

    def _put(self, name: str, path: str, data: bytes) -> None:
        self._claim(name, path)
        self.store.backend.write_bytes(f"{self.prefix}/{path}", data)
        self._files[name] = (path, len(data), sha256_hex(data))

    def _produced_by(self) -> dict[str, str]:
        return {"fewstep.ref": self.ref, "fewstep.code_version": self.code_version}

    def write_bytes(self, name: str, data: bytes) -> None:
        self._put(name, name, bytes(data))

    def write_json(self, name: str, obj: Any) -> None:
        """Stored as ``name.json``; read back with ``read_json(manifest, name)``."""
        self._put(
            name, with_suffix(name, ".json"), json.dumps(to_jsonable(obj, name), indent=2, sort_keys=True).encode()
        )

    def write_table(self, name: str, table: pa.Table, metadata: Mapping[str, str] | None = None) -> None:
        """Stored as ``name.parquet``; the schema metadata records the producing ref and code version."""
        table = with_metadata(table, {**self._produced_by(), **dict(metadata or {})})
        self._put(name, with_suffix(name, ".parquet"), table_to_parquet_bytes(table))

    def write_tensors(self, name: str, tensors: Mapping[str, Any], metadata: Mapping[str, Any] | None = None) -> None:
        """Stored as ``name.safetensors``."""
        from infra.weights import tensors_to_bytes

        self._put(
            name,
            with_suffix(name, ".safetensors"),
            tensors_to_bytes(tensors, {**self._produced_by(), **dict(metadata or {})}),
        )

    def write_model(self, name: str, model: Any, spec: Mapping[str, Any]) -> None:
        """Weights as ``name.safetensors`` (file ``name``) and the spec as ``name.json`` (file ``name.json``);
        "module." / "_orig_mod." wrapper prefixes are stripped."""
        from infra.weights import SPEC_METADATA_KEY, check_spec, model_state, tensors_to_bytes

        spec = check_spec(dict(spec))
        self._claim(f"{name}.json", f"{name}.json")
        weights = tensors_to_bytes(
            model_state(model), {**self._produced_by(), SPEC_METADATA_KEY: json.dumps(spec, sort_keys=True)}
        )
        self._put(name, with_suffix(name, ".safetensors"), weights)
        self._put(f"{name}.json", f"{name}.json", json.dumps(spec, indent=2, sort_keys=True).encode())

    def add_files(self, names: Sequence[str]) -> None:
        """Include files someone else wrote under :attr:`prefix` (e.g. Ray Data ``write_parquet``);
        a folder name adds every file below it that this writer does not hold yet (one it wrote
        or copied there itself). Their digests are taken at commit."""
        for name in names:
            name = name.strip("/")
            found = self.store.backend.list_files(f"{self.prefix}/{name}")
            if not found:  # a single file
                self._claim(name, name)
                self._files[name] = (name, None, None)
                continue
            for rel in sorted(found):
                if f"{name}/{rel}" in self._files:
                    continue
                self._claim(f"{name}/{rel}", f"{name}/{rel}")
                self._files[f"{name}/{rel}"] = (f"{name}/{rel}", None, None)

    def copy_from(self, manifest: Manifest, name: str, as_name: str | None = None) -> None:
        """Copy file ``name`` of a committed output into this one (as ``as_name``), inside the
        store (server-side on S3). The copy must match the manifest's size and sha256 at commit,
        so a damaged source fails the commit instead of being carried on."""
        entry = self.store._entry(manifest, name)
        target = as_name or name
        self._claim(target, target)
        source = f"{self.store.stage_dir(manifest.stage, manifest.key)}/{entry.path}"
        self.store.backend.copy(source, f"{self.prefix}/{target}")
        self._files[target] = (target, entry.size, entry.sha256)

    # -- commit ---------------------------------------------------------------------------------

    def _verified_entries(self) -> dict[str, FileEntry]:
        """Read every file back: sizes and digests must match what was written (or be taken now)."""
        backend = self.store.backend

        def check(item):
            name, (path, size, digest) = item
            full = f"{self.prefix}/{path}"
            try:
                got_size, got_digest = backend.hash_file(full)
            except FileNotFoundError:
                raise IntegrityError(
                    f"file {name!r} of {self.ref} was not found at {full} when committing; write it before commit()"
                ) from None
            if size is not None and (got_size, got_digest) != (size, digest):
                raise IntegrityError(
                    f"file {name!r} of {self.ref} at {full} changed between write and commit "
                    f"({got_size} bytes, sha256 {got_digest[:12]}…); re-run the stage"
                )
            return name, FileEntry(path=f"attempts/{self.attempt}/{path}", size=got_size, sha256=got_digest)

        with ThreadPoolExecutor(VERIFY_THREADS) as pool:
            return dict(pool.map(check, self._files.items()))

    def commit(self, metrics: Mapping[str, Any] | None = None) -> Manifest:
        """Verify every file, then publish ``manifest.json`` exclusively. Returns the manifest that
        is committed under this key: ours, or the one another writer committed first."""
        if self._result is not None:
            return self._result
        manifest = Manifest.build(
            stage=self.stage,
            key=self.key,
            files=self._verified_entries(),
            config=self.config,
            inputs=self.inputs,
            metrics=metrics,
            code_version=self.code_version,
        )
        # The data must be on disk before the manifest that vouches for it (a no-op on S3).
        self.store.backend.make_durable(f"{self.prefix}/{path}" for path, _, _ in self._files.values())
        path = f"{self.store.stage_dir(self.stage, self.key)}/{MANIFEST}"
        self.store.backend.create_exclusive(path, manifest.to_json())
        # Read back whoever won (a lost race returns False; the winner's manifest is the answer).
        committed = self.store.get(self.stage, self.key)
        if committed is None:
            raise StoreError(f"{path} vanished right after it was committed; something else is deleting the store")
        self._result = committed
        return committed
