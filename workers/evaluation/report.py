"""The evaluation's markdown report: settings, plot, every row, the best rows, quality bars, curves, grids.

Each FID is shown as the bias-corrected value its interval is built around, with the plug-in
value in its own column (:attr:`workers.evaluation.table.Row.fid_centre`). Published numbers
from elsewhere appear only in one table marked "reference, not measured here", read from
``reference_numbers.json`` beside this module, where each entry cites its source.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workers.curves import curve_markdown
from workers.evaluation.grids import grid_file
from workers.evaluation.quality import Ratio
from workers.evaluation.table import (
    CEILING,
    FLOOR,
    REFERENCE,
    Row,
    best_by_model,
    best_by_steps,
    finite,
    generated,
    lowest_fid,
    reference_row,
)

if TYPE_CHECKING:
    from workers.evaluation.outputs import Evaluation

REFERENCE_NUMBERS = Path(__file__).with_name("reference_numbers.json")
NOT_MEASURED = "reference, not measured here"


# --------------------------------------------------------------------------- cells


def fmt(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def span(low: Any, high: Any, digits: int = 4) -> str:
    return f"[{fmt(low, digits)}, {fmt(high, digits)}]" if finite(low) and finite(high) else ""


def fid_cell(row: Row) -> str:
    """``FID* [low, high]``: the bias-corrected FID with the interval built around it."""
    return f"{fmt(row.fid_centre)} {span(row.fid_low, row.fid_high)}".rstrip()


def kid_cell(row: Row) -> str:
    scaled = [v * 1000 if finite(v) else None for v in (row.kid, row.kid_low, row.kid_high)]
    return f"{fmt(scaled[0], 3)} {span(scaled[1], scaled[2], 3)}".rstrip()


# --------------------------------------------------------------------------- reference numbers


@dataclass(frozen=True)
class ReferenceNumber:
    """A published FID quoted for scale: not measured by fewstep."""

    system: str
    stage: str  # the fewstep stage of the same kind of model
    steps: int
    fid: float
    data: str
    source: str


def reference_numbers(path: Path = REFERENCE_NUMBERS) -> list[ReferenceNumber]:
    """The entries of ``reference_numbers.json``; each must name its source."""
    entries = [ReferenceNumber(**entry) for entry in json.loads(path.read_text())["entries"]]
    unsourced = [e.system for e in entries if not e.source.strip()]
    if unsourced:
        raise ValueError(f"{path} has entries without a source: {unsourced}; every quoted number must cite one")
    return entries


def reference_numbers_section(numbers: Sequence[ReferenceNumber]) -> list[str]:
    """The quoted numbers, in a table of their own, each with its source."""
    lines = [
        "",
        f"## Published numbers ({NOT_MEASURED})",
        "",
        f"Quoted for scale from `workers/evaluation/{REFERENCE_NUMBERS.name}`; {NOT_MEASURED}: other data, "
        "other models, another feature space. Compare orderings, never values.",
        "",
        f"| system | FID ({NOT_MEASURED}) | steps | data | source |",
        "|---|---:|---:|---|---|",
    ]
    for e in numbers:
        cells = (e.system, fmt(e.fid), str(e.steps), e.data, e.source)
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return lines


def systems_section(rows: Sequence[Row], numbers: Sequence[ReferenceNumber]) -> list[str]:
    """This run's row for each system of the reference table, at that system's step count.

    Each the lowest-FID row of that stage's model (found by the stage of its ref; the first by
    name where a stage has several, every round for reflow) at the target step count, over its
    samplers and scales. Where the target was not evaluated, the nearest evaluated step count
    stands in (the larger on a tie) and the row says so. Measured numbers only.
    """
    scored = generated(rows)
    lines = [
        "",
        "## This run at the published systems' step counts",
        "",
        "Measured here, for the ordering beside the table above.",
        "",
        "| system | target steps | model | sampler | steps | NFE | FID* [interval] | plug-in FID | note |",
        "|---|---:|---|---|---:|---:|---:|---:|---|",
    ]
    for e in numbers:
        mine = [r for r in scored if r.stage == e.stage]
        if e.stage != "reflow":  # one model of the stage; reflow: the best of every round
            first = min((r.model for r in mine), default=None)
            mine = [r for r in mine if r.model == first]
        steps = min({r.steps for r in mine}, key=lambda s: (abs(s - e.steps), -s), default=None)
        row = lowest_fid([r for r in mine if r.steps == steps])
        if row is None:
            lines.append(
                f"| {e.system} | {e.steps} | – | – | – | – | – | – | "
                f"not in this run (no `{e.stage}` stage rows with a finite FID) |"
            )
            continue
        note = "" if steps == e.steps else f"{e.steps} steps not evaluated: nearest evaluated step count {steps}"
        lines.append(
            f"| {e.system} | {e.steps} | {row.model} | {row.sampler} | {row.steps} | {row.nfe} | "
            f"{fid_cell(row)} | {fmt(row.fid)} | {note} |"
        )
    return lines


# --------------------------------------------------------------------------- sections


def curves_section(curves: dict[str, dict[str, Any]]) -> list[str]:
    """The training curves: training loss and held-out loss (EMA, raw) at each checkpoint, per model."""
    if not curves:
        return []
    lines = [
        "",
        "## Training curves",
        "",
        "Training loss: the running mean over the last log interval (fresh noise, dropped labels). Held-out "
        "loss: the same objective on a fixed test slice with correct labels and fixed noise and times, "
        "measured at each checkpoint; the EMA column is the model that is sampled.",
    ]
    for model, record in curves.items():
        lines += ["", *curve_markdown(model, record.get("curve", []), record.get("heldout"), record["stage"])]
    return lines


def reference_accuracy_line(rows: Sequence[Row]) -> list[str]:
    """The class accuracy of real images beside that of their VAE reconstructions (none without a classifier)."""
    floor, ceiling = reference_row(rows, FLOOR), reference_row(rows, CEILING)
    real, recon = (None if r is None else r.class_accuracy for r in (floor, ceiling))
    if not (finite(real) and finite(recon)):
        return []
    return [
        f"Class accuracy of real train images {fmt(real, 3)}, of their VAE reconstructions {fmt(recon, 3)}: "
        "reconstructions far below real images mean the VAE loses the class, and every model of its latents "
        "inherits that."
    ]


def sample_grids(grids: dict[str, bytes] | list[str], rows: Sequence[Row]) -> list[str]:
    """Embedded: the real test images, their VAE reconstructions and each model's best row (one class
    per column); every other grid as a link."""
    names = sorted(grids)
    shown = [n for n in ("grids/real-test.png", "grids/vae-recon.png") if n in grids]
    captions = {"grids/real-test.png": "real test images", "grids/vae-recon.png": "VAE reconstructions (the ceiling)"}
    for model, row in best_by_model(rows).items():
        if row is None:
            continue
        name = grid_file(row.model, row.sampler, row.steps, row.guidance)
        if name in grids and name not in shown:
            shown.append(name)
            captions[name] = f"{model}, its best row: {row.label}, FID {fmt(row.fid)}"
    lines = ["", "## Sample grids", "", "One class per column, in label order.", ""]
    for name in shown:
        lines += [f"**{captions[name]}**", "", f"![{captions[name]}]({name})", ""]
    rest = [n for n in names if n not in shown]
    if rest:
        lines += ["Every other row:", ""]
        lines += [f"- [{n.removeprefix('grids/').removesuffix('.png')}]({n})" for n in rest]
    return lines


def settings_lines(info: dict[str, Any], location: str) -> list[str]:
    lines = [
        f"Feature space `{info['extractor']}`; n = {info['n']} generated images per row against "
        f"{info['n_test']} real test images (`{info['images_ref']}`); seed {info['seed']}; "
        f"precision/recall with k = {info['knn_k']}.",
    ]
    if info.get("features_test_accuracy") is not None:
        lines.append(
            f"Feature space `{info['features_ref']}` is a classifier: test accuracy "
            f"{fmt(info['features_test_accuracy'])} (class accuracy of samples is measured with it)."
        )
    elif info.get("features_ref"):
        lines.append(
            f"Feature space `{info['features_ref']}` is a self-supervised encoder (the images have no labels)."
        )
    level = fmt(100 * info.get("interval_level", 0.95), 3)
    return lines + [
        f"FID is only comparable between rows of one feature space and one n. Files are under `{location}`.",
        f"Intervals ({level}%): FID by a paired bootstrap ({info.get('fid_resamples', '?')} draws) with the "
        "basic interval, an interval for the population FID. It reflects the draws about the plug-in FID, "
        "so it is built around the bias-corrected FID* = 2 FID − median of the draws, shown with it; FID* "
        "lies inside its interval by construction and may be below 0 near the floor. The plug-in FID "
        "(biased upwards at finite n; rows are ranked by it) has its own column and can lie outside the "
        "interval. Quality ratios are shown the same way. KID: the mean over random subsets, with the "
        "spread of one subset's estimate. Read models against the floor: a difference inside the "
        "intervals is not a result.",
    ]


def rows_section(rows: Sequence[Row]) -> list[str]:
    lines = [
        "",
        "## All rows",
        "",
        "| model | sampler | steps | NFE | guidance | FID* [interval] | plug-in FID | KID ×1000 [interval] "
        "| precision | recall | class acc. | s / image | stage |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.model} | {r.sampler} | {r.steps} | {r.nfe} | {fmt(r.guidance)} | {fid_cell(r)} | {fmt(r.fid)} | "
            f"{kid_cell(r)} | {fmt(r.precision, 3)} | {fmt(r.recall, 3)} | "
            f"{fmt(r.class_accuracy, 3)} | {fmt(r.seconds_per_image, 3)} | `{r.stage_key}` |"
        )
    return lines + [
        "",
        f"Reference rows (sampler `{REFERENCE}`): `{FLOOR}` scores real train images (the floor at this n); "
        f"`{CEILING}` the same images encoded and decoded by the VAE (the best its latents allow).",
        *reference_accuracy_line(rows),
    ]


def best_sections(rows: Sequence[Row]) -> list[str]:
    lines = ["", "## Best of each model", "", "Over samplers, step counts and guidance scales (by plug-in FID).", ""]
    for model, r in best_by_model(rows).items():
        if r is None:
            lines.append(f"- {model}: no row with a finite FID")
        else:
            lines.append(f"- {model} best: {r.label} (FID {fmt(r.fid)}, NFE {r.nfe})")
    lines += [
        "",
        "## Best at each step count",
        "",
        "| steps | model | sampler | guidance | FID |",
        "|---:|---|---|---:|---:|",
    ]
    for steps, r in best_by_steps(rows).items():
        lines.append(f"| {steps} | {r.model} | {r.sampler} | {fmt(r.guidance)} | {fmt(r.fid)} |")
    return lines


def ratios_section(ratios: Sequence[Ratio]) -> list[str]:
    lines = [
        "",
        "## Quality bars (excess FID over the floor)",
        "",
        "ratio = (FID − floor) / (FID of the denominator − floor), shown as ratio* (bias-corrected) with its "
        "interval, the plug-in ratio beside it; met when the interval's top is at or below the bar. Class "
        "accuracy (the base model's best row, Wilson interval over its n samples): met when the interval's "
        "bottom is at or above the bar.",
        "",
        "| bar | numerator | denominator | ratio* [interval] | plug-in | bar | verdict |",
        "|---|---|---|---:|---:|---:|---|",
    ]
    for ratio in ratios:
        verdict = ratio.verdict + (f" ({ratio.note})" if ratio.note else "")
        centre = ratio.corrected if finite(ratio.corrected) else ratio.value
        lines.append(
            f"| {ratio.name} | {ratio.numerator} | {ratio.denominator} | "
            f"{f'{fmt(centre, 3)} {span(ratio.low, ratio.high, 3)}'.rstrip()} | {fmt(ratio.value, 3)} | "
            f"{'≥' if ratio.direction == '>=' else '≤'} {fmt(ratio.bar, 3)} | {verdict} |"
        )
    return lines


def straightness_section(straightness: dict[str, dict[str, Any]]) -> list[str]:
    if not straightness:
        return []
    lines = [
        "",
        "## Straightness of the flow models' paths",
        "",
        "S = ∫ E‖(x_1 − x_0) − v_t‖² dt on the sampler's own path (0 = straight).",
        "",
        "| model | S | measured with |",
        "|---|---:|---|",
    ]
    for model, s in straightness.items():
        at = f" at guidance {s['guidance']:g}" if s.get("guidance") is not None else ""
        lines.append(f"| {model} | {fmt(s['value'])} | {s['sampler']}, {s['steps']} steps{at}, {s['paths']} paths |")
    return lines


def render_report(evaluation: Evaluation, location: str, curves: dict[str, dict[str, Any]] | None = None) -> str:
    """The markdown report: settings, plot, table, best rows, quality bars, the published numbers
    (not measured here) and this run's rows at their step counts, straightness, training
    curves (``outputs.training_curves``), grids."""
    rows = evaluation.rows
    numbers = reference_numbers()
    lines = [
        "# fewstep evaluation",
        "",
        *settings_lines(evaluation.info, location),
        "",
        "## FID against NFE",
        "",
        "![FID vs NFE](fid_vs_nfe.png)",
        *rows_section(rows),
        *best_sections(rows),
        *ratios_section(evaluation.ratios),
        *reference_numbers_section(numbers),
        *systems_section(rows, numbers),
        *straightness_section(evaluation.straightness),
        *curves_section(curves or {}),
        *sample_grids(evaluation.grids, rows),
    ]
    return "\n".join(lines) + "\n"
