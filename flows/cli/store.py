"""``fewstep status`` and ``fewstep gc``: what the store holds, and what it may drop.

    fewstep status [--store URI] [--json]
    fewstep gc     [--store URI] [--min-age-hours H] [--yes]
    fewstep unpin  NAME [--store URI]

A store error (bad URI, missing bucket, rejected credentials, unreachable endpoint, a
corrupt file) prints one line on stderr and exits with status 2 (in :func:`flows.cli.main`).
"""

from __future__ import annotations

import json
from typing import Any

import typer

from flows.cli.options import STORE_HELP

ENDPOINT_HELP = "S3 endpoint URL (default: AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, else AWS)."
HEADLINE_METRICS = 5


def open_store(uri: str | None, endpoint_url: str | None, region: str | None):
    from infra.store import Store

    return Store.open(uri, endpoint_url=endpoint_url, region=region)


def format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def headline(metrics: dict[str, Any], limit: int = HEADLINE_METRICS) -> str:
    """The first few scalar metrics as ``name=value``."""
    scalars = [(k, v) for k, v in metrics.items() if isinstance(v, (int, float, str, bool)) and len(str(v)) <= 40]
    text = " ".join(f"{k}={format_value(v)}" for k, v in scalars[:limit])
    return text + (" …" if len(scalars) > limit else "")


def stage_headline(manifest) -> str:
    """The progress view's one-line summary of a stage, or its first metrics."""
    from flows.cli.progress_view import HEADLINES

    try:
        return HEADLINES[manifest.stage](manifest)
    except Exception:  # noqa: BLE001 - written by other code (no card): show what it recorded
        return headline(manifest.metrics)


def table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def human_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"  # pragma: no cover


def status(
    store: str | None = typer.Option(None, "--store", help=STORE_HELP),
    endpoint_url: str | None = typer.Option(None, "--endpoint-url", help=ENDPOINT_HELP),
    region: str | None = typer.Option(None, "--region", help="S3 region (default: AWS_REGION / AWS_DEFAULT_REGION)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document instead of tables."),
) -> None:
    """Committed stages with their keys, lineage (input refs) and headline metrics; pointers; runs."""
    from infra.gc import load_manifests
    from infra.version import CODE_VERSION
    from workers.stages import stage_code_versions

    current = stage_code_versions()

    opened = open_store(store, endpoint_url, region)
    manifests, damaged = load_manifests(opened)
    ordered = sorted(manifests.values(), key=lambda m: (m.created_at, m.ref))
    pointers, bad_pointers = opened.scan_pointers()
    pins, bad_pins = opened.scan_pins()
    runs, bad_runs = opened.scan_runs()
    damaged.update({f"pointer {n}": why for n, why in bad_pointers.items()})
    damaged.update({f"pin {n}": why for n, why in bad_pins.items()})
    damaged.update({f"run {n}": why for n, why in bad_runs.items()})
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "store": opened.uri,
                    "code_version": CODE_VERSION,
                    "stages": [
                        {
                            "ref": m.ref,
                            "stage": m.stage,
                            "key": m.key,
                            "created_at": m.created_at,
                            "inputs": m.inputs,
                            "metrics": m.metrics,
                            "code_version": m.code_version,
                            "digest": m.digest,
                        }
                        for m in ordered
                    ],
                    "damaged": damaged,
                    "pointers": pointers,
                    "pins": pins,
                    "runs": runs,
                },
                indent=2,
            )
        )
        return
    typer.echo(f"store {opened.uri}  (code {CODE_VERSION})")
    if not ordered:
        typer.echo("no committed stages")
    else:
        rows = [["STAGE", "KEY", "CREATED (UTC)", "INPUTS", "METRICS"]]
        older = False
        for m in ordered:
            mark = "" if m.code_version == current.get(m.stage, CODE_VERSION) else "*"
            older = older or bool(mark)
            rows.append(
                [
                    m.stage,
                    m.key + mark,
                    m.created_at[:19].replace("T", " "),
                    ",".join(m.inputs) or "-",
                    stage_headline(m),
                ]
            )
        typer.echo(table(rows))
        if older:
            typer.echo("* written by other code than this stage's today (a re-run computes a new key)")
    for ref, reason in sorted(damaged.items()):
        typer.echo(f"damaged {ref}: {reason}")
    if pointers:
        typer.echo("pointers:")
        for name, ref in pointers.items():
            typer.echo(f"  {name} -> {ref}{rollback_note(opened, name)}")
    if pins:
        typer.echo("pins (kept by gc until unpinned):")
        for name, pin in pins.items():
            typer.echo(
                f"  {name} -> {pin['ref']}  (since {str(pin.get('pinned_at', '?'))[:19]}, "
                f"heartbeat {str(pin.get('heartbeat_at', '?'))[:19]})"
            )
    if runs:
        typer.echo(
            f"runs: {len(runs)} recorded, latest {runs[-1].get('run_id')} at {str(runs[-1].get('created_at', '?'))[:19]}"
        )
        for run in runs:
            if run["status"] == "running":
                typer.echo(f"  running {run['run_id']}: heartbeat {str(run.get('heartbeat_at'))[:19]}")


