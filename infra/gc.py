"""What ``fewstep gc`` may delete, and the rules that keep it from deleting anything still needed.

Every deletion rule sits beside the roots it checks, so that gc's safety can be judged in one read.

What it collects:

- staging: attempt folders no manifest points to (a crashed writer, a writer that lost the
  commit race);
- checkpoints: those of a stage whose output is committed, and uncommitted or unreferenced
  step attempts;
- unreferenced: committed outputs that no pointer, pin or run record reaches, following each
  manifest's inputs;
- temp: ``.NAME.<hex>.tmp`` files an atomic write left when its process died.

The rules (DESIGN §4, "gc fails closed"):

1. Fail closed. If any manifest, pointer, pin or run record cannot be read (a damaged file, or
   S3 still failing after its retries), nothing is unreferenced: the lineage or the roots that
   would prove an output dead are unknown. The unreadable entries are listed. An unreadable
   run record also stops staging and checkpoint collection: it may be a running run.
2. Running runs are roots of everything. While a run record's heartbeat is younger than
   ``run_stale_s`` the run may reuse any committed output (a cache hit) and be writing any
   attempt, so only temp files are collected.
3. Pointers, pins (``fewstep serve --model REF``) and the refs of every run record are roots.
4. Ages come from the newest file (a stage writing for hours stays young while it writes),
   and from the manifest's time for committed outputs; nothing younger than ``min_age_s`` goes.
5. ``min_age_s`` below :data:`MIN_AGE_FLOOR_S` is refused.
6. :func:`apply_gc` plans again right before deleting, deletes only what both plans list, and
   re-checks each item just before its delete (a stage that committed meanwhile is kept). A
   committed output loses its manifest before its files, so it is never half-visible.

Ages on S3 use the server's LastModified against this machine's clock: keep them within
minutes of each other (the floor is 15 minutes).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime

from infra.backends import FileInfo, is_temp_name
from infra.errors import GcRefused, StoreError
from infra.manifest import MANIFEST, Manifest, attempt_time, parse_utc
from infra.roots import RUN_STALE_S, RUNNING
from infra.store import Store

STAGING, CHECKPOINTS, UNREFERENCED, TEMP = "staging", "checkpoints", "unreferenced", "temp"
DEFAULT_MIN_AGE_S = 3600.0
MIN_AGE_FLOOR_S = 900.0  # a stage writes a file at least this often, or it is a run's to protect
ROOT_FOLDERS = ("pointers", "pins", "runs")


def clock() -> datetime:
    """Now, in UTC (one place, so a test can move time forward)."""
    return datetime.now(UTC)


@dataclass(frozen=True)
class Garbage:
    kind: str  # STAGING, CHECKPOINTS, UNREFERENCED or TEMP
    path: str  # inside store.fs
    size: int  # bytes
    reason: str
    ref: str = ""  # the stage/key it belongs to (not for TEMP)
    attempt: str = ""  # STAGING and CHECKPOINTS attempts
    step: str = ""  # CHECKPOINTS attempts: "step-00000010"


@dataclass(frozen=True)
class GcPlan:
    items: tuple[Garbage, ...]
    roots: tuple[str, ...]  # refs named by pointers, pins and run records
    damaged: tuple[str, ...]  # "what: why" for every record that could not be read (never deleted)
    running: tuple[str, ...] = ()  # ids of runs whose heartbeat is fresh
    notes: tuple[str, ...] = ()  # why some kinds of garbage were not looked for
    min_age_s: float = DEFAULT_MIN_AGE_S
    run_stale_s: float = RUN_STALE_S

    @property
    def size(self) -> int:
        return sum(item.size for item in self.items)

    @property
    def note(self) -> str:
        return "; ".join(self.notes)


@dataclass(frozen=True)
class GcResult:
    removed: tuple[Garbage, ...]
    kept: tuple[tuple[Garbage, str], ...]  # (item, why it was kept after all)

    @property
    def size(self) -> int:
        return sum(item.size for item in self.removed)


@dataclass
class _Files:
    size: int = 0
    newest: float = float("-inf")  # epoch seconds of the newest file

    def add(self, info: FileInfo) -> None:
        self.size += info.size
        self.newest = max(self.newest, info.modified)


@dataclass
class _Unit:
    """One stages/{stage}/{key} or checkpoints/.../step-n folder as listed."""

    committed: bool = False
    attempts: dict[str, _Files] = field(default_factory=lambda: defaultdict(_Files))
    all: _Files = field(default_factory=_Files)

    def add(self, rel_parts: list[str], info: FileInfo) -> None:
        self.all.add(info)
        if rel_parts == [MANIFEST]:
            self.committed = True
        elif len(rel_parts) >= 2 and rel_parts[0] == "attempts":
            self.attempts[rel_parts[1]].add(info)


def _attempt_age_s(attempt: str, files: _Files, now_s: float) -> float:
    """Seconds since the attempt last wrote a file (never older than its start says)."""
    started = attempt_time(attempt)
    newest = max(files.newest, started.timestamp() if started else float("-inf"))
    return now_s - newest


def _committed_age_s(manifest: Manifest, now_s: float) -> float:
    created = parse_utc(manifest.created_at)
    return float("inf") if created is None else now_s - created.timestamp()


def _hours(seconds: float) -> str:
    return "of unknown age" if seconds == float("inf") else f"{seconds / 3600:.1f} h old"


def _used_attempts(files) -> set[str]:
    return {entry.path.split("/")[1] for entry in files.values() if entry.path.startswith("attempts/")}


def load_manifests(store: Store) -> tuple[dict[str, Manifest], dict[str, str]]:
    """Every committed manifest by ref, and {ref: why} for those that cannot be read or checked
    (damaged, or S3 still failing after retries)."""
    manifests: dict[str, Manifest] = {}
    damaged: dict[str, str] = {}
    for rel in store.backend.list_files(store.backend.join("stages")):
        parts = rel.split("/")
        if len(parts) == 3 and parts[2] == MANIFEST:
            ref = f"{parts[0]}/{parts[1]}"
            try:
                manifest = store.get(parts[0], parts[1])
            except (StoreError, OSError) as error:
                damaged[ref] = str(error) or type(error).__name__
                continue
            if manifest is not None:
                manifests[ref] = manifest
    return manifests, damaged


def live_refs(manifests: dict[str, Manifest], roots: list[str]) -> set[str]:
    """Every ref reachable from ``roots`` through manifests' inputs."""
    live: set[str] = set()
    todo = list(roots)
    while todo:
        ref = todo.pop()
        if ref in live:
            continue
        live.add(ref)
        if ref in manifests:
            todo.extend(manifests[ref].inputs)
    return live


