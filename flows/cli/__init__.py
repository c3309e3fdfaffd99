"""The ``fewstep`` command line: run, serve, evaluate, promote, status, gc, schedule, version.

One place, :func:`main`, turns what the user must fix into one line on stderr and exit
status 2: a bad config or option (Click's own usage message), a bad store URI, a missing
model, bad input data, also when it was raised inside a Ray task. Anything else is a bug and
keeps its traceback. Heavy imports (torch, Ray, Prefect) happen inside the commands, so
``fewstep --help`` answers at once.
"""

from __future__ import annotations

import os
import sys

import typer

from flows.cli import evaluate, promote, run, schedule, serve, store
from flows.errors import UserError

app = typer.Typer(
    name="fewstep",
    help="Turn an image dataset into a served few-step generative model.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("run")(run.run)
app.command("serve")(serve.serve)
app.command("evaluate")(evaluate.evaluate)
app.command("promote")(promote.promote)
app.command("status")(store.status)
app.command("gc")(store.gc)
app.command("unpin")(store.unpin)
app.command("schedule")(schedule.schedule)


@app.command()
def version() -> None:
    """Print the package and code version."""
    from infra.version import CODE_VERSION

    typer.echo(CODE_VERSION)


def user_errors() -> tuple[type[BaseException], ...]:
    """The exception types that are the user's to fix, not bugs."""
    from infra.config import ConfigError
    from infra.errors import StoreError

    return UserError, ConfigError, StoreError


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
        failures = getattr(error, "worker_failures", None)  # Ray Train: each worker's exception, no __cause__
        if isinstance(failures, dict):
            found = [cause for cause in map(user_cause, failures.values()) if cause is not None]
            if found:
                return found[0]
        error = error.__cause__
    return None


def main(argv: list[str] | None = None) -> None:
    """The console script. Click reports usage errors itself (usage, the error, status 2)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        app(args=argv, prog_name="fewstep")
    except KeyboardInterrupt:
        typer.echo("fewstep: interrupted", err=True)
        sys.exit(130)
    except Exception as error:  # noqa: BLE001 - the one place errors become exit codes
        cause = user_cause(error)
        if cause is None:
            raise
        typer.echo(f"fewstep: error: {cause}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
