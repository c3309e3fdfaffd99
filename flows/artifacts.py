"""What a run shows in the Prefect UI: a table and a report per stage, the probe verdicts, the run summary.

Artifacts are written under stable keys (``fewstep-<stage>-metrics``, ``fewstep-fid-vs-steps``,
``fewstep-probe-<model>``, ``fewstep-run-report`` ...), so the UI's artifact page keeps their history.
"""

from __future__ import annotations

from typing import Any

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from infra.cards import ProbeCard
from infra.store import Manifest, Store
from workers.curves import curve_markdown
from workers.evaluation.table import read_rows


def publish_stage(manifest: Manifest, store: Store | None = None) -> None:
    """A small metrics table per stage (a generator's held out loss among them: ``final_heldout_loss``),
    under a stable artifact key; for a training stage with a stored curve, its curve table too."""
    rows = [{"metric": k, "value": str(v)} for k, v in sorted(manifest.metrics.items())]
    create_table_artifact(
        key=f"fewstep-{manifest.stage}-metrics",
        table=rows,
        description=f"{manifest.ref} — metrics of the `{manifest.stage}` stage",
    )
    if store is not None and "curve" in manifest.files:
        record = store.read_json(manifest, "curve")
        lines = curve_markdown(manifest.ref, record.get("curve", []), record.get("heldout"), manifest.stage)
        create_markdown_artifact(
            key=f"fewstep-{manifest.stage}-curve",
            markdown="\n".join([f"# Training curve of `{manifest.ref}`", "", *lines]) + "\n",
            description=f"{manifest.ref} — training and held-out loss at each checkpoint",
        )


def publish_evaluation(store: Store, manifest: Manifest) -> None:
    """The FID-vs-steps table and the evaluation report of an evaluate stage."""
    create_table_artifact(
        key="fewstep-fid-vs-steps",
        table=[stringify(row.to_record()) for row in read_rows(store, manifest)],
        description=f"{manifest.ref} — FID, precision, recall and class accuracy against steps",
    )
    create_markdown_artifact(
        key="fewstep-evaluation-report",
        markdown=store.read_bytes(manifest, "report.md").decode(),
        description=f"{manifest.ref} — evaluation report (plot and sample grids in the store)",
    )


def publish_probe(card: ProbeCard, ref: str, label: str) -> None:
    create_markdown_artifact(
        key=f"fewstep-probe-{label}", markdown=probe_report(card, ref), description=f"{ref} — probe"
    )


def publish_run(store: Store, refs: dict[str, str], seconds: float, decision: dict, served: str | None) -> None:
    """The run's stages and refs as a table, and its summary (what is served, the probes' warnings)."""
    rows = [{"stage": name, "ref": ref} for name, ref in refs.items()] + [
        {"stage": "served", "ref": served or "(none)"}
    ]
    create_table_artifact(key="fewstep-run-summary", table=rows, description="Stages of this run and their refs")
    create_markdown_artifact(
        key="fewstep-run-report",
        markdown=run_report(refs, seconds, decision, served, probe_warnings(store, refs)),
        description="fewstep run summary",
    )


def probe_report(card: ProbeCard, ref: str) -> str:
    verdict = "learned" if card.learned else f"**WARNING** {card.verdict}"
    lines = [
        f"# Probe of `{card.model_ref}`",
        "",
        f"{verdict}",
        "",
        f"{card.n} samples per scale, {card.sampler} at {card.steps} step(s), features `{card.extractor}`; "
        f"chance {fmt(card.chance)}; floor FID {fmt(card.floor_fid)} (class accuracy {fmt(card.floor_accuracy)}), "
        f"VAE ceiling FID {fmt(card.ceiling_fid)} (class accuracy {fmt(card.ceiling_accuracy)}).",
        "",
        "FID* is the bias-corrected FID its interval is built around; the plug-in FID (ranked on) may lie outside it.",
        "",
        "| guidance | FID* | interval | plug-in FID | class accuracy | interval |",
        "|---:|---:|---|---:|---:|---|",
    ]
    for s in card.scales:
        best = " (best)" if s["guidance"] == card.best_guidance else ""
        centre = s.get("fid_corrected", s["fid"])  # probes of an older fewstep have no corrected FID
        lines.append(
            f"| {s['guidance']:g}{best} | {fmt(centre)} | [{fmt(s['fid_low'])}, {fmt(s['fid_high'])}] "
            f"| {fmt(s['fid'])} | {fmt(s['class_accuracy'])} | [{fmt(s['accuracy_low'])}, {fmt(s['accuracy_high'])}] |"
        )
    lines += ["", f"Probe `{ref}`; sample grids `grids/guidance-<g>.png` in the store."]
    return "\n".join(lines) + "\n"


def fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.4g}"


def stringify(row: dict[str, Any]) -> dict[str, Any]:
    """Prefect table artifacts want plain cells; floats keep 4 significant digits."""
    return {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in row.items()}


def probe_warnings(store: Store, refs: dict[str, str]) -> list[str]:
    """The verdicts of this run's probes that are warnings, in stage order."""
    cards = [ProbeCard.from_manifest(store.get_ref(ref)) for name, ref in refs.items() if name.startswith("probe_")]
    return [card.verdict for card in cards if not card.learned]


def served_line(decision: dict, served: str | None) -> str:
    """What is served after this run, and why, in plain words."""
    if served is None:
        return f"**Nothing is served.** {decision['candidate']} was not promoted: {decision['reason']}"
    return f"**Served model:** `{served}` — promotion: {decision['reason']}"


def run_report(
    refs: dict[str, str], seconds: float, decision: dict, served: str | None, warnings: list[str] = ()
) -> str:
    lines = [
        "# fewstep run",
        "",
        f"Finished in {seconds:.1f} s.",
        "",
        served_line(decision, served),
        "",
        *[f"- **WARNING** {w}" for w in warnings],
        *([""] if warnings else []),
        "| stage | ref |",
        "|---|---|",
    ]
    lines += [f"| {name} | `{ref}` |" for name, ref in refs.items()]
    lines += [
        "",
        "The FID-vs-steps table and the evaluation report are the artifacts "
        "`fewstep-fid-vs-steps` and `fewstep-evaluation-report`.",
    ]
    return "\n".join(lines) + "\n"
