"""Stage 11, promote: point ``serving/current`` at a candidate only if it learned and is not worse.

    refuse   if   the candidate is below the absolute bar (checked first, even when nothing is
                  served; ``serve.min_accuracy_over_chance``, ``serve.max_excess_over_ceiling``):
                      class accuracy(k) < bar x chance, or
                      FID(k) - floor > bar x (VAE ceiling FID - floor)
                  read from the evaluation's table (its floor and ceiling rows) at the served steps
    promote  iff  nothing is served yet
             or   the candidate is not worse than the served model beyond the interval:
                  one evaluation scored both -> the paired bootstrap interval of
                      FID_candidate(k) - FID_current(k) does not lie above 0;
                  two evaluations (the served model scored by an earlier run) ->
                      the candidate's FID interval does not lie above the served model's

where ``k`` is the served step count (``serve.steps``) and FID(k) the model's FID at ``k``
steps with the sampler it is served with (:func:`models.sampling.preferred_sampler` of its
family and the serve solver). A difference inside the interval is not a result, so it does
not keep a model out; a real regression does. The FIDs come from a lookup ``(model ref,
steps, sampler) -> Scored or None``; pass an evaluate stage's ref and the lookup reads its
metrics and draws tables (falling back to the newest other evaluate manifest that scored the
served model the same way, for a model that an earlier run promoted).

Each model is read at its best guidance scale at ``k`` steps (the evaluation scores guided
models at several). The promoted candidate's scale is recorded in the pointer's record
(``{"ref", "updated_at", "guidance"}``), where serving reads it as the default for requests
that leave ``guidance`` out (:func:`workers.serving.swap.default_guidance`).

A candidate without a finite FID at ``k`` is never promoted over a served model: it would be
a blind swap. A served model without an FID at ``k`` (promoted by hand, or the served step
count changed) cannot be defended, so the evaluated candidate replaces it. The pointer moves
by compare-and-swap, and each move is appended to the pointer's champion history
(:mod:`infra.champions`) with the new champion's figures, which ``fewstep promote --rollback``
replays to put the previous champion back. Plain code: no Ray, no Prefect; running apps follow
the pointer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from infra.cards import LEARNED, GeneratorCard
from infra.champions import record_promotion
from infra.errors import PointerMoved
from infra.store import SERVING_POINTER, Manifest, Store
from models.metrics import Draws, interval
from models.sampling import preferred_sampler
from workers.evaluation.quality import Figures, learned_verdict
from workers.evaluation.table import CEILING, FLOOR, Row, measured_as, read_draws, read_rows, reference_row, row_at

POINTER = SERVING_POINTER
EVALUATE = "evaluate"  # the stage whose metrics table holds the FIDs
CAS_ATTEMPTS = 3  # decisions against a pointer that others keep moving


@dataclass(frozen=True)
class Scored:
    """A model's FID at one step count and sampler (at its best guidance), as one evaluation measured it."""

    fid: float
    low: float | None  # its bootstrap interval
    high: float | None
    evaluation: str  # the evaluate ref it comes from
    draws: tuple[float, ...] = ()  # paired bootstrap draws: comparable within one evaluation
    class_accuracy: float | None = None  # of its samples (None: no classifier)
    floor_fid: float | None = None  # the evaluation's reference rows, at the same n
    ceiling_fid: float | None = None
    real_accuracy: float | None = None  # the classifier on the floor's real images
    guidance: float | None = None  # the scale of the row it was read from


@dataclass(frozen=True)
class Bar:
    """The absolute bar (``ServeConfig``): below it a candidate has not learned the data."""

    min_accuracy_over_chance: float = 2.0  # 0: no accuracy bar
    max_excess_over_ceiling: float | None = 10.0  # None: no FID bar

    @classmethod
    def of(cls, serve: Any) -> Bar:
        return cls(serve.min_accuracy_over_chance, serve.max_excess_over_ceiling)