@dataclass(frozen=True)
class _Roots:
    roots: tuple[str, ...]
    running: tuple[str, ...]
    damaged: dict[str, str]  # "pointer NAME" / "pin NAME" / "run NAME" -> why
    runs_unreadable: bool


def _scan_roots(store: Store, now_s: float, run_stale_s: float) -> _Roots:
    pointers, bad_pointers = store.scan_pointers()
    pins, bad_pins = store.scan_pins()
    runs, bad_runs = store.scan_runs()
    running = []
    for run in runs:
        beat = parse_utc(run.get("heartbeat_at", ""))
        if run["status"] == RUNNING and beat is not None and now_s - beat.timestamp() < run_stale_s:
            running.append(run["run_id"])
    roots = set(pointers.values()) | {pin["ref"] for pin in pins.values()}
    roots |= {ref for run in runs for ref in run.get("refs", {}).values()}
    damaged = {
        **{f"pointer {n}": why for n, why in bad_pointers.items()},
        **{f"pin {n}": why for n, why in bad_pins.items()},
        **{f"run {n}": why for n, why in bad_runs.items()},
    }
    return _Roots(tuple(sorted(roots)), tuple(running), damaged, bool(bad_runs))


def _check_min_age(min_age_s: float) -> None:
    if not min_age_s >= MIN_AGE_FLOOR_S:
        raise GcRefused(
            f"a minimum age of {min_age_s / 3600:g} h is below the floor of {MIN_AGE_FLOOR_S / 3600:g} h: gc would "
            f"delete files a stage may still be writing; use --min-age-hours {MIN_AGE_FLOOR_S / 3600:g} or more"
        )


