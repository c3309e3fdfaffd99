"""What the evaluate stage writes: the metrics and draws tables, the plot, the grids, the report and its card.

Pure functions of the computed rows (no Ray, no models): the Ray tasks compute an
:class:`Evaluation` and :func:`write_evaluation` turns it into files and the stage's card.
``stage_key`` is the evaluated manifest's ref (``stage/key``); the two reference rows have
sampler ``reference``, steps and NFE 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from infra.cards import EvaluationCard
from infra.store import StageWriter, Store
from infra.tables import tensors_to_table
from workers.evaluation.plot import plot_fid_vs_nfe
from workers.evaluation.quality import Ratio
from workers.evaluation.report import render_report
from workers.evaluation.table import (
    CEILING,
    DRAWS,
    FLOOR,
    TABLE,
    Row,
    best_by_model,
    best_by_steps,
    best_row,
    finite,
    reference_row,
    rows_table,
)


@dataclass(frozen=True)
class Evaluation:
    """Everything the stage writes, before it is written."""

    rows: list[Row]  # reference rows first
    grids: dict[str, bytes]  # store file name -> PNG
    straightness: dict[str, dict[str, Any]]  # model -> {"value", "sampler", "steps", "guidance", "paths", "ref"}
    info: dict[str, Any] = field(default_factory=dict)  # extractor, n, seed, refs, test size, classifier accuracy
    ratios: list[Ratio] = field(default_factory=list)  # the quality bars, on excess over the floor
    draws: dict[str, list[float]] = field(default_factory=dict)  # Row.key -> paired FID bootstrap draws


def training_curves(store: Store, models: dict[str, str]) -> dict[str, dict[str, Any]]:
    """model name -> its stored ``curve`` record ({"curve", "heldout", ...}) plus its ``stage``,
    read through each evaluated model's manifest (models without a curve are left out)."""
    curves = {}
    for model, ref in models.items():
        manifest = store.get_ref(ref)
        if "curve" in manifest.files:
            curves[model] = {**store.read_json(manifest, "curve"), "stage": manifest.stage}
    return curves


def kept(value: Any) -> Any:
    """A card holds JSON without NaN: a non-finite number is None."""
    return value if finite(value) else None


def brief(row: Row | None) -> dict[str, Any] | None:
    """A row as the card names it: which setting, and its FID."""
    if row is None:
        return None
    return {k: getattr(row, k) for k in ("model", "stage_key", "sampler", "steps", "nfe", "guidance", "fid")}


def headline(evaluation: Evaluation) -> EvaluationCard:
    """The stage's card: best rows, references, ratios, straightness (JSON-able, no NaN)."""
    rows, info = evaluation.rows, evaluation.info
    floor, ceiling = reference_row(rows, FLOOR), reference_row(rows, CEILING)
    return EvaluationCard(
        rows=len(rows),
        best=brief(best_row(rows)),
        best_by_steps={str(s): brief(r) for s, r in best_by_steps(rows).items()},
        best_by_model={model: brief(r) for model, r in best_by_model(rows).items()},
        floor_fid=kept(floor.fid) if floor else None,
        vae_fid=kept(ceiling.fid) if ceiling else None,
        floor_class_accuracy=kept(floor.class_accuracy) if floor else None,
        vae_class_accuracy=kept(ceiling.class_accuracy) if ceiling else None,
        ratios={
            ratio.name: {k: (kept(v) if isinstance(v, float) else v) for k, v in ratio.as_dict().items()}
            for ratio in evaluation.ratios
        },
        floor_fid_interval=(kept(floor.fid_low), kept(floor.fid_high)) if floor else None,
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
