"""The ``fewstep`` command line: run, serve, evaluate, status, gc, schedule.

Errors a user can act on (bad config, bad store URI, a missing model) print one line
on stderr and exit with status 2; no traceback. Heavy imports (torch, Ray, Prefect)
happen inside the commands so ``fewstep --help`` answers at once.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer

from flows.errors import UserError

app = typer.Typer(
    name="fewstep",
    help="Turn an image dataset into a served few-step generative model.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

StoreOption = typer.Option(None, "--store", help="Local folder or s3://bucket/prefix (default ./fewstep-store).")


def user_errors() -> tuple[type[BaseException], ...]:
    """The exception types that are the user's to fix, not bugs (resolved lazily)."""
    from infra.config import ConfigError

    kinds: list[type[BaseException]] = [UserError, ConfigError]
    try:
        from infra.errors import StoreError

        kinds.append(StoreError)
    except ImportError:  # the store is optional for --help
        pass
    return tuple(kinds)


def user_cause(error: BaseException) -> BaseException | None:
    """The user's error behind ``error``, if any: itself, or what a remote task raised.

    A stage that fails inside a Ray task or worker reaches the driver wrapped (Ray's task
    errors keep the original as ``.cause``; Prefect re-raises with ``__cause__``); the
    user should read the original one-line message, not the remote traceback.
    """
    seen: set[int] = set()
    kinds = user_errors()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        remote = getattr(error, "cause", None)  # Ray's RayTaskError: its str() is the remote traceback
        if isinstance(remote, BaseException):
            error = remote
            continue
        if isinstance(error, kinds):
            return error
        error = error.__cause__
    return None


def fail(message: str) -> None:
    typer.echo(f"fewstep: error: {message}", err=True)
    raise typer.Exit(code=2)


@app.command()
def run(
    config: Optional[Path] = typer.Option(None, "--config", help="YAML file overriding any config field."),
    preset: str = typer.Option("default", "--preset", help="quick (minutes) or default (quality)."),
    store: Optional[str] = StoreOption,
    ray_address: Optional[str] = typer.Option(None, "--ray-address", envvar="RAY_ADDRESS", help="Attach to a Ray cluster."),
    serve: bool = typer.Option(False, "--serve", help="Leave the Ray Serve endpoint up afterwards."),
) -> None:
    """Run the whole pipeline: ingest, VAE, latents, base, reflow, consistency, evaluate, promote."""
    from flows.pipeline import run_pipeline_cli

    run_pipeline_cli(config=config, preset=preset, store=store, ray_address=ray_address, serve=serve)


@app.command()
def version() -> None:
    """Print the package and code version."""
    from infra import CODE_VERSION

    typer.echo(CODE_VERSION)


def register_optional_commands() -> None:
    """Commands that live next to the code they drive."""
    for module_name in ("flows.cli_store", "flows.cli_pipeline", "flows.cli_serve", "flows.cli_evaluate"):
        try:
            module = __import__(module_name, fromlist=["register"])
        except ModuleNotFoundError as error:
            if error.name != module_name:
                raise
            continue
        module.register(app)


register_optional_commands()


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        # standalone_mode=False returns a typer.Exit's code instead of raising it.
        code = app(args=argv, standalone_mode=False)
        sys.exit(code if isinstance(code, int) else 0)
    except typer.Exit as exit_:
        sys.exit(exit_.exit_code)
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as error:  # noqa: BLE001 - the one place errors become exit codes
        import click

        if isinstance(error, click.ClickException):
            error.show()
            sys.exit(error.exit_code)
        cause = user_cause(error)
        if cause is not None:
            typer.echo(f"fewstep: error: {cause}", err=True)
            sys.exit(2)
        raise


if __name__ == "__main__":
    main()
