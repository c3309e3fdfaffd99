"""What a run shows in the Prefect UI: a table and a report per stage, the probe verdicts, the run summary.

Artifacts are written under stable keys (``fewstep-<stage>-metrics``, ``fewstep-fid-vs-steps``,
``fewstep-probe-<model>``, ``fewstep-promotion``, ``fewstep-run-report`` ...), so the UI's artifact
page keeps their history.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from infra.cards import ProbeCard
from infra.store import Manifest, Store
from workers.curves import curve_markdown
from workers.evaluation.table import read_rows


def artifact_key(*parts: str) -> str:
    """``fewstep-<parts>``: Prefect's artifact keys take lowercase letters, digits and dashes only."""
    return "-".join(["fewstep", *parts]).replace("_", "-").lower()


def publish_stage(manifest: Manifest, store: Store | None = None) -> None:
    """A small metrics table per stage (a generator's held out loss among them: ``final_heldout_loss``),
    under a stable artifact key; for a training stage with a stored curve, its curve table too."""
    rows = [{"metric": k, "value": str(v)} for k, v in sorted(manifest.metrics.items())]
    create_table_artifact(
        key=artifact_key(manifest.stage, "metrics"),
        table=rows,
        description=f"{manifest.ref} — metrics of the `{manifest.stage}` stage",
    )
    if store is not None and "curve" in manifest.files:
        record = store.read_json(manifest, "curve")
        lines = curve_markdown(manifest.ref, record.get("curve", []), record.get("heldout"), manifest.stage)
        create_markdown_artifact(
            key=artifact_key(manifest.stage, "curve"),
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


def publish_promotion(decision: dict) -> None:
    """Champion against challenger: the decision and its figures (``PromotionDecision.as_dict()``)."""
    create_markdown_artifact(
        key="fewstep-promotion",
        markdown=promotion_report(decision),
        description=f"{decision['candidate']} against the served {decision['current'] or '(nothing)'}",
    )


def publish_run(
    store: Store,
    refs: dict[str, str],
    seconds: float,
    decision: dict,
    served: str | None,
    history: Sequence[dict] = (),
) -> None:
    """The run's stages and refs as a table, and its summary (what is served, the probes' warnings,
    the served model's quality over time from the champion ``history``)."""
    rows = [{"stage": name, "ref": ref} for name, ref in refs.items()] + [
        {"stage": "served", "ref": served or "(none)"}
    ]
    create_table_artifact(key="fewstep-run-summary", table=rows, description="Stages of this run and their refs")
    create_markdown_artifact(
        key="fewstep-run-report",
        markdown=run_report(refs, seconds, decision, served, probe_warnings(store, refs), history),
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


def bounds(pair: Sequence[float] | None, signed: bool = False) -> str:
    if not pair:
        return "–"
    return f"[{pair[0]:+.4g}, {pair[1]:+.4g}]" if signed else f"[{pair[0]:.4g}, {pair[1]:.4g}]"


def promotion_report(decision: dict) -> str:
    """The champion (served before), the challenger, their FIDs at the served steps with intervals,
    the paired difference, and the verdict with its reason."""
    verdict = "promoted" if decision["promoted"] else "not promoted"
    steps = decision["steps"]
    lines = [
        f"# Champion against challenger: {verdict}",
        "",
        f"FID at the served {steps} step(s), each model with the sampler it is served with "
        f"(the challenger's: `{decision['sampler']}`).",
        "",
        "| role | ref | FID | interval | evaluation |",
        "|---|---|---:|---|---|",
        f"| champion (served before) | `{decision['current'] or '(none)'}` | {fmt(decision['current_fid'])} "
        f"| {bounds(decision.get('current_interval'))} | `{decision.get('current_evaluation') or '–'}` |",
        f"| challenger | `{decision['candidate']}` | {fmt(decision['candidate_fid'])} "
        f"| {bounds(decision.get('candidate_interval'))} | `{decision.get('candidate_evaluation') or '–'}` |",
        "",
    ]
    if decision.get("difference"):
        lines.append(
            f"Paired difference FID(challenger) − FID(champion): {bounds(decision['difference'], signed=True)} "
            "(one evaluation: the same test images and the same seeds; paired bootstrap)."
        )
    else:
        lines.append("Paired difference: – (the two were not scored by one evaluation).")
    lines += ["", f"**Decision:** {verdict}. {decision['reason']}"]
    return "\n".join(lines) + "\n"


def champion_table(history: Sequence[dict], last: int = 12) -> list[str]:
    """The served model over time: one row per move of the pointer (the newest ``last``), with the
    champion's FID at the served steps as its promotion measured it."""
    if not history:
        return []
    lines = [
        "## Served model over time",
        "",
        "| since (UTC) | action | served ref | FID | interval | at | run |",
        "|---|---|---|---:|---|---|---|",
    ]
    for e in history[-last:]:
        at = f"{e['steps']} step(s) {e.get('sampler') or ''}".strip() if e.get("steps") else "–"
        low, high = e.get("fid_low"), e.get("fid_high")
        lines.append(
            f"| {str(e.get('at', ''))[:19].replace('T', ' ')} | {e['action']} | `{e['ref']}` | {fmt(e.get('fid'))} "
            f"| {bounds((low, high) if low is not None and high is not None else None)} | {at} | {e.get('run_id') or 'by hand'} |"
        )
    return lines


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
    refs: dict[str, str],
    seconds: float,
    decision: dict,
    served: str | None,
    warnings: list[str] = (),
    history: Sequence[dict] = (),
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
    champions = champion_table(history)
    lines += ["", *champions] if champions else []
    lines += [
        "",
        "The FID-vs-steps table, the evaluation report and the champion-against-challenger decision are the "
        "artifacts `fewstep-fid-vs-steps`, `fewstep-evaluation-report` and `fewstep-promotion`.",
    ]
    return "\n".join(lines) + "\n"
