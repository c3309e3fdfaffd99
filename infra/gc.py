"""What ``fewstep gc`` may delete: staging leftovers, finished checkpoints, unreferenced outputs.

- staging: attempt folders no manifest points to (a crashed writer, a writer that lost the
  commit race), once older than ``min_age_s`` so a stage still running is left alone;
- checkpoints: those of a stage whose output is committed (it no longer needs them), and
  uncommitted or unreferenced step attempts older than ``min_age_s``;
- unreferenced: committed outputs that no pointer and no run record reaches, following
  each manifest's inputs. With no pointer and no run record at all nothing is called
  unreferenced (an empty root set would otherwise condemn the whole store).

:func:`plan_gc` only lists; :func:`apply_gc` deletes, a committed output's manifest first,
so nothing is ever half-visible.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone

from infra.errors import StoreError
from infra.manifest import MANIFEST, Manifest, attempt_time
from infra.store import Store

STAGING, CHECKPOINTS, UNREFERENCED = "staging", "checkpoints", "unreferenced"


@dataclass(frozen=True)
class Garbage:
    kind: str  # STAGING, CHECKPOINTS or UNREFERENCED
    path: str  # inside store.fs
    size: int  # bytes
    reason: str


@dataclass(frozen=True)
class GcPlan:
    items: tuple[Garbage, ...]
    roots: tuple[str, ...]  # refs named by pointers and run records
    damaged: tuple[str, ...]  # "stage/key: error" for manifests that fail to load (never deleted)
    note: str = ""

    @property
    def size(self) -> int:
        return sum(item.size for item in self.items)


@dataclass
class _Unit:
    """One stages/{stage}/{key} or checkpoints/.../step-n folder as listed: attempts and their sizes."""

    committed: bool = False
    attempts: dict[str, int] = field(default_factory=dict)
    size: int = 0

    def add(self, rel_parts: list[str], size: int) -> None:
        self.size += size
        if rel_parts == [MANIFEST]:
            self.committed = True
        elif len(rel_parts) >= 2 and rel_parts[0] == "attempts":
            self.attempts[rel_parts[1]] = self.attempts.get(rel_parts[1], 0) + size


def _age_s(attempt: str, now: datetime) -> float:
    started = attempt_time(attempt)
    return float("inf") if started is None else (now - started).total_seconds()


def _committed_age_s(manifest: Manifest, now: datetime) -> float:
    try:
        created = datetime.fromisoformat(manifest.created_at.replace("Z", "+00:00"))
    except ValueError:
        return float("inf")
    if created.tzinfo is None:
        created = created.replace(tzinfo=timezone.utc)
    return (now - created).total_seconds()


def _hours(seconds: float) -> str:
    return "of unknown age" if seconds == float("inf") else f"{seconds / 3600:.1f} h old"


def load_manifests(store: Store) -> tuple[dict[str, Manifest], dict[str, str]]:
    """Every committed manifest by ref, and the refs whose manifest fails to load with the reason."""
    manifests: dict[str, Manifest] = {}
    damaged: dict[str, str] = {}
    for rel in store.backend.list_files(store.backend.join("stages")):
        parts = rel.split("/")
        if len(parts) == 3 and parts[2] == MANIFEST:
            ref = f"{parts[0]}/{parts[1]}"
            try:
                manifest = store.get(parts[0], parts[1])
            except StoreError as error:
                damaged[ref] = str(error)
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


def plan_gc(store: Store, *, min_age_s: float = 3600.0, now: datetime | None = None) -> GcPlan:
    now = now or datetime.now(timezone.utc)
    backend = store.backend
    items: list[Garbage] = []
    manifests, damaged = load_manifests(store)

    # -- unreferenced outputs: not reachable from any pointer or run record -----------------
    roots = sorted(set(store.list_pointers().values()) | {ref for run in store.list_runs() for ref in run.get("refs", {}).values()})
    note = ""
    unreferenced: set[str] = set()
    if not roots:
        note = "no pointer or run record names any output, so no committed output is treated as unreferenced"
    else:
        # A run records its refs when it ends: outputs younger than min_age may belong to a
        # run still going (or one that will be re-run and resume), so they are not garbage yet.
        unreferenced = {ref for ref in set(manifests) - live_refs(manifests, roots)
                        if _committed_age_s(manifests[ref], now) >= min_age_s}

    # -- stage outputs --------------------------------------------------------------------
    stages: dict[str, _Unit] = defaultdict(_Unit)
    for rel, size in backend.list_files(backend.join("stages")).items():
        parts = rel.split("/")
        if len(parts) >= 3:
            stages[f"{parts[0]}/{parts[1]}"].add(parts[2:], size)
    for ref, unit in sorted(stages.items()):
        manifest = manifests.get(ref)
        used = {entry.path.split("/")[1] for entry in manifest.files.values()} if manifest else set()
        for attempt, size in sorted(unit.attempts.items()):
            age = _age_s(attempt, now)
            if attempt in used or ref in damaged or ref in unreferenced or age < min_age_s:
                continue
            why = "lost the commit race or was retried" if manifest else "never committed (crashed or abandoned)"
            items.append(Garbage(STAGING, f"{backend.join('stages', ref)}/attempts/{attempt}", size,
                                 f"attempt of {ref} {_hours(age)}, {why}"))

    # -- checkpoints ----------------------------------------------------------------------
    steps: dict[tuple[str, str], _Unit] = defaultdict(_Unit)
    for rel, size in backend.list_files(backend.join("checkpoints")).items():
        parts = rel.split("/")
        if len(parts) >= 4:
            steps[(f"{parts[0]}/{parts[1]}", parts[2])].add(parts[3:], size)
    by_run: dict[str, list[tuple[str, _Unit]]] = defaultdict(list)
    for (ref, step), unit in steps.items():
        by_run[ref].append((step, unit))
    for ref, run_steps in sorted(by_run.items()):
        if ref in manifests:
            items.append(Garbage(CHECKPOINTS, backend.join("checkpoints", ref), sum(u.size for _, u in run_steps),
                                 f"checkpoints of {ref}, whose output is committed"))
            continue
        stage, key = ref.split("/")
        checkpoints = store.checkpoints(stage, key)
        for step, unit in sorted(run_steps):
            used = set()
            if unit.committed:
                try:
                    record = checkpoints.record(int(step.split("-")[1]))
                    used = {entry.path.split("/")[1] for entry in record.files.values()}
                except (StoreError, ValueError, IndexError):
                    continue  # leave damaged or foreign folders to a person
            for attempt, size in sorted(unit.attempts.items()):
                age = _age_s(attempt, now)
                if attempt not in used and age >= min_age_s:
                    items.append(Garbage(CHECKPOINTS, f"{backend.join('checkpoints', ref, step)}/attempts/{attempt}", size,
                                         f"{'unreferenced' if unit.committed else 'uncommitted'} {step} attempt of {ref} {_hours(age)}"))

    for ref in sorted(unreferenced):
        items.append(Garbage(UNREFERENCED, backend.join("stages", ref), stages[ref].size,
                             f"committed {ref} is reached by no pointer or run record"))
    return GcPlan(items=tuple(items), roots=tuple(roots), damaged=tuple(f"{r}: {e}" for r, e in sorted(damaged.items())), note=note)


def apply_gc(store: Store, plan: GcPlan) -> None:
    """Delete what ``plan`` lists; a committed output loses its manifest before its files."""
    for item in plan.items:
        if item.kind == UNREFERENCED:
            store.backend.remove(f"{item.path}/{MANIFEST}")
        store.backend.remove(item.path)
