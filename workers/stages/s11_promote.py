"""Stage 11, promote: point ``serving/current`` at a candidate only if it is not worse.

    promote  iff  nothing is served yet
             or   FID_candidate(k) <= FID_current(k) * (1 + tolerance)

where ``k`` is the served step count (``serve.steps``) and FID(k) is the model's FID at ``k``
steps with the sampler it is served with (:func:`models.sampling.preferred_sampler` of its
family and the serve solver). The FIDs come from a lookup ``(model ref, steps, sampler) -> FID or None``; pass an
evaluate stage's ref and the lookup reads its metrics table (falling back to the newest other
evaluate manifest that scored the served model, for a model that an earlier run promoted).

A candidate without a finite FID at ``k`` is never promoted over a served model: it would be
a blind swap. A served model without an FID at ``k`` (promoted by hand, or the served step
count changed) cannot be defended, so the evaluated candidate replaces it. The decision
says which case applied. Plain code: no Ray, no Prefect; running apps follow the pointer.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable

from infra.cards import GeneratorCard
from infra.errors import PointerMoved
from infra.metrics_table import fid_at, measured_as, read_rows
from infra.store import SERVING_POINTER, Manifest, Store
from models.sampling import preferred_sampler

POINTER = SERVING_POINTER
EVALUATE = "evaluate"  # the stage whose metrics table holds the FIDs
CAS_ATTEMPTS = 3  # decisions against a pointer that others keep moving

FidLookup = Callable[[str, int, str], "float | None"]  # (model ref, steps, sampler) -> FID


@dataclass(frozen=True)
class PromotionDecision:
    promoted: bool
    candidate: str
    current: str | None  # what was served before the decision
    steps: int
    sampler: str  # the candidate's sampler at which its FID was read
    candidate_fid: float | None
    current_fid: float | None
    threshold: float | None  # current_fid * (1 + tolerance): the worst candidate FID that passes
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def served_sampler(manifest: Manifest, solver: str) -> str:
    """The sampler a model is served with, as the evaluation's ``sampler`` column names it."""
    if not GeneratorCard.is_generator(manifest):
        raise ValueError(f"{manifest.ref} is a {manifest.stage!r} output, not a generator; promote a base, reflow "
                         "or consistency ref")
    return preferred_sampler(GeneratorCard.from_manifest(manifest).family, solver).name


def finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def decide(candidate: str, current: str | None, steps: int, sampler: str, candidate_fid: float | None,
           current_fid: float | None, tolerance: float) -> PromotionDecision:
    """The gate itself, on numbers only (see the module docstring)."""
    if tolerance < 0 or not math.isfinite(tolerance):
        raise ValueError(f"tolerance={tolerance} must be a finite relative slack >= 0 (e.g. 0.05 for 5%)")

    def verdict(promoted: bool, reason: str, threshold: float | None = None) -> PromotionDecision:
        return PromotionDecision(promoted, candidate, current, steps, sampler, candidate_fid, current_fid, threshold, reason)

    if current == candidate:
        return verdict(False, f"{candidate} is already served")
    if current is None:
        return verdict(True, "nothing was served yet")
    if not finite(candidate_fid):
        return verdict(False, f"{candidate} has no finite FID at {steps} step(s) with {sampler} "
                              f"(got {candidate_fid}); evaluate it at the served step count before promoting")
    if not finite(current_fid):
        return verdict(True, f"the served {current} has no FID at {steps} step(s) to defend it")
    threshold = current_fid * (1 + tolerance)
    if candidate_fid <= threshold:
        return verdict(True, f"FID {candidate_fid:.4g} <= {current_fid:.4g} x (1 + {tolerance:g}) = {threshold:.4g}",
                       threshold)
    return verdict(False, f"FID {candidate_fid:.4g} is worse than the served {current_fid:.4g} "
                          f"beyond the tolerance {tolerance:g} (limit {threshold:.4g})", threshold)


def evaluation_lookup(store: Store, evaluate_ref: str) -> FidLookup:
    """FIDs from the evaluate manifest ``evaluate_ref``; a model it did not score is looked up in
    the newest other evaluate manifest that did (an earlier run's, for the served model), but
    only in rows measured the same way: the same extractor (a classifier trained on the same
    images) and the same n. FIDs in different feature spaces, or on other test data, do not
    compare; then the served model has no FID to defend it."""
    primary = store.get_ref(evaluate_ref)
    if primary.stage != EVALUATE:
        raise ValueError(f"{evaluate_ref} is a {primary.stage!r} output; pass an {EVALUATE!r} ref (its metrics table "
                         "holds the FIDs)")
    primary_rows = read_rows(store, primary)
    comparable = measured_as(primary_rows)

    def lookup(ref: str, steps: int, sampler: str) -> float | None:
        if ref in primary.inputs:
            return fid_at(primary_rows, ref, steps, sampler)
        for other in reversed(store.list_manifests(EVALUATE)):
            if ref not in other.inputs:
                continue
            rows = [r for r in read_rows(store, other) if (r["extractor"], r["n"]) in comparable]
            found = fid_at(rows, ref, steps, sampler)
            if found is not None:
                return found
        return None

    return lookup


def promote(store: Store, candidate_ref: str, fid: str | FidLookup, served_steps: int, tolerance: float,
            solver: str = "euler", pointer: str = POINTER) -> PromotionDecision:
    """Decide, and move ``pointer`` to ``candidate_ref`` when the gate passes.

    ``fid`` is an evaluate stage's ref or a lookup ``(ref, steps, sampler) -> FID | None``;
    ``solver`` is how flow models are served (``serve.solver``)."""
    if served_steps < 1:
        raise ValueError(f"served_steps={served_steps} must be >= 1")
    lookup = evaluation_lookup(store, fid) if isinstance(fid, str) else fid
    candidate = store.get_ref(candidate_ref)
    sampler = served_sampler(candidate, solver)
    for _ in range(CAS_ATTEMPTS):
        current_ref = store.get_pointer(pointer)
        current_fid = None
        if current_ref is not None and current_ref != candidate_ref:
            current = store.get(*current_ref.split("/", 1))  # None: the served model was deleted; nothing to defend
            if current is not None:
                current_fid = lookup(current_ref, served_steps, served_sampler(current, solver))
        decision = decide(candidate_ref, current_ref, served_steps, sampler,
                          lookup(candidate_ref, served_steps, sampler), current_fid, tolerance)
        if not decision.promoted:
            return decision
        try:  # only if nobody moved the pointer since we read it; else decide again against the new one
            store.put_pointer(pointer, candidate_ref, expect=current_ref)
            return decision
        except PointerMoved:
            continue
    return replace(decision, promoted=False,
                   reason=f"{pointer} kept moving while {candidate_ref} was being promoted; run promotion again")