Lookup = Callable[[str, int, str], "Scored | None"]  # (model ref, steps, sampler) -> its FID at its best guidance


@dataclass(frozen=True)
class PromotionDecision:
    promoted: bool
    candidate: str
    current: str | None  # what was served before the decision
    steps: int
    sampler: str  # the candidate's sampler at which its FID was read
    candidate_fid: float | None
    current_fid: float | None
    difference: tuple[float, float] | None  # interval of FID_candidate - FID_current, when paired
    reason: str
    guidance: float | None = None  # the candidate's scale at its best row at ``steps``: serving's default
    below_bar: bool = False  # refused by the absolute bar: it has not learned the data
    candidate_interval: tuple[float, float] | None = None  # each FID's own bootstrap interval
    current_interval: tuple[float, float] | None = None
    candidate_evaluation: str | None = None  # the evaluate refs the FIDs come from (one: paired)
    current_evaluation: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def served_sampler(manifest: Manifest, solver: str) -> str:
    """The sampler a model is served with, as the evaluation's ``sampler`` column names it."""
    if not GeneratorCard.is_generator(manifest):
        raise ValueError(
            f"{manifest.ref} is a {manifest.stage!r} output, not a generator; promote a base, reflow or consistency ref"
        )
    return preferred_sampler(GeneratorCard.from_manifest(manifest).family, solver).name


def finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def fid_bounds(score: Scored | None) -> tuple[float, float] | None:
    """A score's own FID interval, when it has a finite one."""
    if score is None or not (finite(score.low) and finite(score.high)):
        return None
    return (score.low, score.high)


def decide(
    candidate: str,
    current: str | None,
    steps: int,
    sampler: str,
    candidate_score: Scored | None,
    current_score: Scored | None,
    level: float = 0.95,
    bar: Bar | None = None,
    chance: float | None = None,
) -> PromotionDecision:
    """The gate itself, on the scores only (see the module docstring). ``bar``: the absolute bar
    (None: none); ``chance``: 1 / the candidate's number of classes (None: unlabelled)."""
    candidate_fid = candidate_score.fid if candidate_score is not None else None
    current_fid = current_score.fid if current_score is not None else None

    def verdict(
        promoted: bool, reason: str, difference: tuple[float, float] | None = None, below_bar: bool = False
    ) -> PromotionDecision:
        return PromotionDecision(
            promoted,
            candidate,
            current,
            steps,
            sampler,
            candidate_fid,
            current_fid,
            difference,
            reason,
            candidate_score.guidance if candidate_score is not None else None,
            below_bar,
            fid_bounds(candidate_score),
            fid_bounds(current_score),
            candidate_score.evaluation if candidate_score is not None else None,
            current_score.evaluation if current_score is not None else None,
        )

    if current == candidate:
        return verdict(False, f"{candidate} is already served")
    if bar is not None:
        if not finite(candidate_fid):
            return verdict(
                False,
                f"{candidate} has no finite FID at {steps} step(s) with {sampler} (got {candidate_fid}), so "
                "nothing shows it learned the data; evaluate it at the served step count before promoting",
                below_bar=True,
            )
        figures = Figures(
            fid=candidate_fid,
            floor_fid=candidate_score.floor_fid,
            ceiling_fid=candidate_score.ceiling_fid,
            class_accuracy=candidate_score.class_accuracy,
            chance=chance,
            real_accuracy=candidate_score.real_accuracy,
        )
        learned = learned_verdict(
            candidate,
            figures,
            bar.min_accuracy_over_chance,
            bar.max_excess_over_ceiling,
            at=f"at the served {steps} step(s) with {sampler}",
        )
        if learned != LEARNED:
            return verdict(
                False,
                f"refused, below the absolute bar (serve.min_accuracy_over_chance={bar.min_accuracy_over_chance:g}, "
                f"serve.max_excess_over_ceiling={bar.max_excess_over_ceiling}): {learned}",
                below_bar=True,
            )
    if current is None:
        return verdict(True, "nothing was served yet")
    if not finite(candidate_fid):
        return verdict(
            False,
            f"{candidate} has no finite FID at {steps} step(s) with {sampler} "
            f"(got {candidate_fid}); evaluate it at the served step count before promoting",
        )
    if not finite(current_fid):
        return verdict(True, f"the served {current} has no FID at {steps} step(s) to defend it")
    paired = (
        candidate_score.evaluation == current_score.evaluation
        and candidate_score.draws
        and len(candidate_score.draws) == len(current_score.draws)
    )
    if paired:
        d = interval(
            Draws(
                candidate_fid - current_fid,
                torch.tensor(candidate_score.draws, dtype=torch.float64)
                - torch.tensor(current_score.draws, dtype=torch.float64),
            ),
            level,
        )
        text = (
            f"FID {candidate_fid:.4g} vs the served {current_fid:.4g}: difference {d.corrected:+.4g} "
            f"(bias-corrected; plug-in {d.value:+.4g}), {100 * level:g}% interval [{d.low:+.4g}, {d.high:+.4g}]"
        )
        if d.low > 0:
            return verdict(False, f"{text}: worse beyond the interval", (d.low, d.high))
        return verdict(True, f"{text}: not worse beyond the interval", (d.low, d.high))
    if finite(candidate_score.low) and finite(current_score.high):
        text = (
            f"FID {candidate_fid:.4g} [{candidate_score.low:.4g}, {candidate_score.high:.4g}] vs the served "
            f"{current_fid:.4g} [{current_score.low:.4g}, {current_score.high:.4g}] (two evaluations)"
        )
        worse = candidate_score.low > current_score.high
    else:
        text = f"FID {candidate_fid:.4g} vs the served {current_fid:.4g} (no intervals)"
        worse = candidate_fid > current_fid
    return verdict(not worse, f"{text}: {'worse beyond the interval' if worse else 'not worse beyond the interval'}")


