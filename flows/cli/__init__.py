"""The ``fewstep`` command line: run, serve, evaluate, promote, status, gc, schedule, watch, version.

One place, :func:`main`, turns what the user must fix into one line on stderr and exit
status 2: a bad config or option (Click's own usage message), a bad store URI, a missing
model, bad input data, also when it was raised inside a Ray task. A run stopped by Ctrl-C or
SIGTERM (``kill``, systemd, Kubernetes) ends in one line and exit status 128 + the signal.
Anything else is a bug and keeps its traceback. Heavy imports (torch, Ray, Prefect) happen inside the commands, so
``fewstep --help`` answers at once.
"""

from __future__ import annotations

import os
import signal
import sys

import typer

from flows.cli import evaluate, promote, run, schedule, serve, store, watch
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
app.command("watch")(watch.watch)


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


def stop_signal(error: BaseException) -> int | None:
    """The signal that stopped the command, if ``error`` is one or was raised while one was handled.

    Ctrl-C is a ``KeyboardInterrupt``; Prefect's flow engine turns SIGTERM into its
    ``TerminationSignal``. Either may reach us bare, or as the cause or context of another
    error: a signal that lands while the driver waits inside ``ray.get`` comes out of Ray's
    Cython code as a ``SystemError`` whose context is the signal.
    """
    from prefect.exceptions import TerminationSignal

    seen: set[int] = set()
    pending: list[BaseException | None] = [error]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, KeyboardInterrupt):
            return int(signal.SIGINT)
        if isinstance(current, TerminationSignal):
            return int(current.signal)
        pending += [current.__cause__, current.__context__]
    return None


def main(argv: list[str] | None = None) -> None:
    """The console script. Click reports usage errors itself (usage, the error, status 2)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        app(args=argv, prog_name="fewstep")
    except SystemExit:
        raise
    except BaseException as error:  # noqa: BLE001 - the one place errors become exit codes
        stopped_by = stop_signal(error)
        if stopped_by is not None:
            name = signal.Signals(stopped_by).name
            typer.echo(
                f"fewstep: stopped by {name}; committed stages are kept, and the same command resumes the run",
                err=True,
            )
            sys.exit(128 + stopped_by)
        cause = user_cause(error) if isinstance(error, Exception) else None
        if cause is None:
            raise
        typer.echo(f"fewstep: error: {cause}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
