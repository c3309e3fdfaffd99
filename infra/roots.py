"""The records ``fewstep gc`` keeps outputs for: pointers, pins and pipeline runs.

    pointers/{name}.json   {"ref": "stage/key", "updated_at", ...}: what promotion moves and Serve follows;
                           promotion adds what serving needs to know about the ref (``guidance``)
    pins/{name}.json       {"ref", "pinned_at", "heartbeat_at", "host", "pid"}: a model a process serves
    runs/{run_id}.json     {"run_id", "status", "refs", "info", "started_at", "heartbeat_at", ...}

Every ref these name, and everything it was built from, is a gc root.

- Pointers move by compare-and-swap (:meth:`RootRecords.put_pointer` with ``expect``): locally
  under an ``flock``, on S3 with ``If-Match`` on the ETag read. Two promotions that read the same
  pointer cannot both win.
- Pins never expire: a crashed server's model is cheap to keep and costly to lose; ``unpin``
  (or deleting the file) releases it.
- Runs are recorded at their start (``begin_run``), beat while they go (``heartbeat_run`` every
  :data:`RUN_HEARTBEAT_S`, or :meth:`RootRecords.keep_alive` from a thread) and are closed by
  ``finish_run``. While a run's heartbeat is younger than :data:`RUN_STALE_S` gc collects
  nothing it could use or be writing.

A hand-broken record is never fatal to the commands that list them: ``scan_*`` return the
readable records and, apart, {name: why} for the others; ``list_*`` raise an IntegrityError
naming the first broken one.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from infra.errors import IntegrityError, NotCommitted, PointerMoved, StoreError
from infra.manifest import check_relative_path, check_segment, parse_utc, split_ref, to_jsonable, utc_now

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


class RootRecords:
    """Pointers, pins and run records; mixed into :class:`infra.store.Store`, whose ``backend``
    and ``get_ref`` it uses."""

    _run_lock = threading.Lock()  # one writer of run records at a time in this process (heartbeat thread)

    def _named_json(self, folder: str, name: str) -> str:
        parts = check_relative_path(name, f"{folder[:-1]} name").split("/")
        return self.backend.join(folder, *[check_segment(p, f"{folder[:-1]} name part") for p in parts]) + ".json"

    def _scan_json(self, folder: str, check: Callable[[str, Any], Any]) -> tuple[dict[str, Any], dict[str, str]]:
        """Every ``folder/**/NAME.json`` as {NAME: check(NAME, parsed)}, and {NAME: why} for the files
        that cannot be read or fail ``check`` (hand-edited, truncated): listed, never fatal."""
        base = self.backend.join(folder)
        names = sorted(
            rel[: -len(".json")]
            for rel in self.backend.list_files(base)
            if rel.endswith(".json") and not rel.rsplit("/", 1)[-1].startswith(".")
        )
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

    def put_pointer(
        self, name: str, ref: str, *, expect: str | None = ANY, about: Mapping[str, Any] | None = None
    ) -> None:
        """Point ``name`` (e.g. ``serving/current``) at a committed ref, atomically.

        ``about``: JSON-able facts about ``ref`` written in the same record, so they move with it
        (promotion records the served guidance scale); :meth:`pointer_record` reads them back.

        ``expect`` makes the move a compare-and-swap: the ref the caller read and decided on
        (``None``: the pointer must not exist yet). If the pointer moved meanwhile, nothing is
        written and :class:`PointerMoved` says where it points now. Locally the swap holds an
        ``flock``; on S3 it is a PUT with ``If-Match`` on the ETag read (``If-None-Match: *`` when
        absent). The default ``ANY`` replaces whatever is there."""
        self.get_ref(ref)
        path = self._named_json("pointers", name)
        facts = dict(about or {})
        clash = sorted(set(facts) & {"ref", "updated_at"})
        if clash:
            raise ValueError(f"pointer facts {clash} would overwrite the pointer's own fields; name them otherwise")
        body = json.dumps({**to_jsonable(facts, "pointer"), "ref": ref, "updated_at": utc_now()}, indent=2).encode()
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
            raise IntegrityError(
                f"pointer {name!r} at {path} is not a valid pointer ({error}); fix it, or delete it and promote again"
            ) from None

    def get_pointer(self, name: str) -> str | None:
        """The ref ``name`` points at, or None; a hand-broken pointer file is an :class:`IntegrityError`."""
        path = self._named_json("pointers", name)
        try:
            data = self.backend.read_bytes(path)
        except FileNotFoundError:
            return None
        return self._parse_pointer(name, path, data)

    def pointer_record(self, name: str) -> dict[str, Any] | None:
        """The whole record of pointer ``name`` (its ref, ``updated_at`` and the facts written with
        it), or None when unset; a hand-broken pointer file is an :class:`IntegrityError`."""
        path = self._named_json("pointers", name)
        try:
            data = self.backend.read_bytes(path)
        except FileNotFoundError:
            return None
        self._parse_pointer(name, path, data)
        return json.loads(data)

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
        body = {
            "ref": ref,
            "pinned_at": utc_now(),
            "heartbeat_at": utc_now(),
            "host": socket.gethostname(),
            "pid": os.getpid(),
        }
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

    def _read_run(self, run_id: str) -> dict[str, Any] | None:
        path = self._named_json("runs", run_id)
        try:
            return self._run_record(run_id, json.loads(self.backend.read_bytes(path)))
        except FileNotFoundError:
            return None
        except (ValueError, TypeError, StoreError) as error:
            raise IntegrityError(f"run record {path} is not valid ({error}); fix or delete that file") from None

    def _write_run(self, run_id: str, body: Mapping[str, Any]) -> None:
        self.backend.replace(self._named_json("runs", run_id), json.dumps(body, indent=2, sort_keys=True).encode())

    def begin_run(self, run_id: str, info: Mapping[str, Any] | None = None) -> None:
        """Record a pipeline run at its start: status ``running``, heartbeat now, no refs yet. While
        its heartbeat is fresh ``fewstep gc`` collects nothing a run could use or be writing."""
        now = utc_now()
        body = {
            "run_id": run_id,
            "status": RUNNING,
            "refs": {},
            "info": to_jsonable(dict(info or {}), "info"),
            "started_at": now,
            "heartbeat_at": now,
            "created_at": now,
        }
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
            for ref in (refs or {}).values():
                self.get_ref(ref)
            body["heartbeat_at"] = utc_now()
            body["refs"] = {**body.get("refs", {}), **dict(refs or {})}
            self._write_run(run_id, body)

    def finish_run(
        self, run_id: str, refs: Mapping[str, str], info: Mapping[str, Any] | None = None, *, status: str = FINISHED
    ) -> None:
        """Record the refs a run produced and its end (``finished`` or ``failed``); ``fewstep gc``
        keeps everything a run record reaches. Works without :meth:`begin_run` too."""
        if status not in (FINISHED, FAILED):
            raise ValueError(f"finish_run(status={status!r}): use {FINISHED!r} or {FAILED!r}")
        for ref in refs.values():
            self.get_ref(ref)
        with self._run_lock:
            try:
                previous = self._read_run(run_id) or {}
            except IntegrityError as error:  # the run's own record, broken by hand: write it whole again
                log.warning("%s; replacing it with the finished run's record", error)
                previous = {}
            now = utc_now()
            body = {
                "run_id": run_id,
                "status": status,
                "refs": dict(refs),
                "info": to_jsonable({**previous.get("info", {}), **dict(info or {})}, "info"),
                "started_at": previous.get("started_at", now),
                "heartbeat_at": now,
                "finished_at": now,
                "created_at": previous.get("created_at", now),
            }
            self._write_run(run_id, body)

    def record_run(
        self, run_id: str, refs: Mapping[str, str], info: Mapping[str, Any] | None = None, *, status: str = FINISHED
    ) -> None:
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