def plan_gc(
    store: Store, *, min_age_s: float = DEFAULT_MIN_AGE_S, run_stale_s: float = RUN_STALE_S, now: datetime | None = None
) -> GcPlan:
    """List what may be deleted now (see the module docstring); deletes nothing."""
    _check_min_age(min_age_s)
    now_s = (now or clock()).timestamp()
    backend = store.backend
    manifests, bad_manifests = load_manifests(store)
    found = _scan_roots(store, now_s, run_stale_s)
    damaged = {**{f"manifest {ref}": why for ref, why in bad_manifests.items()}, **found.damaged}

    notes: list[str] = []
    if found.running:
        notes.append(
            f"run {', '.join(found.running)} is running (heartbeat within {run_stale_s / 60:g} min): "
            "no output, attempt or checkpoint is collected while a run goes, since it may use or be writing any"
        )
    if found.runs_unreadable:
        notes.append(
            "a run record cannot be read (see damaged): it may be a running run, so no output, attempt or "
            "checkpoint is collected"
        )
    quiet = not found.running and not found.runs_unreadable  # nobody may be writing or about to reuse

    unreferenced: set[str] = set()
    if quiet and damaged:
        notes.append(
            f"nothing is treated as unreferenced: {len(damaged)} record(s) cannot be read (listed as damaged), "
            "so what they reach is unknown; fix or delete them and run gc again"
        )
    elif quiet and not found.roots:
        notes.append(
            "no pointer, pin or run record names any output, so no committed output is treated as unreferenced"
        )
    elif quiet:
        unreferenced = {
            ref
            for ref in set(manifests) - live_refs(manifests, list(found.roots))
            if _committed_age_s(manifests[ref], now_s) >= min_age_s
        }

    items: list[Garbage] = []
    temps: list[tuple[str, FileInfo]] = []

    # -- stage outputs --------------------------------------------------------------------
    stages: dict[str, _Unit] = defaultdict(_Unit)
    for rel, info in backend.list_info(backend.join("stages")).items():
        parts = rel.split("/")
        if is_temp_name(parts[-1]):
            temps.append((backend.join("stages", rel), info))
        elif len(parts) >= 3:
            stages[f"{parts[0]}/{parts[1]}"].add(parts[2:], info)
    for ref, unit in sorted(stages.items()):
        if not quiet or ref in bad_manifests or ref in unreferenced:
            continue
        manifest = manifests.get(ref)
        if manifest is None and unit.committed:
            continue  # committed after load_manifests listed: its manifest is not known to this plan
        used = _used_attempts(manifest.files) if manifest else set()
        for attempt, files in sorted(unit.attempts.items()):
            age = _attempt_age_s(attempt, files, now_s)
            if attempt in used or age < min_age_s:
                continue
            why = "lost the commit race or was retried" if manifest else "never committed (crashed or abandoned)"
            items.append(
                Garbage(
                    STAGING,
                    f"{backend.join('stages', ref)}/attempts/{attempt}",
                    files.size,
                    f"attempt of {ref} {_hours(age)} (newest file), {why}",
                    ref=ref,
                    attempt=attempt,
                )
            )

    # -- checkpoints ----------------------------------------------------------------------
    steps: dict[tuple[str, str], _Unit] = defaultdict(_Unit)
    for rel, info in backend.list_info(backend.join("checkpoints")).items():
        parts = rel.split("/")
        if is_temp_name(parts[-1]):
            temps.append((backend.join("checkpoints", rel), info))
        elif len(parts) >= 4:
            steps[(f"{parts[0]}/{parts[1]}", parts[2])].add(parts[3:], info)
    by_stage: dict[str, list[tuple[str, _Unit]]] = defaultdict(list)
    for (ref, step), unit in steps.items():
        by_stage[ref].append((step, unit))
    for ref, stage_steps in sorted(by_stage.items()):
        if not quiet or ref in bad_manifests:
            continue
        if ref in manifests:
            newest = max(unit.all.newest for _, unit in stage_steps)
            if now_s - newest >= min_age_s:
                items.append(
                    Garbage(
                        CHECKPOINTS,
                        backend.join("checkpoints", ref),
                        sum(u.all.size for _, u in stage_steps),
                        f"checkpoints of {ref}, whose output is committed",
                        ref=ref,
                    )
                )
            continue
        checkpoints = store.checkpoints(*ref.split("/"))
        for step, unit in sorted(stage_steps):
            used: set[str] = set()
            if unit.committed:
                try:
                    used = _used_attempts(checkpoints.record(int(step.split("-")[1])).files)
                except (StoreError, ValueError, IndexError) as error:
                    damaged[f"checkpoint {ref} {step}"] = str(error)  # left to a person
                    continue
            for attempt, files in sorted(unit.attempts.items()):
                age = _attempt_age_s(attempt, files, now_s)
                if attempt not in used and age >= min_age_s:
                    items.append(
                        Garbage(
                            CHECKPOINTS,
                            f"{backend.join('checkpoints', ref, step)}/attempts/{attempt}",
                            files.size,
                            f"{'unreferenced' if unit.committed else 'uncommitted'} {step} attempt of {ref} {_hours(age)}",
                            ref=ref,
                            attempt=attempt,
                            step=step,
                        )
                    )

    for ref in sorted(unreferenced):
        items.append(
            Garbage(
                UNREFERENCED,
                backend.join("stages", ref),
                stages[ref].all.size,
                f"committed {ref} is reached by no pointer, pin or run record",
                ref=ref,
            )
        )

    # -- temp files of crashed atomic writes (never referenced by anything) -----------------
    for folder in ROOT_FOLDERS:
        for rel, info in backend.list_info(backend.join(folder)).items():
            if is_temp_name(rel.rsplit("/", 1)[-1]):
                temps.append((backend.join(folder, rel), info))
    for path, info in sorted(temps):
        age = now_s - info.modified
        if age >= min_age_s:
            items.append(Garbage(TEMP, path, info.size, f"temp file of a write that did not finish, {_hours(age)}"))

    return GcPlan(
        items=tuple(items),
        roots=found.roots,
        damaged=tuple(f"{what}: {why}" for what, why in sorted(damaged.items())),
        running=found.running,
        notes=tuple(notes),
        min_age_s=min_age_s,
        run_stale_s=run_stale_s,
    )


