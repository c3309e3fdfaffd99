"""``fewstep schedule``: the pipeline as a Prefect deployment on a cron schedule.

Prefect runs a scheduled deployment through something that polls for its runs. fewstep
uses the simplest one, a long-running serve process (``Flow.serve``): ``fewstep schedule
--cron "0 3 * * 0"`` registers the deployment and then executes its runs in the
foreground until Ctrl-C. ``--register-only --work-pool NAME`` just registers it on a work
pool, for teams that run workers (``prefect worker start --pool NAME``) on machines where
fewstep is installed; the repository's ``prefect.yaml`` is the same deployment written out
for ``prefect deploy`` (see the README, "Scaling out").

``--on-new-data`` adds a second way in: a Prefect trigger that runs the same deployment when a
``fewstep.data.landed`` event names the config's ``ingest.source`` (:mod:`flows.trigger`; sent
by ``fewstep watch`` or an S3 notification forwarder, README "Retraining"). The cron stays as
the fallback for data that landed while nothing was watching.
"""

from __future__ import annotations

from pathlib import Path

import typer

from flows.cli.options import PRESET_HELP, RAY_HELP, STORE_HELP
from flows.errors import UserError

DEPLOYMENT_NAME = "scheduled"


def build_deployment(
    cron: str,
    config: Path | None,
    preset: str,
    store: str | None,
    ray_address: str | None,
    name: str,
    timezone: str | None,
    on_new_data: bool = False,
):
    """A RunnerDeployment of the pipeline flow with the validated config as its parameters,
    triggered also by new data in its source when ``on_new_data``."""
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
        raise UserError(
            f"invalid cron expression {cron!r}: {error}. Example: --cron '0 3 * * 0' (Sundays 03:00)"
        ) from None
    triggers = []
    if on_new_data:
        from flows.trigger import data_trigger
        from workers.sources.listing import BUILTIN

        if cfg.ingest.source in BUILTIN:
            raise UserError(
                f"--on-new-data watches ingest.source, but {cfg.ingest.source!r} is a built-in set that never "
                "changes: set ingest.source in --config to an image folder, a Parquet file/folder or an s3:// URI"
            )
        triggers.append(data_trigger(cfg.ingest.source, name))
    return pipeline.to_deployment(
        name=name,
        schedule=schedule,
        triggers=triggers,
        parameters={"config": cfg.model_dump(mode="json"), "store_uri": store, "ray_address": ray_address},
        description=f"fewstep pipeline ({preset} preset{', ' + str(config) if config else ''}) on {store or './fewstep-store'}",
        tags=["fewstep"],
        entrypoint_type=EntrypointType.MODULE_PATH,
    )


def schedule(
    cron: str = typer.Option(..., "--cron", help='Cron expression, e.g. "0 3 * * 0" (Sundays 03:00).'),
    config: Path | None = typer.Option(None, "--config", help="YAML file overriding any config field."),
    preset: str = typer.Option("default", "--preset", help=PRESET_HELP),
    store: str | None = typer.Option(None, "--store", help=STORE_HELP),
    ray_address: str | None = typer.Option(None, "--ray-address", help=RAY_HELP),
    name: str = typer.Option(DEPLOYMENT_NAME, "--name", help="Deployment name."),
    timezone: str | None = typer.Option(None, "--timezone", help="IANA time zone of the cron (default UTC)."),
    register_only: bool = typer.Option(
        False, "--register-only", help="Register the deployment and exit; a work pool's worker runs it."
    ),
    work_pool: str | None = typer.Option(
        None, "--work-pool", help="With --register-only: the work pool whose workers run it."
    ),
    on_new_data: bool = typer.Option(
        False,
        "--on-new-data",
        help="Also run when a fewstep.data.landed event names ingest.source (sent by `fewstep watch`); "
        "the cron stays as the fallback.",
    ),
) -> None:
    """Run the pipeline on a cron schedule as a Prefect deployment (served in the foreground)."""
    from prefect import serve

    if work_pool is not None and not register_only:
        raise UserError("--work-pool needs --register-only: a served deployment runs in this process, not on a pool")
    if on_new_data:
        from flows.trigger import require_api

        require_api()  # an in-process server would run the trigger, but no watcher could reach it
    deployment = build_deployment(cron, config, preset, store, ray_address, name, timezone, on_new_data)
    also = ""
    if on_new_data:
        from flows.trigger import EVENT, resource_id, source_uri

        source = deployment.parameters["config"]["ingest"]["source"]
        also = f" and on {EVENT} for {resource_id(source)} (send it with: fewstep watch {source_uri(source)})"
    if register_only:
        from prefect.deployments.runner import DeploymentApplyError

        try:
            deployment_id = deployment.apply(work_pool_name=work_pool)
        except DeploymentApplyError as error:
            raise UserError(
                f"could not register deployment 'pipeline/{name}'{' on work pool ' + repr(work_pool) if work_pool else ''}: "
                f"{error}. Create the pool first: prefect work-pool create {work_pool or 'NAME'} --type process"
            ) from None
        where = (
            f" on work pool {work_pool!r} (start a worker: prefect worker start --pool {work_pool})"
            if work_pool
            else ""
        )
        typer.echo(f"registered deployment 'pipeline/{name}' ({deployment_id}) with cron {cron!r}{also}{where}")
        return
    typer.echo(f"serving deployment 'pipeline/{name}' with cron {cron!r}{also}; Ctrl-C stops it")
    serve(deployment)
