"""``fewstep run``: the whole pipeline as one Prefect flow run, with a per-stage progress view.

    fewstep run [--config FILE] [--preset quick|default] [--store URI] [--ray-address ADDR] [--serve] [--verbose]

Validates the config and the store before any work, runs the flow (Prefect's ephemeral mode
without a server, or the server ``PREFECT_API_URL`` names), shows one line per stage, and
ends with each model's headline quality, the served ref, and how to serve it or open the
report. Ray's and Prefect's own logs stay at warning level unless ``--verbose``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import typer

from flows.cli.options import PRESET_HELP, RAY_HELP, STORE_HELP

QUIET_ENV = {
    "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "WARNING",  # the Prefect UI still gets every log
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    "RAY_AIR_NEW_OUTPUT": "0",
    "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",
}
QUIET_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "ray.serve", "fewstep", "filelock")


def quiet(verbose: bool) -> None:
    """Keep Ray's and Prefect's chatter out of the view (before either is imported)."""
    os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")
    if verbose:
        logging.basicConfig(level=logging.INFO)
        return
    for name, value in QUIET_ENV.items():
        os.environ.setdefault(name, value)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def run(
    config: Path | None = typer.Option(None, "--config", help="YAML file overriding any config field."),
    preset: str = typer.Option("default", "--preset", help=PRESET_HELP),
    store: str | None = typer.Option(None, "--store", help=STORE_HELP),
    ray_address: str | None = typer.Option(None, "--ray-address", envvar="RAY_ADDRESS", help=RAY_HELP),
    serve: bool = typer.Option(False, "--serve", help="Leave the Ray Serve endpoint up afterwards."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show Ray's and Prefect's own logs."),
) -> None:
    """Run the whole pipeline: ingest, VAE, latents, base, reflow, consistency, evaluate, promote."""
    quiet(verbose)
    from infra.config import load_config
    from infra.store import Store

    cfg = load_config(preset, config)
    opened = Store.open(store)  # a bad store URI fails here, before any work

    from flows.cli.progress_view import ProgressView
    from flows.pipeline import pipeline
    from workers import progress
    from workers.runtime import ensure_ray

    ensure_ray(ray_address, verbose=verbose)
    progress.listen(ProgressView())
    try:
        summary = pipeline(config=cfg, store_uri=opened.uri, ray_address=ray_address)  # validated above, once
    finally:
        progress.listen(None)
    typer.echo(run_summary(opened, summary))
    if serve:
        from flows.cli.serve import serve_foreground
        from infra.errors import NotCommitted

        if summary["served"] is None:
            raise NotCommitted("--serve: no model is promoted in this store; see the promotion line above")
        serve_foreground(opened, cfg.serve, summary["served"], pinned=False, ray_address=ray_address)


def run_summary(store, summary: dict[str, Any]) -> str:
    """Each model's headline quality, the served ref, and what to do next."""
    from infra.cards import EvaluationCard
    from workers.evaluation.table import best_by_model, best_row, read_rows

    refs = summary["refs"]
    evaluation = store.get_ref(refs["evaluate"])
    card = EvaluationCard.from_manifest(evaluation)  # the floor and ceiling
    rows = read_rows(store, evaluation)
    lines = [
        f"fewstep: pipeline finished in {summary['seconds']} s (store {store.uri})",
        "",
        f"  FID ({card.extractor}, n={card.n}): floor {fmt(card.floor_fid)}, VAE ceiling {fmt(card.vae_fid)}",
        f"  {'MODEL':<14} {'BEST':<40} {'AT 1 STEP':<10}",
    ]
    for model, best in best_by_model(rows).items():  # a model without a finite FID shows –
        one = best_row(rows, model=model, steps=1)
        best_text = f"{fmt(best.fid)} ({best.label})" if best else "–"
        lines.append(f"  {model:<14} {best_text:<40} {fmt(one.fid if one else None):<10}")
    lines += training_notes(store, refs)
    if "retrain" in summary:  # what the run built on (absent from runs recorded before warm starts)
        lines += retrain_lines(summary["retrain"])
    from flows.artifacts import probe_warnings

    promotion = summary["promotion"]
    warnings = probe_warnings(store, refs)
    if warnings:
        lines += ["", *[f"  WARNING {w}" for w in warnings]]
    if summary["served"] is None:
        served = f"  served: nothing — {promotion['candidate']} was not promoted: {promotion['reason']}"
    else:
        scale = promotion.get("guidance") if promotion.get("promoted") else None
        at = f" (default guidance {scale:g})" if scale is not None else ""
        served = f"  served: {summary['served']}{at} — {promotion['reason']}"
    lines += ["", served, *champion_lines(store)]
    if summary["served"] is not None:  # with nothing promoted, `fewstep serve` has nothing to serve
        lines.append(f"  serve it:    fewstep serve --store {store.uri}")
    lines.append(f"  report:      {report_location(store, evaluation)}")
    return "\n".join(lines)


def retrain_lines(retrain: dict[str, Any]) -> list[str]:
    """What the run built on (workers.warm): its warm starts, the VAE's verdict, a fallback to
    scratch; [] when there was nothing to build on."""
    plan, vae, warm = retrain["plan"], retrain["vae"] or {}, retrain["warm"]
    if vae.get("action") == "retrain":
        line = f"retrain: a NEW VAE ({vae['reason']}), so every model was retrained from scratch"
    elif warm:
        line = f"retrain: warm from the served {plan['served']} ({', '.join(f'{k} <- {v}' for k, v in warm.items())})"
        if vae.get("action") == "keep":
            line += f"\n  VAE kept: {vae['reason']}"
    elif plan["fallback"]:
        line = f"retrain: from scratch, the served lineage could not be loaded ({plan['fallback']})"
    elif plan["served"]:
        line = "retrain: nothing warm-started (the served models were trained on these same data)"
    else:
        return []
    return ["", f"  {line}"]


def champion_lines(store, last: int = 5) -> list[str]:
    """The served model over time (the newest ``last`` moves of the pointer), with each champion's
    FID at the served steps as its promotion measured it; [] before the first promotion."""
    from infra.champions import read_history
    from infra.store import SERVING_POINTER

    history = read_history(store, SERVING_POINTER)
    if not history:
        return []
    lines = ["  served over time (newest last; `fewstep promote --rollback` goes back one):"]
    for e in history[-last:]:
        interval = f" [{fmt(e.get('fid_low'))}, {fmt(e.get('fid_high'))}]" if e.get("fid_low") is not None else ""
        at = f" at {e['steps']} step(s)" if e.get("steps") else ""
        when = str(e.get("at", ""))[:16].replace("T", " ")
        lines.append(f"    {when}  {e['action']:<8} {e['ref']:<36} FID {fmt(e.get('fid'))}{interval}{at}")
    return lines


def training_notes(store, refs: dict[str, str]) -> list[str]:
    """One line per generator whose held-out loss was still falling steeply at its last step
    (workers.heldout.still_falling), under a blank line; [] when none was."""
    from infra.cards import GeneratorCard
    from workers.curves import still_falling

    notes = []
    for name, ref in refs.items():
        manifest = store.get_ref(ref)
        if GeneratorCard.is_generator(manifest) and "curve" in manifest.files:
            note = still_falling(store.read_json(manifest, "curve").get("curve", []), manifest.stage, name)
            if note:
                notes.append(f"  note: {note}")
    return ["", *notes] if notes else []


def report_location(store, manifest) -> str:
    path = store.file_path(manifest, "report.md")
    return f"s3://{path}" if store.uri.startswith("s3://") else path


def fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.4g}"
