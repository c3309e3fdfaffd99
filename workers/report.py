"""What the evaluate stage writes: the metrics table, the FID-vs-NFE plot, sample grids, the report.

Pure functions of the computed rows (no Ray, no models): the evaluate stage computes an
:class:`Evaluation` and :func:`write_evaluation` turns it into files and the stage's card. A
row holds exactly :data:`infra.metrics_table.COLUMNS`; ``stage_key`` is the evaluated
manifest's ref (``stage/key``), the two reference rows have sampler ``reference``, steps and NFE 0.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from infra.cards import EvaluationCard
from infra.metrics_table import (
    CEILING,
    DRAWS,
    FLOOR,
    TABLE,
    best_by_model,
    best_by_steps,
    best_row,
    finite,
    generated,
    reference_fid,
    reference_row,
    row_label,
    rows_table,
    stage_of,
)
from infra.store import StageWriter, Store
from infra.tables import tensors_to_table
from workers.curves import curve_markdown
from workers.quality import Ratio

GRID_PER_CLASS = 4
GRID_MAX_CLASSES = 10
GRID_CELL_PX = 48  # images are upscaled (nearest) to about this size in the grids


@dataclass(frozen=True)
class Evaluation:
    """Everything the stage writes, before it is written."""

    rows: list[dict[str, Any]]  # COLUMNS, reference rows first
    grids: dict[str, bytes]  # store file name -> PNG
    straightness: dict[str, dict[str, Any]]  # model -> {"value", "sampler", "steps", "guidance", "paths", "ref"}
    info: dict[str, Any] = field(default_factory=dict)  # extractor, n, seed, refs, test size, classifier accuracy
    ratios: list[Ratio] = field(default_factory=list)  # the quality bars, on excess over the floor
    draws: dict[str, list[float]] = field(default_factory=dict)  # row_key -> paired FID bootstrap draws


def course_notes_section(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The course notes' four-system comparison on this run's table, as markdown lines.

    DDPM@1000, flow matching (base) @50, the best reflow round @2 and consistency @1: each the
    lowest-FID row of that stage's model (found by the stage of its ref; the first by name where
    a stage has several, every round for reflow) at the target step count, over its samplers.
    Where the target was not evaluated, the nearest evaluated step count stands in (the larger
    on a tie) and the row says so. Shows ``fid`` and, where the table has them, its interval
    columns (those named ``fid_*`` or ``kid*``). The notes' own FIDs are on their data and
    feature space: compare the ordering, not the values.
    """
    systems = (
        ("DDPM", "ddpm", 1000, 7.9),
        ("flow matching", "base", 50, 7.5),
        ("2-rectified flow (best reflow)", "reflow", 2, 8.0),
        ("consistency model", "consistency", 1, 9.5),
    )
    scored = generated(rows)
    extra = list(dict.fromkeys(c for r in rows for c in r if c.startswith(("fid_", "kid"))))
    lines = [
        "",
        "## Course-notes table",
        "",
        "The course notes' comparison (their FIDs in the second column, on their data and feature space: "
        "compare the ordering, not the values) on this run's rows.",
        "",
        "| system | notes: FID @ steps | model | sampler | steps | NFE | FID | "
        + "".join(f"{c} | " for c in extra)
        + "note |",
        "|---|---|---|---|---:|---:|---:|" + "---:|" * len(extra) + "---|",
    ]
    for label, stage, target, notes_fid in systems:
        mine = [r for r in scored if stage_of(r) == stage]
        if stage != "reflow":  # one model of the stage; reflow: the best of every round
            first = min((r["model"] for r in mine), default=None)
            mine = [r for r in mine if r["model"] == first]
        steps = min({r["steps"] for r in mine}, key=lambda s: (abs(s - target), -s), default=None)
        row = min((r for r in mine if r["steps"] == steps), key=lambda r: r["fid"], default=None)
        if row is None:
            lines.append(
                f"| {label} | {notes_fid} @ {target} | – | – | – | – | – | "
                + "– | " * len(extra)
                + f"not in this run (no `{stage}` stage rows with a finite FID) |"
            )
            continue
        note = "" if steps == target else f"{target} steps not evaluated: nearest evaluated step count {steps}"
        lines.append(
            f"| {label} | {notes_fid} @ {target} | {row['model']} | {row['sampler']} | {row['steps']} | "
            f"{row['nfe']} | {fmt(row['fid'])} | " + "".join(f"{fmt(row.get(c))} | " for c in extra) + f"{note} |"
        )
    return lines


