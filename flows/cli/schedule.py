"""``fewstep schedule``: the pipeline as a Prefect deployment on a cron schedule.

Prefect runs a scheduled deployment through something that polls for its runs. fewstep
uses the simplest one, a long-running serve process (``Flow.serve``): ``fewstep schedule
--cron "0 3 * * 0"`` registers the deployment and then executes its runs in the
foreground until Ctrl-C. ``--register-only`` just registers it, for teams that run a work
pool and worker instead (see the README).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from flows.cli.options import PRESET_HELP, RAY_HELP, STORE_HELP
from flows.errors import UserError

DEPLOYMENT_NAME = "scheduled"


def build_deployment(cron: str, config: Path | None, preset: str, store: str | None,
                     ray_address: str | None, name: str, timezone: str | None):
    """A RunnerDeployment of the pipeline flow with the validated config as its parameters."""
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.deployments.runner import EntrypointType

    from flows.pipeline import pipeline
    from infra.config import load_config
    from infra.store import Store

    cfg = load_config(preset, config)  # refused here, before anything is registered
    Store.open(store)
    try:
        schedule = CronSchedule(cron=cron, timezone=timezone)
    except ValueError as error:
        raise UserError(f"invalid cron expression {cron!r}: {error}. Example: --cron '0 3 * * 0' (Sundays 03:00)") from None
    return pipeline.to_deployment(
        name=name,
        schedule=schedule,
        parameters={"config": cfg.model_dump(mode="json"), "store_uri": store, "ray_address": ray_address},
        description=f"fewstep pipeline ({preset} preset{', ' + str(config) if config else ''}) on {store or './fewstep-store'}",
        tags=["fewstep"],
        entrypoint_type=EntrypointType.MODULE_PATH,
    )


def schedule(
    cron: str = typer.Option(..., "--cron", help='Cron expression, e.g. "0 3 * * 0" (Sundays 03:00).'),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML file overriding any config field."),
    preset: str = typer.Option("default", "--preset", help=PRESET_HELP),
    store: Optional[str] = typer.Option(None, "--store", help=STORE_HELP),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help=RAY_HELP),
    name: str = typer.Option(DEPLOYMENT_NAME, "--name", help="Deployment name."),
    timezone: Optional[str] = typer.Option(None, "--timezone", help="IANA time zone of the cron (default UTC)."),
    register_only: bool = typer.Option(False, "--register-only",
                                       help="Register the deployment and exit; a work pool's worker runs it."),
) -> None:
    """Run the pipeline on a cron schedule as a Prefect deployment (served in the foreground)."""
    from prefect import serve

    deployment = build_deployment(cron, config, preset, store, ray_address, name, timezone)
    if register_only:
        deployment_id = deployment.apply()
        typer.echo(f"registered deployment 'pipeline/{name}' ({deployment_id}) with cron {cron!r}")
        return
    typer.echo(f"serving deployment 'pipeline/{name}' with cron {cron!r}; Ctrl-C stops it")
    serve(deployment)