def _newest_age_s(store: Store, item: Garbage, now_s: float) -> float:
    """Seconds since anything under the item (or the item, for a temp file) was written."""
    if item.kind == TEMP:
        folder, name = item.path.rsplit("/", 1)
        files = {rel: info for rel, info in store.backend.list_info(folder).items() if rel == name}
    else:
        files = store.backend.list_info(item.path)
    return now_s - max((info.modified for info in files.values()), default=float("-inf"))


def _reaches(store: Store, roots: tuple[str, ...], ref: str, cache: dict[str, Manifest]) -> bool:
    """Whether ``ref`` is reachable from ``roots``, loading manifests as needed (an unreadable one raises)."""
    todo, seen = list(roots), set()
    while todo:
        current = todo.pop()
        if current == ref:
            return True
        if current in seen:
            continue
        seen.add(current)
        manifest = cache.get(current)
        if manifest is None:
            stage, _, key = current.partition("/")
            manifest = store.get(stage, key)
            if manifest is not None:
                cache[current] = manifest
        if manifest is not None:
            todo.extend(manifest.inputs)
    return False


def _still_garbage(store: Store, item: Garbage, plan: GcPlan, now_s: float, cache: dict[str, Manifest]) -> str | None:
    """Why ``item`` must be kept after all, looked at right before deleting it; None to delete."""
    found = _scan_roots(store, now_s, plan.run_stale_s)
    if found.running or found.runs_unreadable:
        return "a run started (or its record became unreadable) since the plan"
    if item.kind != UNREFERENCED and _newest_age_s(store, item, now_s) < plan.min_age_s:
        return "written to since the plan"
    if item.kind == STAGING:
        manifest = store.get(*item.ref.split("/"))
        if manifest is not None and item.attempt in _used_attempts(manifest.files):
            return f"{item.ref} committed this attempt since the plan"
    elif item.kind == CHECKPOINTS and item.step:
        checkpoints = store.checkpoints(*item.ref.split("/"))
        try:
            if item.attempt in _used_attempts(checkpoints.record(int(item.step.split("-")[1])).files):
                return f"{item.ref} {item.step} committed this attempt since the plan"
        except StoreError:
            pass  # still uncommitted
    elif item.kind == CHECKPOINTS:
        if store.get(*item.ref.split("/")) is None:
            return f"{item.ref} is no longer committed"
    elif item.kind == UNREFERENCED:
        if found.damaged:
            return "a pointer, pin or run record became unreadable since the plan"
        if _reaches(store, found.roots, item.ref, cache):
            return f"{item.ref} became reachable from a pointer, pin or run record since the plan"
    return None


def apply_gc(store: Store, plan: GcPlan, *, now: datetime | None = None) -> GcResult:
    """Delete what ``plan`` lists and a fresh plan still lists, each item re-checked right before
    its delete; a committed output loses its manifest before its files."""
    now_s = (now or clock()).timestamp()
    fresh = plan_gc(
        store, min_age_s=plan.min_age_s, run_stale_s=plan.run_stale_s, now=datetime.fromtimestamp(now_s, UTC)
    )
    current = {(item.kind, item.path): item for item in fresh.items}
    removed: list[Garbage] = []
    kept: list[tuple[Garbage, str]] = []
    cache: dict[str, Manifest] = {}  # a committed manifest never changes
    for item in plan.items:
        if (item.kind, item.path) not in current:
            kept.append((item, "no longer garbage when planned again"))
            continue
        try:
            why = _still_garbage(store, item, plan, now_s, cache)
        except (StoreError, OSError) as error:
            why = f"could not be re-checked ({error})"
        if why is not None:
            kept.append((item, why))
            continue
        if item.kind == UNREFERENCED:
            store.backend.remove(f"{item.path}/{MANIFEST}")
        store.backend.remove(item.path)
        removed.append(item)
    return GcResult(removed=tuple(removed), kept=tuple(kept))