def plot_fid_vs_nfe(rows: Sequence[dict[str, Any]], title: str) -> bytes:
    """FID against NFE (log x), one line per (model, sampler, guidance); dashed lines for the two references."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullLocator

    figure = Figure(figsize=(7, 4.5), dpi=100)
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    lines: dict[tuple[str, str, float | None], list[tuple[int, float, float, float]]] = {}
    for r in generated(rows):
        low = r["fid"] - r["fid_low"] if finite(r.get("fid_low")) else 0.0
        high = r["fid_high"] - r["fid"] if finite(r.get("fid_high")) else 0.0
        line = (r["model"], r["sampler"], r.get("guidance"))
        lines.setdefault(line, []).append((r["nfe"], r["fid"], max(low, 0.0), max(high, 0.0)))
    scales = {}  # model -> its scales: the legend names a scale only where a model has several
    for model, _, guidance in lines:
        scales.setdefault(model, set()).add(guidance)
    for (model, sampler, guidance), points in lines.items():
        points.sort()
        label = model if sampler == model.split("-")[0] else f"{model} ({sampler})"
        if len(scales[model]) > 1:
            label += f" w={guidance:g}"
        ax.errorbar(
            [p[0] for p in points],
            [p[1] for p in points],
            yerr=[[p[2] for p in points], [p[3] for p in points]],
            marker="o",
            capsize=2,
            label=label,
        )
    for model, label, color in (
        (FLOOR, "real train vs test (floor)", "black"),
        (CEILING, "VAE reconstructions (ceiling)", "grey"),
    ):
        row = reference_row(rows, model)
        if row is not None and finite(row["fid"]):
            ax.axhline(row["fid"], linestyle="--", color=color, linewidth=1, label=label)
            if finite(row.get("fid_low")) and finite(row.get("fid_high")):
                ax.axhspan(row["fid_low"], row["fid_high"], color=color, alpha=0.08)
    ax.set_xscale("log")
    nfes = sorted({point[0] for points in lines.values() for point in points})
    if nfes:  # plain numbers at the measured NFEs, not 10^0, 2x10^0, ...
        ax.set_xticks(nfes, [str(v) for v in nfes])
        ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("NFE (network evaluations per image)")
    ax.set_ylabel("FID")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


def make_grid(pixels: np.ndarray, labels: np.ndarray, num_classes: int) -> bytes:
    """A PNG grid: one column per class (the first few classes), ``GRID_PER_CLASS`` samples down;
    for unlabelled images, the first images in rows of ten."""
    n, h, w, c = pixels.shape if len(pixels) else (0, 1, 1, 1)
    if num_classes > 0 and (labels >= 0).any():
        classes = [y for y in range(num_classes) if (labels == y).any()][:GRID_MAX_CLASSES]
        columns = [np.flatnonzero(labels == y)[:GRID_PER_CLASS] for y in classes]
    else:
        order = np.arange(min(n, GRID_PER_CLASS * GRID_MAX_CLASSES))
        columns = [order[i::GRID_MAX_CLASSES] for i in range(min(n, GRID_MAX_CLASSES))]
    cols, pad = max(1, len(columns)), 2
    canvas = np.full((GRID_PER_CLASS * (h + pad) + pad, cols * (w + pad) + pad, c), 128, np.uint8)
    for j, index in enumerate(columns):
        for i, k in enumerate(index):
            top, left = pad + i * (h + pad), pad + j * (w + pad)
            canvas[top : top + h, left : left + w] = pixels[k]
    scale = max(1, GRID_CELL_PX // max(h, w))
    image = Image.fromarray(canvas[:, :, 0] if c == 1 else canvas)
    image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def fmt(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def span(low: Any, high: Any, digits: int = 4) -> str:
    return f"[{fmt(low, digits)}, {fmt(high, digits)}]" if finite(low) and finite(high) else ""


def kid_cell(row: dict[str, Any]) -> str:
    scaled = [row.get(k) * 1000 if finite(row.get(k)) else None for k in ("kid", "kid_low", "kid_high")]
    return f"{fmt(scaled[0], 3)} {span(scaled[1], scaled[2], 3)}"


def training_curves(store: Store, models: dict[str, str]) -> dict[str, dict[str, Any]]:
    """model name -> its stored ``curve`` record ({"curve", "heldout", ...}) plus its ``stage``,
    read through each evaluated model's manifest (models without a curve are left out)."""
    curves = {}
    for model, ref in models.items():
        manifest = store.get_ref(ref)
        if "curve" in manifest.files:
            curves[model] = {**store.read_json(manifest, "curve"), "stage": manifest.stage}
    return curves


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


