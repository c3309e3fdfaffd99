"""The artifact store: content-addressed stage outputs on a local folder or S3 (DESIGN §4).

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
import logging
import os
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping, Sequence
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
    PointerMoved,
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
    parse_utc,
    sha256_hex,
    stage_key,
    to_jsonable,
    utc_now,
)
from infra.tables import parquet_bytes_to_table, table_to_parquet_bytes, with_metadata
from infra.version import CODE_VERSION

__all__ = ["Store", "StageWriter", "Manifest", "FileEntry", "CheckpointStore", "DEFAULT_STORE"]

DEFAULT_STORE = "./fewstep-store"
VERIFY_THREADS = 8
log = logging.getLogger("fewstep.store")

# A running pipeline rewrites its run record this often; gc takes a run whose heartbeat is
# older than RUN_STALE_S for dead (ten missed beats: a slow store or a paused VM is not death).
RUN_HEARTBEAT_S = 60.0
RUN_STALE_S = 600.0
RUNNING, FINISHED, FAILED = "running", "finished", "failed"
RUN_STATUSES = (RUNNING, FINISHED, FAILED)


class _Any:
    def __repr__(self) -> str:
        return "ANY"


# ``put_pointer(..., expect=ANY)``: move the pointer whatever it points at now.
ANY: Any = _Any()


# The pointer promotion moves and the Serve app follows.
SERVING_POINTER = "serving/current"


def split_ref(ref: str) -> tuple[str, str]:
    stage, sep, key = ref.partition("/") if isinstance(ref, str) else ("", "", "")
    if not sep:
        raise InvalidName(f"ref {ref!r} is not 'stage/key' (e.g. 'vae/3f2a9c0d1e2b4a5c'); `fewstep status` lists them")
    return check_segment(stage, "stage name"), check_segment(key, "stage key")


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
            raise InvalidStoreURI(f"store URI {uri!r} names host {parsed.netloc!r}; write a local folder as file:///abs/path")
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


class Store:
    """Committed stage outputs, checkpoints and pointers under one root. See the module docstring."""

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
    ) -> "Store":
        """Open a store (``None`` -> ``./fewstep-store``). For S3, endpoint, region and keys default
        to the AWS environment variables; ``check`` lists the bucket once so a wrong bucket,
        credentials or endpoint fail here with a :class:`StoreError` that says what to fix."""
        return cls(open_backend(uri, endpoint_url=endpoint_url, region=region, access_key_id=access_key_id,
                                secret_access_key=secret_access_key, check=check))

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
            raise StoreError(f"files under {name!r} of {manifest.ref} lie in {len(folders)} folders; use file_path per file")
        return f"{base}/{folders.pop()}"

    # -- keys and manifests ------------------------------------------------------------------

    def stage_key(self, stage: str, config: Mapping[str, Any], inputs: Sequence[Manifest] = ()) -> str:
        """hash(stage, config, input manifest digests, CODE_VERSION): the content address."""
        return stage_key(stage, config, inputs, CODE_VERSION)

    def get(self, stage: str, key: str) -> Manifest | None:
        """The committed manifest of ``stage/key``, or None when there is none."""
        path = f"{self.stage_dir(stage, key)}/{MANIFEST}"
        try:
            data = self.backend.read_bytes(path)
        except FileNotFoundError:
            return None
        manifest = Manifest.from_json(data, f"manifest of {stage}/{key} at {path}")
        if (manifest.stage, manifest.key) != (stage, key):
            raise IntegrityError(f"{path} describes {manifest.ref}, not {stage}/{key}; it was copied to the wrong place")
        return manifest

    def get_ref(self, ref: str) -> Manifest:
        stage, key = split_ref(ref)
        manifest = self.get(stage, key)
        if manifest is None:
            raise NotCommitted(f"{ref!r} is not committed in {self.uri}; `fewstep status --store {self.uri}` lists what is")
        return manifest

    def list_manifests(self, stage: str | None = None) -> list[Manifest]:
        """Every committed manifest (of one stage, if given), oldest first."""
        base = self.backend.join("stages") if stage is None else self.backend.join("stages", check_segment(stage, "stage name"))
        depth = 3 if stage is None else 2  # stage/key/manifest.json or key/manifest.json
        found = [rel.split("/") for rel in self.backend.list_files(base)]
        refs = [(parts[0], parts[1]) if stage is None else (stage, parts[0])
                for parts in found if len(parts) == depth and parts[-1] == MANIFEST]
        with ThreadPoolExecutor(VERIFY_THREADS) as pool:
            manifests = [m for m in pool.map(lambda sk: self.get(*sk), refs) if m is not None]
        return sorted(manifests, key=lambda m: (m.created_at, m.ref))

    # -- writing ------------------------------------------------------------------------------

    def begin(self, stage: str, key: str, *, config: Mapping[str, Any], inputs: Sequence[Manifest] = ()) -> "StageWriter":
        return StageWriter(self, stage, key, config=config, inputs=inputs)

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
        path = f"{self.stage_dir(manifest.stage, manifest.key)}/{entry.path}"
        try:
            data = self.backend.read_bytes(path)
        except FileNotFoundError:
            raise IntegrityError(
                f"file {name!r} of {manifest.ref} is missing at {path}; the output is damaged: "
                f"delete {self.stage_dir(manifest.stage, manifest.key)} and re-run the stage"
            ) from None
        check_file(manifest.ref, name, path, entry, len(data), sha256_hex(data))
        return data

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
                raise IntegrityError(f"file {name!r} of {manifest.ref} is missing at {path}; delete {base} and re-run the stage") from None
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

    # -- checkpoints, pointers, runs, pins ----------------------------------------------------

    def checkpoints(self, stage: str, key: str) -> CheckpointStore:
        return CheckpointStore(self.backend, check_segment(stage, "stage name"), check_segment(key, "stage key"), CODE_VERSION)

    def _named_json(self, folder: str, name: str) -> str:
        parts = check_relative_path(name, f"{folder[:-1]} name").split("/")
        return self.backend.join(folder, *[check_segment(p, f"{folder[:-1]} name part") for p in parts]) + ".json"

    def _scan_json(self, folder: str, check: Callable[[str, Any], Any]) -> tuple[dict[str, Any], dict[str, str]]:
        """Every ``folder/**/NAME.json`` as {NAME: check(NAME, parsed)}, and {NAME: why} for the files
        that cannot be read or fail ``check`` (hand-edited, truncated): listed, never fatal."""
        base = self.backend.join(folder)
        names = sorted(rel[: -len(".json")] for rel in self.backend.list_files(base)
                       if rel.endswith(".json") and not rel.rsplit("/", 1)[-1].startswith("."))
        good: dict[str, Any] = {}
        damaged: dict[str, str] = {}
        for name in names:
            path = f"{base}/{name}.json"
            try:
                data = self.backend.read_bytes(path)
            except FileNotFoundError:  # removed since the listing
                continue
            except StoreError as error:
                damaged[name] = f"{path} could not be read ({error})"
                continue
            try:
                good[name] = check(name, json.loads(data))
            except (ValueError, TypeError, KeyError, StoreError) as error:
                damaged[name] = f"{path} is not a valid {folder[:-1]} record ({error}); fix or delete that file"
        return good, damaged

    # pointers

    @staticmethod
    def _pointer_ref(name: str, body: Any) -> str:
        if not isinstance(body, dict) or not isinstance(body.get("ref"), str):
            raise ValueError('expected a JSON object {"ref": "stage/key", ...}')
        split_ref(body["ref"])
        return body["ref"]

    def put_pointer(self, name: str, ref: str, *, expect: str | None = ANY) -> None:
        """Point ``name`` (e.g. ``serving/current``) at a committed ref, atomically.

        ``expect`` makes the move a compare-and-swap: the ref the caller read and decided on
        (``None``: the pointer must not exist yet). If the pointer moved meanwhile, nothing is
        written and :class:`PointerMoved` says where it points now. Locally the swap holds an
        ``flock``; on S3 it is a PUT with ``If-Match`` on the ETag read (``If-None-Match: *`` when
        absent). The default ``ANY`` replaces whatever is there."""
        self.get_ref(ref)
        path = self._named_json("pointers", name)
        body = json.dumps({"ref": ref, "updated_at": utc_now()}, indent=2).encode()
        if expect is ANY:
            self.backend.replace(path, body)
            return
        if expect is not None:
            split_ref(expect)
        seen: list[str | None] = []

        def matches(current: bytes | None) -> bool:
            found = None if current is None else self._parse_pointer(name, path, current)
            seen.append(found)
            return found == expect

        if not self.backend.compare_and_swap(path, body, matches):
            now = seen[-1] if seen else None
            if now == expect:  # it matched when read, then the conditional write lost: look again
                now = self.get_pointer(name)
            raise PointerMoved(
                f"pointer {name!r} points at {now or 'nothing'}, not at {expect or 'nothing'} as expected, so it was "
                f"not moved to {ref}: another process moved it meanwhile; read it again and decide again"
            )

    def _parse_pointer(self, name: str, path: str, data: bytes) -> str:
        try:
            return self._pointer_ref(name, json.loads(data))
        except (ValueError, TypeError, StoreError) as error:
            raise IntegrityError(f"pointer {name!r} at {path} is not a valid pointer ({error}); "
                                 f"fix it, or delete it and promote again") from None

    def get_pointer(self, name: str) -> str | None:
        """The ref ``name`` points at, or None; a hand-broken pointer file is an :class:`IntegrityError`."""
        path = self._named_json("pointers", name)
        try:
            data = self.backend.read_bytes(path)
        except FileNotFoundError:
            return None
        return self._parse_pointer(name, path, data)

    def scan_pointers(self) -> tuple[dict[str, str], dict[str, str]]:
        """({name: ref} of every readable pointer, {name: why} of the others)."""
        return self._scan_json("pointers", self._pointer_ref)

    def list_pointers(self) -> dict[str, str]:
        """{name: ref} of every pointer; an unreadable one is an :class:`IntegrityError` naming it."""
        pointers, damaged = self.scan_pointers()
        if damaged:
            raise IntegrityError(next(iter(damaged.values())))
        return pointers

    # pins

    def pin(self, name: str, ref: str) -> None:
        """Record that this process serves ``ref`` (``fewstep serve --model REF``): ``fewstep gc``
        keeps a pinned ref and everything it was built from until :meth:`unpin`. Pins never expire,
        since a crashed server's model is cheap to keep and costly to lose; calling ``pin`` again
        refreshes ``heartbeat_at``, which ``fewstep status`` shows."""
        self.get_ref(ref)
        body = {"ref": ref, "pinned_at": utc_now(), "heartbeat_at": utc_now(), "host": socket.gethostname(),
                "pid": os.getpid()}
        path = self._named_json("pins", name)
        try:
            previous = json.loads(self.backend.read_bytes(path))
            if isinstance(previous, dict) and previous.get("ref") == ref and isinstance(previous.get("pinned_at"), str):
                body["pinned_at"] = previous["pinned_at"]
        except (FileNotFoundError, ValueError):
            pass
        self.backend.replace(path, json.dumps(body, indent=2, sort_keys=True).encode())

    def unpin(self, name: str) -> None:
        """Remove pin ``name`` (missing is fine)."""
        self.backend.remove(self._named_json("pins", name))

    def scan_pins(self) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
        """({name: pin record} of every readable pin, {name: why} of the others)."""

        def check(name: str, body: Any) -> dict[str, Any]:
            self._pointer_ref(name, body)
            return body

        return self._scan_json("pins", check)

    def list_pins(self) -> dict[str, str]:
        """{name: ref} of every pin; an unreadable one is an :class:`IntegrityError` naming it."""
        pins, damaged = self.scan_pins()
        if damaged:
            raise IntegrityError(next(iter(damaged.values())))
        return {name: pin["ref"] for name, pin in pins.items()}

    # runs

    _run_lock = threading.Lock()  # one writer of run records at a time in this process (heartbeat thread)

    def _read_run(self, run_id: str) -> dict[str, Any] | None:
        try:
            return json.loads(self.backend.read_bytes(self._named_json("runs", run_id)))
        except FileNotFoundError:
            return None

    def _write_run(self, run_id: str, body: Mapping[str, Any]) -> None:
        self.backend.replace(self._named_json("runs", run_id), json.dumps(body, indent=2, sort_keys=True).encode())

    def begin_run(self, run_id: str, info: Mapping[str, Any] | None = None) -> None:
        """Record a pipeline run at its start: status ``running``, heartbeat now, no refs yet. While
        its heartbeat is fresh ``fewstep gc`` collects nothing a run could use or be writing."""
        now = utc_now()
        body = {"run_id": run_id, "status": RUNNING, "refs": {}, "info": to_jsonable(dict(info or {}), "info"),
                "started_at": now, "heartbeat_at": now, "created_at": now}
        with self._run_lock:
            self._write_run(run_id, body)

    def heartbeat_run(self, run_id: str, refs: Mapping[str, str] | None = None) -> None:
        """Refresh a running run's heartbeat (call every ``RUN_HEARTBEAT_S``), adding ``refs`` it
        has produced so far. A run that is no longer ``running`` is left as it is."""
        with self._run_lock:
            body = self._read_run(run_id)
            if body is None:
                raise NotCommitted(f"run {run_id!r} was not begun in {self.uri}; call begin_run first")
            if body.get("status") != RUNNING:
                return
            body["heartbeat_at"] = utc_now()
            if refs:
                body["refs"] = {**body.get("refs", {}), **dict(refs)}
            self._write_run(run_id, body)

    def finish_run(self, run_id: str, refs: Mapping[str, str], info: Mapping[str, Any] | None = None, *,
                   status: str = FINISHED) -> None:
        """Record the refs a run produced and its end (``finished`` or ``failed``); ``fewstep gc``
        keeps everything a run record reaches. Works without :meth:`begin_run` too."""
        if status not in (FINISHED, FAILED):
            raise ValueError(f"finish_run(status={status!r}): use {FINISHED!r} or {FAILED!r}")
        for ref in refs.values():
            self.get_ref(ref)
        with self._run_lock:
            previous = self._read_run(run_id) or {}
            now = utc_now()
            body = {"run_id": run_id, "status": status, "refs": dict(refs),
                    "info": to_jsonable({**previous.get("info", {}), **dict(info or {})}, "info"),
                    "started_at": previous.get("started_at", now), "heartbeat_at": now,
                    "finished_at": now, "created_at": previous.get("created_at", now)}
            self._write_run(run_id, body)

    def record_run(self, run_id: str, refs: Mapping[str, str], info: Mapping[str, Any] | None = None, *,
                   status: str = FINISHED) -> None:
        """Same as :meth:`finish_run` (the name the pipeline used before runs were recorded at start)."""
        self.finish_run(run_id, refs, info, status=status)

    @contextmanager
    def keep_alive(self, run_id: str, *, every_s: float = RUN_HEARTBEAT_S) -> Iterator[None]:
        """Heartbeat ``run_id`` from a daemon thread every ``every_s`` seconds for the duration of the
        block. A failed heartbeat is logged and tried again at the next beat; it never stops the run."""
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(every_s):
                try:
                    self.heartbeat_run(run_id)
                except Exception as error:  # noqa: BLE001 - a missed beat must not kill the pipeline
                    log.warning("heartbeat of run %s failed (%s); trying again in %.0fs", run_id, error, every_s)

        thread = threading.Thread(target=beat, name=f"fewstep-heartbeat-{run_id}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=every_s + 30)

    @staticmethod
    def _run_record(name: str, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict) or not isinstance(body.get("run_id"), str):
            raise ValueError('expected a JSON object with "run_id"')
        refs = body.get("refs", {})
        if not isinstance(refs, dict) or not all(isinstance(r, str) for r in refs.values()):
            raise ValueError('"refs" is not an object of stage refs')
        for ref in refs.values():
            split_ref(ref)
        status = body.setdefault("status", FINISHED)  # records written before runs had a status
        if status not in RUN_STATUSES:
            raise ValueError(f'"status" is {status!r}, not one of {RUN_STATUSES}')
        if status == RUNNING and parse_utc(body.get("heartbeat_at", "")) is None:
            raise ValueError(f'"heartbeat_at" {body.get("heartbeat_at")!r} is not a time')
        return body

    def scan_runs(self) -> tuple[list[dict[str, Any]], dict[str, str]]:
        """(every readable run record, oldest first; {run file name: why} of the others)."""
        runs, damaged = self._scan_json("runs", self._run_record)
        return sorted(runs.values(), key=lambda run: str(run.get("created_at", ""))), damaged

    def list_runs(self) -> list[dict[str, Any]]:
        """Every run record, oldest first; an unreadable one is an :class:`IntegrityError` naming it."""
        runs, damaged = self.scan_runs()
        if damaged:
            raise IntegrityError(next(iter(damaged.values())))
        return runs


class StageWriter:
    """Writes one attempt of a stage output; :meth:`commit` makes it visible (see module docstring).

    Use as a context manager. Leaving the block by an exception leaves only the attempt
    folder, which no reader sees and ``fewstep gc`` removes.
    """

    def __init__(self, store: Store, stage: str, key: str, *, config: Mapping[str, Any], inputs: Sequence[Manifest]):
        self.store = store
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

    def __enter__(self) -> "StageWriter":
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if kind is None and self._result is None:
            raise StoreError(f"the writer of {self.ref} was closed without commit(); call writer.commit(metrics) in the with-block")

    # -- files ----------------------------------------------------------------------------------

    def _claim(self, name: str, path: str) -> None:
        check_relative_path(name, "file name")
        check_relative_path(path, "file path")
        if self._result is not None:
            raise StoreError(f"{self.ref} is already committed; start a new writer to change it")
        taken = {p for p, _, _ in self._files.values()}
        if name in self._files or path in taken:
            raise InvalidName(f"{self.ref} already has a file named {name!r} or stored at {path!r}; names must be unique")

    def _put(self, name: str, path: str, data: bytes) -> None:
        self._claim(name, path)
        self.store.backend.write_bytes(f"{self.prefix}/{path}", data)
        self._files[name] = (path, len(data), sha256_hex(data))

    def _produced_by(self) -> dict[str, str]:
        return {"fewstep.ref": self.ref, "fewstep.code_version": CODE_VERSION}

    def write_bytes(self, name: str, data: bytes) -> None:
        self._put(name, name, bytes(data))

    def write_json(self, name: str, obj: Any) -> None:
        """Stored as ``name.json``; read back with ``read_json(manifest, name)``."""
        self._put(name, with_suffix(name, ".json"), json.dumps(to_jsonable(obj, name), indent=2, sort_keys=True).encode())

    def write_table(self, name: str, table: pa.Table, metadata: Mapping[str, str] | None = None) -> None:
        """Stored as ``name.parquet``; the schema metadata records the producing ref and code version."""
        table = with_metadata(table, {**self._produced_by(), **dict(metadata or {})})
        self._put(name, with_suffix(name, ".parquet"), table_to_parquet_bytes(table))

    def write_tensors(self, name: str, tensors: Mapping[str, Any], metadata: Mapping[str, Any] | None = None) -> None:
        """Stored as ``name.safetensors``."""
        from infra.weights import tensors_to_bytes

        self._put(name, with_suffix(name, ".safetensors"), tensors_to_bytes(tensors, {**self._produced_by(), **dict(metadata or {})}))

    def write_model(self, name: str, model: Any, spec: Mapping[str, Any]) -> None:
        """Weights as ``name.safetensors`` (file ``name``) and the spec as ``name.json`` (file ``name.json``);
        "module." / "_orig_mod." wrapper prefixes are stripped."""
        from infra.weights import SPEC_METADATA_KEY, check_spec, model_state, tensors_to_bytes

        spec = check_spec(dict(spec))
        self._claim(f"{name}.json", f"{name}.json")
        weights = tensors_to_bytes(model_state(model), {**self._produced_by(), SPEC_METADATA_KEY: json.dumps(spec, sort_keys=True)})
        self._put(name, with_suffix(name, ".safetensors"), weights)
        self._put(f"{name}.json", f"{name}.json", json.dumps(spec, indent=2, sort_keys=True).encode())

    def add_files(self, names: Sequence[str]) -> None:
        """Include files someone else wrote under :attr:`prefix` (e.g. Ray Data ``write_parquet``);
        a folder name adds every file below it. Their digests are taken at commit."""
        for name in names:
            name = name.strip("/")
            found = self.store.backend.list_files(f"{self.prefix}/{name}")
            if not found:  # a single file
                self._claim(name, name)
                self._files[name] = (name, None, None)
                continue
            for rel in sorted(found):
                self._claim(f"{name}/{rel}", f"{name}/{rel}")
                self._files[f"{name}/{rel}"] = (f"{name}/{rel}", None, None)

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
                raise IntegrityError(f"file {name!r} of {self.ref} was not found at {full} when committing; write it before commit()") from None
            if size is not None and (got_size, got_digest) != (size, digest):
                raise IntegrityError(f"file {name!r} of {self.ref} at {full} changed between write and commit "
                                     f"({got_size} bytes, sha256 {got_digest[:12]}…); re-run the stage")
            return name, FileEntry(path=f"attempts/{self.attempt}/{path}", size=got_size, sha256=got_digest)

        with ThreadPoolExecutor(VERIFY_THREADS) as pool:
            return dict(pool.map(check, self._files.items()))

    def commit(self, metrics: Mapping[str, Any] | None = None) -> Manifest:
        """Verify every file, then publish ``manifest.json`` exclusively. Returns the manifest that
        is committed under this key: ours, or the one another writer committed first."""
        if self._result is not None:
            return self._result
        manifest = Manifest.build(stage=self.stage, key=self.key, files=self._verified_entries(), config=self.config,
                                  inputs=self.inputs, metrics=metrics, code_version=CODE_VERSION)
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
