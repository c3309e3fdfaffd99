"""A stored training curve, read back: its table, and whether more steps would still help.

A curve is the list the training loop (:mod:`workers.train`) stores with every checkpoint and a
generator stage writes as its ``curve`` file: one entry per log interval, ``{"step", "loss",
"grad_norm", "seconds"}``, and at each checkpoint ``heldout_loss`` / ``heldout_loss_raw`` (the EMA
and raw weights on a fixed held-out set, :mod:`workers.heldout`). Pure functions of that list (no
torch, no I/O): the evaluation report, the Prefect artifacts and ``fewstep run``'s summary share them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

# "Still falling": the held-out loss (EMA) dropped by more than STILL_FALLING_DROP of its value over
# the last STILL_FALLING_PART of the steps (scaled to that span when the checkpoints do not fall on
# it). 2 %: the flow-matching loss is mostly irreducible (about 0.8 for a trained base on the
# shapes latents) and the whole effect of the class label on it is about 3 % (correct vs null
# label, issue 20's diagnosis), so a 2 % drop in the last quarter means the model is still
# learning things of the size that decide its samples.
STILL_FALLING_DROP = 0.02
STILL_FALLING_PART = 0.25
STILL_FALLING_POINTS = 3  # fewer held-out points than this: too short a curve to say


def heldout_points(curve: Sequence[Mapping[str, Any]], key: str = "heldout_loss") -> list[tuple[int, float]]:
    """(step, value) of every curve entry that carries a finite ``key``."""
    return [
        (int(e["step"]), float(e[key])) for e in curve if isinstance(e.get(key), int | float) and math.isfinite(e[key])
    ]


def still_falling(curve: Sequence[Mapping[str, Any]], stage: str = "training", name: str | None = None) -> str | None:
    """A sentence when the held-out loss is still falling steeply at the last step, else None.

    Compares the last held-out point with the latest one at or before the start of the last
    :data:`STILL_FALLING_PART` of the steps; "steeply" is a relative drop above
    :data:`STILL_FALLING_DROP` per that share of the steps. None for a flat or rising curve, and for
    a curve with fewer than :data:`STILL_FALLING_POINTS` held-out points. ``stage`` names the config
    section to raise (``base.steps``); ``name`` the model (default: ``stage``).
    """
    points = heldout_points(curve)
    if len(points) < STILL_FALLING_POINTS:
        return None
    last_step, last = points[-1]
    earlier = [p for p in points[:-1] if p[0] <= last_step * (1 - STILL_FALLING_PART)]
    if not earlier or last_step <= 0:
        return None
    start_step, start = earlier[-1]
    if start <= 0 or last_step <= start_step:
        return None
    drop = (start - last) / start
    per_part = drop * (STILL_FALLING_PART * last_step) / (last_step - start_step)
    if per_part <= STILL_FALLING_DROP:
        return None
    return (
        f"{name or stage}: held-out loss still falling ({start:.4g} -> {last:.4g} over the last "
        f"{last_step - start_step} steps, {-100 * drop:+.1f} %): more {stage}.steps would help"
    )


def curve_rows(curve: Sequence[Mapping[str, Any]], most: int = 12) -> list[dict[str, Any]]:
    """The entries worth a table: every one with a held-out loss (the checkpoints), else at most
    ``most`` evenly spaced ones and the last."""
    with_heldout = [e for e in curve if "heldout_loss" in e]
    if with_heldout:
        chosen = with_heldout
    else:
        every = max(1, math.ceil(len(curve) / most))
        chosen = list(curve[::every])
        if curve and (not chosen or chosen[-1] is not curve[-1]):
            chosen.append(curve[-1])
    return [
        {
            "step": int(e["step"]),
            "loss": e.get("loss"),
            "heldout_loss": e.get("heldout_loss"),
            "heldout_loss_raw": e.get("heldout_loss_raw"),
        }
        for e in chosen
    ]


def curve_markdown(name: str, curve: Sequence[Mapping[str, Any]], heldout: str | None, stage: str) -> list[str]:
    """A markdown table of one model's curve (training loss, held-out loss of the EMA and raw
    weights), what the held-out set is, and the "still falling" note when it applies."""

    def cell(value: Any) -> str:
        return f"{value:.4g}" if isinstance(value, int | float) and math.isfinite(value) else "–"

    lines = [
        f"**{name}** — held-out set: {heldout or 'none (no test split, or an objective without a held-out loss)'}",
        "",
        "| step | training loss | held-out loss (EMA) | held-out loss (raw) |",
        "|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['step']} | {cell(r['loss'])} | {cell(r['heldout_loss'])} | {cell(r['heldout_loss_raw'])} |"
        for r in curve_rows(curve)
    ]
    note = still_falling(curve, stage, name)
    if note:
        lines += ["", f"Note: {note}."]
    return lines