def scored(row: Row | None, evaluation: str, draws: dict[str, list[float]], rows: Sequence[Row] = ()) -> Scored | None:
    """A row's FID (and its class accuracy), with the floor and ceiling of its table ``rows``."""
    if row is None:
        return None
    floor, ceiling = reference_row(rows, FLOOR), reference_row(rows, CEILING)
    return Scored(
        row.fid,
        row.fid_low,
        row.fid_high,
        evaluation,
        tuple(draws.get(row.key, ())),
        class_accuracy=row.class_accuracy,
        floor_fid=floor.fid if floor is not None else None,
        ceiling_fid=ceiling.fid if ceiling is not None else None,
        real_accuracy=floor.class_accuracy if floor is not None else None,
        guidance=row.guidance,
    )


def evaluation_lookup(store: Store, evaluate_ref: str) -> Lookup:
    """FIDs from the evaluate manifest ``evaluate_ref``; a model it did not score is looked up in
    the newest other evaluate manifest that did (an earlier run's, for the served model), but
    only in rows measured the same way: the same extractor (a classifier trained on the same
    images) and the same n. FIDs in different feature spaces, or on other test data, do not
    compare; then the served model has no FID to defend it."""
    primary = store.get_ref(evaluate_ref)
    if primary.stage != EVALUATE:
        raise ValueError(
            f"{evaluate_ref} is a {primary.stage!r} output; pass an {EVALUATE!r} ref (its metrics table holds the FIDs)"
        )
    primary_rows, primary_draws = read_rows(store, primary), read_draws(store, primary)
    comparable = measured_as(primary_rows)

    def lookup(ref: str, steps: int, sampler: str) -> Scored | None:
        if ref in primary.inputs:
            return scored(row_at(primary_rows, ref, steps, sampler), primary.ref, primary_draws, primary_rows)
        for other in reversed(store.list_manifests(EVALUATE)):
            if ref not in other.inputs:
                continue
            rows = [r for r in read_rows(store, other) if (r.extractor, r.n) in comparable]
            found = row_at(rows, ref, steps, sampler)
            if found is not None:
                return scored(found, other.ref, read_draws(store, other), rows)
        return None

    return lookup


