"""``fewstep evaluate``: FID against NFE for stored models, without running the pipeline.

    fewstep evaluate [--store URI] [--model REF ...] [--steps 1,2,4] [--n N] [--config FILE] [--preset NAME]

Without ``--model`` it evaluates the generators of the latest run recorded in the store
(``fewstep run`` records one), or, in a store without runs, every generator that decodes
with the newest generator's VAE. The images and the VAE come from the models' lineage; the
features stage (the feature space) is reused when it exists. Prints the metrics table and where the report,
plot and grids are. ``--steps`` replaces ``evaluate.flow_steps``, ``evaluate.consistency_steps`` (up to the student's
time grid), ``evaluate.flowmap_steps`` and ``evaluate.diffusion_steps`` (up to the DDPM's T).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from flows.cli.options import RAY_HELP, STORE_HELP
from flows.errors import UserError

SHOWN = (
    ("model", "MODEL"),
    ("sampler", "SAMPLER"),
    ("steps", "STEPS"),
    ("nfe", "NFE"),
    ("guidance", "GUIDANCE"),
    ("fid", "FID"),
    ("precision", "PRECISION"),
    ("recall", "RECALL"),
    ("class_accuracy", "CLASS_ACC"),
    ("seconds_per_image", "S/IMAGE"),
)


def parse_steps(text: str) -> list[int]:
    try:
        steps = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        steps = []
    if not steps or any(s < 1 for s in steps):
        raise UserError(f"--steps {text!r} is not a comma-separated list of positive step counts; e.g. --steps 1,2,4")
    return sorted(set(steps))


def default_generators(store) -> list:
    """The generators of the latest recorded run; else those sharing the newest generator's VAE."""
    from infra.cards import GeneratorCard

    for run in reversed(store.list_runs()):
        manifests = [store.get_ref(ref) for ref in run.get("refs", {}).values()]
        generators = [m for m in manifests if GeneratorCard.is_generator(m)]
        if generators:
            return generators
    generators = [m for m in store.list_manifests() if GeneratorCard.is_generator(m)]
    if not generators:
        raise UserError(
            f"the store {store.uri} holds no generator models; run `fewstep run --store {store.uri}` "
            "first, or pass --model REF"
        )
    vae_ref = GeneratorCard.from_manifest(generators[-1]).vae_ref  # oldest first: the last is the newest
    return [m for m in generators if GeneratorCard.from_manifest(m).vae_ref == vae_ref]


def format_cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def format_rows(rows: list) -> str:
    """The rows (:class:`workers.evaluation.table.Row`) as a plain-text table of the :data:`SHOWN` columns."""
    table = [[title for _, title in SHOWN]] + [[format_cell(getattr(row, name)) for name, _ in SHOWN] for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(SHOWN))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in table)


def evaluate(
    store: str | None = typer.Option(None, "--store", help=STORE_HELP),
    model: list[str] | None = typer.Option(
        None,
        "--model",
        help="A generator ref (stage/key); repeat for several. Default: the generators of the latest run.",
    ),
    steps: str | None = typer.Option(
        None,
        "--steps",
        help="Comma-separated step counts, e.g. 1,2,4 "
        "(default: evaluate.flow_steps / consistency_steps of the config).",
    ),
    n: int | None = typer.Option(None, "--n", help="Generated images per model, sampler and step count."),
    config: Path | None = typer.Option(None, "--config", help="YAML file; its evaluate: section applies."),
    preset: str = typer.Option("default", "--preset", help="Config preset the file applies to."),
    ray_address: str | None = typer.Option(None, "--ray-address", envvar="RAY_ADDRESS", help=RAY_HELP),
) -> None:
    """Evaluate stored models: FID, precision, recall, class accuracy and seconds per image against NFE."""
    from infra.config import load_config
    from infra.store import Store

    overrides: dict[str, Any] = {}
    if steps is not None:
        parsed = parse_steps(steps)
        limits = load_config(preset, config)  # what each family can take: a student its grid, DDPM its T
        grid = limits.consistency.intervals if limits.consistency.grid_times else None
        consistency = [s for s in parsed if grid is None or s <= grid]
        diffusion = [s for s in parsed if s <= limits.ddpm.diffusion_steps]
        overrides.update(
            flow_steps=parsed, consistency_steps=consistency, flowmap_steps=parsed, diffusion_steps=diffusion
        )
        for family, kept, limit in (
            ("consistency", consistency, grid),
            ("diffusion", diffusion, limits.ddpm.diffusion_steps),
        ):
            if len(kept) < len(parsed):
                typer.echo(
                    f"fewstep: {family} models take at most {limit} steps: evaluated at {kept or 'none'}", err=True
                )
    if n is not None:
        overrides["n"] = n
    full = load_config(preset, config, {"evaluate": overrides} if overrides else None)
    cfg = full.evaluate
    opened = Store.open(store)
    generators = [opened.get_ref(ref) for ref in model] if model else default_generators(opened)

    from infra.cards import EvaluationCard, FeaturesCard
    from workers.evaluation.plan import evaluation_inputs
    from workers.evaluation.table import read_rows
    from workers.runtime import ensure_ray
    from workers.stages.s09_features import run_features
    from workers.stages.s10_evaluate import run_evaluate

    try:
        images, vae = evaluation_inputs(opened, generators)
    except ValueError as error:
        raise UserError(str(error)) from None
    ensure_ray(ray_address)
    features = run_features(opened, full.features, images) if cfg.extractor is None else None
    manifest = run_evaluate(opened, cfg, generators, images, vae, features)
    card = EvaluationCard.from_manifest(manifest)
    typer.echo(format_rows(read_rows(opened, manifest)))
    typer.echo(f"\n{manifest.ref}  extractor {card.extractor}  n={card.n}")
    if features is not None:
        space = FeaturesCard.from_manifest(features)
        detail = f"test accuracy {format_cell(space.test_accuracy)}" if space.classifies else "self-supervised encoder"
        typer.echo(f"feature space {features.ref} ({space.kind}): {detail}")
    prefix = "s3://" if opened.uri.startswith("s3://") else ""
    typer.echo(f"report: {prefix}{opened.file_path(manifest, 'report.md')}")