def reference_accuracy_line(rows: list[dict[str, Any]]) -> list[str]:
    """The class accuracy of real images beside that of their VAE reconstructions (none without a classifier)."""
    floor, ceiling = reference_row(rows, FLOOR), reference_row(rows, CEILING)
    real, recon = (None if r is None else r.get("class_accuracy") for r in (floor, ceiling))
    if not (finite(real) and finite(recon)):
        return []
    return [
        f"Class accuracy of real train images {fmt(real, 3)}, of their VAE reconstructions {fmt(recon, 3)}: "
        "reconstructions far below real images mean the VAE loses the class, and every model of its latents "
        "inherits that."
    ]


def grid_file(model: str, sampler: str, steps: int, guidance: float | None) -> str:
    """The name of the sample grid the evaluation writes for one row."""
    return f"grids/{model}-{sampler}-{steps}-g{(1.0 if guidance is None else guidance):g}.png"


def sample_grids(grids: dict[str, bytes] | list[str], rows: list[dict[str, Any]]) -> list[str]:
    """Embedded: the real test images, their VAE reconstructions and each model's best row (one class
    per column); every other grid as a link."""
    names = sorted(grids)
    shown = [n for n in ("grids/real-test.png", "grids/vae-recon.png") if n in grids]
    captions = {"grids/real-test.png": "real test images", "grids/vae-recon.png": "VAE reconstructions (the ceiling)"}
    for model, row in best_by_model(rows).items():
        name = grid_file(row["model"], row["sampler"], row["steps"], row.get("guidance"))
        if name in grids and name not in shown:
            shown.append(name)
            captions[name] = f"{model}, its best row: {row_label(row)}, FID {fmt(row['fid'])}"
    lines = ["", "## Sample grids", "", "One class per column, in label order.", ""]
    for name in shown:
        lines += [f"**{captions[name]}**", "", f"![{captions[name]}]({name})", ""]
    rest = [n for n in names if n not in shown]
    if rest:
        lines += ["Every other row:", ""]
        lines += [f"- [{n.removeprefix('grids/').removesuffix('.png')}]({n})" for n in rest]
    return lines