def history_figures(decision: PromotionDecision, run_id: str | None) -> dict[str, Any]:
    """What the champion history keeps of a promotion: the new champion's FID and where it comes from."""
    low, high = decision.candidate_interval or (None, None)
    return {
        "steps": decision.steps,
        "sampler": decision.sampler,
        "fid": decision.candidate_fid,
        "fid_low": low,
        "fid_high": high,
        "guidance": decision.guidance,
        "evaluation": decision.candidate_evaluation,
        "run_id": run_id,
        "reason": decision.reason,
    }


def pick_candidate(
    store: Store, candidates: Sequence[str], fid: str | Lookup, served_steps: int, solver: str = "euler"
) -> str:
    """Of several students (consistency, flowmap), the one to put to the gate: the lowest finite FID at
    the served step count with the sampler it would be served with, each at its best guidance;
    the first when none has one (the gate then refuses it with the reason)."""
    if not candidates:
        raise ValueError("no candidates to choose from; pass at least one generator ref")
    lookup = evaluation_lookup(store, fid) if isinstance(fid, str) else fid
    fids = {}
    for ref in candidates:
        score = lookup(ref, served_steps, served_sampler(store.get_ref(ref), solver))
        if score is not None and finite(score.fid):
            fids[ref] = score.fid
    return min(fids, key=fids.get) if fids else candidates[0]


def promote(
    store: Store,
    candidate_ref: str,
    fid: str | Lookup,
    served_steps: int,
    solver: str = "euler",
    pointer: str = POINTER,
    level: float = 0.95,
    bar: Bar | None = None,
    run_id: str | None = None,
) -> PromotionDecision:
    """Decide, and move ``pointer`` to ``candidate_ref`` when the gate passes.

    ``fid`` is an evaluate stage's ref or a lookup ``(ref, steps, sampler) -> Scored | None``;
    ``solver`` is how flow models are served (``serve.solver``); ``bar`` the absolute bar
    (:meth:`Bar.of` the serve section; None: none), checked before any comparison. A move is
    appended to the pointer's champion history (:mod:`infra.champions`) with its figures and
    ``run_id`` (the run that promoted; None: by hand), so ``fewstep promote --rollback`` can undo it."""
    if served_steps < 1:
        raise ValueError(f"served_steps={served_steps} must be >= 1")
    lookup = evaluation_lookup(store, fid) if isinstance(fid, str) else fid
    candidate = store.get_ref(candidate_ref)
    sampler = served_sampler(candidate, solver)
    num_classes = GeneratorCard.from_manifest(candidate).num_classes
    chance = 1.0 / num_classes if num_classes > 0 else None
    for _ in range(CAS_ATTEMPTS):
        current_ref = store.get_pointer(pointer)
        current_score = None
        if current_ref is not None and current_ref != candidate_ref:
            current = store.get(*current_ref.split("/", 1))  # None: the served model was deleted; nothing to defend
            if current is not None:
                current_score = lookup(current_ref, served_steps, served_sampler(current, solver))
        decision = decide(
            candidate_ref,
            current_ref,
            served_steps,
            sampler,
            lookup(candidate_ref, served_steps, sampler),
            current_score,
            level,
            bar,
            chance,
        )
        if not decision.promoted:
            return decision
        try:  # only if nobody moved the pointer since we read it; else decide again against the new one
            about = {"guidance": decision.guidance} if decision.guidance is not None else None
            store.put_pointer(pointer, candidate_ref, expect=current_ref, about=about)
        except PointerMoved:
            continue
        record_promotion(store, pointer, candidate_ref, current_ref, history_figures(decision, run_id))
        return decision
    return replace(
        decision,
        promoted=False,
        reason=f"{pointer} kept moving while {candidate_ref} was being promoted; run promotion again",
    )