def rollback_note(store, pointer: str) -> str:
    """Where ``fewstep promote --rollback`` would take ``pointer``, from its champion history."""
    from infra.champions import champion_stack, read_history
    from infra.errors import StoreError

    try:
        stack = champion_stack(read_history(store, pointer))
    except StoreError as error:  # a broken history is listed, never fatal to status
        return f"  (champion history unreadable: {error})"
    if len(stack) < 2:
        return ""
    return f"  (previous champion {stack[-2]['ref']}: `fewstep promote --rollback`)"


def gc(
    store: str | None = typer.Option(None, "--store", help=STORE_HELP),
    endpoint_url: str | None = typer.Option(None, "--endpoint-url", help=ENDPOINT_HELP),
    region: str | None = typer.Option(None, "--region", help="S3 region (default: AWS_REGION / AWS_DEFAULT_REGION)."),
    yes: bool = typer.Option(False, "--yes", help="Delete what is listed (without it, only list)."),
    min_age_hours: float = typer.Option(
        1.0, "--min-age-hours", help="Leave anything written more recently than this (at least 0.25)."
    ),
) -> None:
    """List staging leftovers, finished checkpoints and outputs no run references; --yes deletes them."""
    from infra.gc import apply_gc, plan_gc

    opened = open_store(store, endpoint_url, region)
    plan = plan_gc(opened, min_age_s=min_age_hours * 3600)
    for line in plan.damaged:
        typer.echo(f"damaged (left alone): {line}")
    for note in plan.notes:
        typer.echo(f"note: {note}")
    if not plan.items:
        typer.echo(f"nothing to collect in {opened.uri}")
        return
    root = opened.root.rstrip("/") + "/"
    rows = [[item.kind, human_size(item.size), item.path.removeprefix(root), item.reason] for item in plan.items]
    typer.echo(table(rows))
    if yes:
        result = apply_gc(opened, plan)
        for item, why in result.kept:
            typer.echo(f"kept {item.path.removeprefix(root)}: {why}")
        typer.echo(f"removed {len(result.removed)} items, {human_size(result.size)}")
    else:
        typer.echo(
            f"would remove {len(plan.items)} items, {human_size(plan.size)}; run again with --yes to delete them"
        )


def unpin(
    name: str = typer.Argument(..., help="The pin's name, as `fewstep status` lists it under pins."),
    store: str | None = typer.Option(None, "--store", help=STORE_HELP),
    endpoint_url: str | None = typer.Option(None, "--endpoint-url", help=ENDPOINT_HELP),
    region: str | None = typer.Option(None, "--region", help="S3 region (default: AWS_REGION / AWS_DEFAULT_REGION)."),
) -> None:
    """Release a pin (e.g. one `serve --emit-config --model` made), so gc may collect its model."""
    from flows.errors import UserError

    opened = open_store(store, endpoint_url, region)
    pins, _ = opened.scan_pins()
    if name not in pins:
        known = ", ".join(sorted(pins)) or "none"
        raise UserError(f"no pin named {name!r} in {opened.uri} (pins: {known})")
    opened.unpin(name)
    typer.echo(f"fewstep: unpinned {name} ({pins[name].get('ref')}); gc may now collect it")
