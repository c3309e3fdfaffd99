"""The champion history of a pointer: who was served, since when, how good, and how to go back.

    history/{pointer}.json   {"pointer": name, "entries": [entry, ...]}, oldest first; an entry is
                             {"action": "promote" | "rollback", "ref", "previous", "at",
                              "steps", "sampler", "fid", "fid_low", "fid_high", "guidance",
                              "evaluation", "run_id", "reason"}

Every move of a served pointer by promotion or rollback appends one entry, after the pointer
moved (the pointer is the truth, the history its log). The log is rewritten whole by
compare-and-swap on its own bytes (the pointer's primitive: an ``flock`` locally, ``If-Match`` on
S3), so two appenders cannot lose each other's entry.

The champions are a stack replayed from the log: a promotion pushes its ref (and first the ref it
replaced, when that was served without an entry: before the log began, or moved by hand), a
rollback pops. ``rollback`` moves the
pointer from the top of the stack to the one below it, by compare-and-swap against the ref it read,
with the guidance that champion was promoted with. Plain code: no Ray, no Prefect.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from infra.errors import IntegrityError, NoPreviousChampion, NotCommitted, PointerMoved
from infra.manifest import check_relative_path, check_segment, split_ref, to_jsonable, utc_now

HISTORY = "history"
PROMOTE, ROLLBACK = "promote", "rollback"
APPEND_ATTEMPTS = 5  # appenders racing on one log: each retry re-reads it
FIGURES = ("steps", "sampler", "fid", "fid_low", "fid_high", "guidance", "evaluation", "run_id", "reason")


@dataclass(frozen=True)
class Rollback:
    """What ``rollback`` did: the pointer went from ``from_ref`` back to ``to_ref``."""

    pointer: str
    from_ref: str
    to_ref: str
    guidance: float | None
    fid: float | None  # the restored champion's FID when it was promoted


def history_path(store, pointer: str) -> str:
    parts = check_relative_path(pointer, "pointer name").split("/")
    return store.backend.join(HISTORY, *[check_segment(p, "pointer name part") for p in parts]) + ".json"


def finite_or_none(value: Any) -> Any:
    """Floats that JSON in the store can hold: NaN and inf become None (no FID)."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _parse(pointer: str, path: str, data: bytes | None) -> list[dict[str, Any]]:
    if data is None:
        return []
    try:
        body = json.loads(data)
        entries = body["entries"]
        if not isinstance(entries, list) or not all(
            isinstance(e, dict) and e.get("action") in (PROMOTE, ROLLBACK) and isinstance(e.get("ref"), str)
            for e in entries
        ):
            raise ValueError('"entries" is not a list of {"action", "ref", ...} objects')
        for e in entries:
            split_ref(e["ref"])
    except (ValueError, TypeError, KeyError) as error:
        raise IntegrityError(
            f"champion history of {pointer!r} at {path} is not valid ({error}); fix it, or delete it "
            "(rollback then has nothing to go back to until the next promotion)"
        ) from None
    return entries


def read_history(store, pointer: str) -> list[dict[str, Any]]:
    """Every entry of ``pointer``'s champion history, oldest first ([] when none was written)."""
    path = history_path(store, pointer)
    try:
        data = store.backend.read_bytes(path)
    except FileNotFoundError:
        return []
    return _parse(pointer, path, data)


def append_history(store, pointer: str, entry: Mapping[str, Any]) -> dict[str, Any]:
    """Append ``entry`` to ``pointer``'s history by compare-and-swap on the log; returns the entry written."""
    written = to_jsonable({k: finite_or_none(v) for k, v in entry.items()}, "champion history entry")
    written.setdefault("at", utc_now())
    path = history_path(store, pointer)
    for _ in range(APPEND_ATTEMPTS):
        try:
            seen = store.backend.read_bytes(path)
        except FileNotFoundError:
            seen = None
        entries = _parse(pointer, path, seen)
        body = json.dumps({"pointer": pointer, "entries": [*entries, written]}, indent=2).encode()
        if store.backend.compare_and_swap(path, body, lambda current, seen=seen: current == seen):
            return written
    raise PointerMoved(
        f"the champion history of {pointer!r} kept changing while an entry was appended "
        f"({APPEND_ATTEMPTS} tries); the pointer itself has moved — run the command again to record it"
    )


def record_promotion(
    store, pointer: str, ref: str, previous: str | None, figures: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Log that promotion moved ``pointer`` from ``previous`` to ``ref``, with its figures (:data:`FIGURES`)."""
    extra = sorted(set(figures or {}) - set(FIGURES))
    if extra:
        raise ValueError(f"unknown champion history fields {extra}; use {FIGURES}")
    return append_history(store, pointer, {"action": PROMOTE, "ref": ref, "previous": previous, **(figures or {})})


def champion_stack(entries: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The champions still to fall back on, oldest first: each the entry that made it champion
    (a ref served before the log began stands as an entry with no figures)."""
    stack: list[dict[str, Any]] = []
    for entry in entries:
        if entry["action"] == PROMOTE:
            previous = entry.get("previous")
            if previous and (not stack or stack[-1]["ref"] != previous):  # served without a log entry
                stack.append({"action": PROMOTE, "ref": previous, "previous": None})
            stack.append(dict(entry))
        elif stack:
            stack.pop()
    return stack


def rollback(store, pointer: str) -> Rollback:
    """Put the previous champion back on ``pointer``, by compare-and-swap against the ref read.

    Raises :class:`NoPreviousChampion` when the history has none (or does not end at what the
    pointer serves) and :class:`PointerMoved` when the pointer moved between read and swap."""
    current = store.get_pointer(pointer)
    entries = read_history(store, pointer)
    if current is None:
        raise NoPreviousChampion(
            f"pointer {pointer!r} is not set in {store.uri}; nothing is served, so nothing to roll back"
        )
    stack = champion_stack(entries)
    if not stack or stack[-1]["ref"] != current:
        raise NoPreviousChampion(
            f"{pointer!r} serves {current}, but its champion history in {store.uri} does not record how it got "
            "there (moved by hand, or promoted before fewstep kept a history); promote a model with "
            "`fewstep promote --model REF` instead"
        )
    if len(stack) < 2:
        raise NoPreviousChampion(
            f"{current} is the first champion recorded for {pointer!r} in {store.uri}; there is no previous one to put back"
        )
    target = stack[-2]
    try:
        store.get_ref(target["ref"])
    except NotCommitted:
        raise NoPreviousChampion(
            f"the previous champion {target['ref']} is no longer in {store.uri} (collected by gc?); "
            "promote another model with `fewstep promote --model REF`"
        ) from None
    guidance = target.get("guidance")
    store.put_pointer(
        pointer, target["ref"], expect=current, about={"guidance": guidance} if guidance is not None else None
    )
    figures = {k: target.get(k) for k in FIGURES if k not in ("run_id", "reason")}
    append_history(
        store,
        pointer,
        {
            "action": ROLLBACK,
            "ref": target["ref"],
            "previous": current,
            **figures,
            "reason": f"rolled back from {current}",
        },
    )
    return Rollback(pointer, current, target["ref"], guidance, target.get("fid"))


def previous_champions(store, pointer: str) -> list[str]:
    """The refs rollback can go back to (every champion below the current one): gc keeps them."""
    return [e["ref"] for e in champion_stack(read_history(store, pointer))[:-1]]