def render_report(evaluation: Evaluation, location: str, curves: dict[str, dict[str, Any]] | None = None) -> str:
    """The markdown report: settings, plot, table, best per step count, quality bars, straightness,
    training curves (``training_curves``), grids."""
    rows, info = evaluation.rows, evaluation.info
    lines = [
        "# fewstep evaluation",
        "",
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
    lines += [
        f"FID is only comparable between rows of one feature space and one n. Files are under `{location}`.",
        f"Intervals ({fmt(100 * info.get('interval_level', 0.95), 3)}%): FID by a paired bootstrap "
        f"({info.get('fid_resamples', '?')} draws, basic interval: for the population FID, so it may reach "
        "below 0 near the floor), KID over random subsets. Read models against the floor: a difference "
        "inside the intervals is not a result.",
        "",
        "## FID against NFE",
        "",
        "![FID vs NFE](fid_vs_nfe.png)",
        "",
        "## All rows",
        "",
        "| model | sampler | steps | NFE | guidance | FID [interval] | KID ×1000 [interval] | precision | recall "
        "| class acc. | s / image | stage |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['sampler']} | {r['steps']} | {r['nfe']} | {fmt(r['guidance'])} | "
            f"{fmt(r['fid'])} {span(r.get('fid_low'), r.get('fid_high'))} | "
            f"{kid_cell(r)} | {fmt(r['precision'], 3)} | {fmt(r['recall'], 3)} | "
            f"{fmt(r['class_accuracy'], 3)} | {fmt(r['seconds_per_image'], 3)} | `{r['stage_key']}` |"
        )
    lines += [
        "",
        f"Reference rows: `{FLOOR}` scores real train images (the floor at this n); "
        f"`{CEILING}` the same images encoded and decoded by the VAE (the best its latents allow).",
        *reference_accuracy_line(rows),
        "",
        "## Best of each model",
        "",
        "Over samplers, step counts and guidance scales.",
        "",
    ]
    for model, r in best_by_model(rows).items():
        lines.append(f"- {model} best: {row_label(r)} (FID {fmt(r['fid'])}, NFE {r['nfe']})")
    lines += [
        "",
        "## Best at each step count",
        "",
        "| steps | model | sampler | guidance | FID |",
        "|---:|---|---|---:|---:|",
    ]
    for steps, r in best_by_steps(rows).items():
        lines.append(f"| {steps} | {r['model']} | {r['sampler']} | {fmt(r['guidance'])} | {fmt(r['fid'])} |")
    lines += [
        "",
        "## Quality bars (excess FID over the floor)",
        "",
        "ratio = (FID − floor) / (FID of the denominator − floor); met when the interval's top is at or below the bar. "
        "Class accuracy (the base model's best row, Wilson interval over its n samples): met when the interval's "
        "bottom is at or above the bar.",
        "",
        "| bar | numerator | denominator | ratio [interval] | bar | verdict |",
        "|---|---|---|---:|---:|---|",
    ]
    for ratio in evaluation.ratios:
        verdict = ratio.verdict + (f" ({ratio.note})" if ratio.note else "")
        lines.append(
            f"| {ratio.name} | {ratio.numerator} | {ratio.denominator} | {fmt(ratio.value, 3)} "
            f"{span(ratio.low, ratio.high, 3)} | {'≥' if ratio.direction == '>=' else '≤'} {fmt(ratio.bar, 3)} "
            f"| {verdict} |"
        )
    lines += course_notes_section(rows)
    if evaluation.straightness:
        lines += [
            "",
            "## Straightness of the flow models' paths",
            "",
            "S = ∫ E‖(x_1 − x_0) − v_t‖² dt on the sampler's own path (0 = straight).",
            "",
            "| model | S | measured with |",
            "|---|---:|---|",
        ]
        for model, s in evaluation.straightness.items():
            at = f" at guidance {s['guidance']:g}" if s.get("guidance") is not None else ""
            lines.append(
                f"| {model} | {fmt(s['value'])} | {s['sampler']}, {s['steps']} steps{at}, {s['paths']} paths |"
            )
    lines += curves_section(curves or {})
    lines += sample_grids(evaluation.grids, rows)
    return "\n".join(lines) + "\n"


def headline(evaluation: Evaluation) -> EvaluationCard:
    """The stage's card: best rows, references, ratios, straightness (JSON-able, no NaN)."""
    rows, info = evaluation.rows, evaluation.info

    def brief(r: dict[str, Any] | None) -> dict[str, Any] | None:
        keys = ("model", "stage_key", "sampler", "steps", "nfe", "guidance", "fid")
        return None if r is None else {k: r[k] for k in keys}

    def kept(value: Any) -> Any:
        return value if finite(value) else None

    floor = reference_row(rows, FLOOR)
    ceiling = reference_row(rows, CEILING)

    return EvaluationCard(
        rows=len(rows),
        best=brief(best_row(rows)),
        best_by_steps={str(s): brief(r) for s, r in best_by_steps(rows).items()},
        best_by_model={model: brief(r) for model, r in best_by_model(rows).items()},
        floor_fid=kept(reference_fid(rows, FLOOR)),
        vae_fid=kept(reference_fid(rows, CEILING)),
        floor_class_accuracy=kept(floor.get("class_accuracy")) if floor else None,
        vae_class_accuracy=kept(ceiling.get("class_accuracy")) if ceiling else None,
        ratios={
            ratio.name: {k: (kept(v) if isinstance(v, float) else v) for k, v in ratio.as_dict().items()}
            for ratio in evaluation.ratios
        },
        floor_fid_interval=(kept(floor.get("fid_low")), kept(floor.get("fid_high"))) if floor else None,
        straightness={model: s["value"] for model, s in evaluation.straightness.items()},
        **info,
    )


def write_evaluation(writer: StageWriter, evaluation: Evaluation) -> EvaluationCard:
    info = evaluation.info
    writer.write_table(
        TABLE,
        rows_table(evaluation.rows),
        metadata={
            "fewstep.extractor": str(info["extractor"]),
            "fewstep.seed": str(info["seed"]),
            "fewstep.images_ref": str(info["images_ref"]),
            "fewstep.n_test": str(info["n_test"]),
        },
    )
    title = f"FID vs NFE — {info['extractor']}, n={info['n']}"
    writer.write_bytes("fid_vs_nfe.png", plot_fid_vs_nfe(evaluation.rows, title))
    if evaluation.draws:
        keys = sorted(evaluation.draws)
        writer.write_table(
            DRAWS, tensors_to_table({"row": np.array(keys), "draws": np.array([evaluation.draws[k] for k in keys])})
        )
    for name, png in sorted(evaluation.grids.items()):
        writer.write_bytes(name, png)
    writer.write_json("straightness", evaluation.straightness)
    location = f"s3://{writer.prefix}" if writer.store.uri.startswith("s3://") else writer.prefix
    curves = training_curves(writer.store, info.get("models", {}))
    writer.write_bytes("report.md", render_report(evaluation, location, curves).encode())
    return headline(evaluation)
