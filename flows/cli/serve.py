"""``fewstep serve``: the promoted model (or ``--model REF``) over HTTP, in the foreground; or the
Serve config that starts the same app on a cluster.

    fewstep serve [--store URI] [--model REF] [--host H] [--port P] [--config FILE] [--preset NAME]
    fewstep serve --emit-config [FILE] [--store URI] [--model REF] [--host H] [--port P] [--config FILE]
                  [--runtime-env FILE]

Prints the URL once the app answers, then waits. Ctrl-C (SIGINT) or SIGTERM tears the Serve
app and its HTTP proxy down and exits with status 0. Without ``--model`` the app follows the
store's ``serving/current`` pointer, so a later promotion swaps the model while it runs.

``--emit-config`` writes a Ray Serve config file (to FILE, or stdout) instead of serving:
``serve deploy FILE``, ``serve run FILE`` and a KubeRay RayService's ``serveConfigV2`` start
the app from it (``workers.serving.app:build`` with the store, the pinned model and the serve
section as args). It holds no credentials (see :mod:`workers.serving.deploy`).
"""

from __future__ import annotations

import os
import signal
import socket
import threading
from collections.abc import Callable
from pathlib import Path

import typer

from flows.cli.options import RAY_HELP, STORE_HELP
from flows.errors import UserError


def serve(
    store: str | None = typer.Option(None, "--store", help=STORE_HELP),
    model: str | None = typer.Option(None, "--model", help="Serve this ref (stage/key) and ignore promotions."),
    host: str | None = typer.Option(None, "--host", help="Interface to listen on (default serve.host, 127.0.0.1)."),
    port: int | None = typer.Option(None, "--port", help="Port to listen on (default serve.port, 8765)."),
    config: Path | None = typer.Option(
        None, "--config", help="YAML file; its serve: section sets limits and resources."
    ),
    preset: str = typer.Option("default", "--preset", help="Config preset the file applies to."),
    ray_address: str | None = typer.Option(None, "--ray-address", envvar="RAY_ADDRESS", help=RAY_HELP),
    emit_config: bool = typer.Option(
        False,
        "--emit-config",
        help="Write a Ray Serve config (serve deploy / serve run / RayService) to FILE or stdout, and exit.",
    ),
    runtime_env: Path | None = typer.Option(
        None,
        "--runtime-env",
        help="With --emit-config: a YAML runtime_env for the replicas "
        "(env var references, pip, ...); never literal secrets.",
    ),
    file: Path | None = typer.Argument(None, metavar="[FILE]", help="With --emit-config: where to write it."),
) -> None:
    """Serve the promoted model over HTTP (playground at /, API docs at /docs) until Ctrl-C; with
    --emit-config, write the Ray Serve config that starts it on a cluster instead."""
    from infra.config import load_config
    from infra.store import Store
    from workers.serving.app import check_servable, resolve_model
    from workers.serving.swap import UnfitModel

    if not emit_config and (file is not None or runtime_env is not None):
        raise UserError(
            f"{'FILE ' + repr(str(file)) if file is not None else '--runtime-env'} is only used with "
            "--emit-config: `fewstep serve --emit-config serve.yaml`"
        )
    serve_config = load_config(preset, config).serve
    if emit_config:
        text = emit_serve_config(
            store,
            model,
            serve_config,
            host=host,
            port=port,
            runtime_env=runtime_env,
            name=str(file) if file is not None else "serve.yaml",
        )
        if file is None:
            typer.echo(text, nl=False)
        else:
            file.write_text(text)
            typer.echo(f"fewstep: wrote {file}; start it with `serve deploy {file}` (or `serve run {file}`)", err=True)
        return
    opened = Store.open(store)
    manifest = resolve_model(opened, model)
    try:
        check_servable(opened, manifest.ref, serve_config)  # a NaN model fails here, in one line
    except UnfitModel as error:
        raise UserError(str(error)) from None
    serve_foreground(
        opened, serve_config, manifest.ref, pinned=model is not None, host=host, port=port, ray_address=ray_address
    )


def serve_foreground(
    store,
    config,
    ref: str,
    *,
    pinned: bool,
    host: str | None = None,
    port: int | None = None,
    ray_address: str | None = None,
    echo: Callable[[str], None] = typer.echo,
) -> None:
    """Start Ray (or attach), deploy the app, print its URL, block until SIGINT/SIGTERM, tear down.

    A pinned model is recorded in the store (``pins/``) while it is served, so ``fewstep gc``
    keeps it and everything it was built from. ``store`` is the command's opened Store."""
    from workers.runtime import ensure_ray, shutdown_ray
    from workers.serving import app as serve_app

    ensure_ray(ray_address)
    stop = threading.Event()
    previous = {}
    pin = f"serve-{socket.gethostname()}-{os.getpid()}"
    if pinned:
        store.pin(pin, ref)
    try:
        url = serve_app.start(store.uri, config, ref if pinned else None, host=host, port=port)
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda *_: stop.set())
        follows = "pinned" if pinned else f"following {serve_app.POINTER}"
        echo(f"fewstep: serving {ref} ({follows}) at {url}  (API docs: {url}docs); press Ctrl-C to stop")
        while not stop.wait(0.5):
            pass
        echo("fewstep: stopping")
    except KeyboardInterrupt:  # Ctrl-C while the app was still starting
        echo("fewstep: interrupted while starting; stopping")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        serve_app.stop()
        shutdown_ray()
        if pinned:
            store.unpin(pin)
    echo("fewstep: stopped")


def emit_serve_config(
    store: str | None,
    model: str | None,
    serve_config,
    *,
    host: str | None = None,
    port: int | None = None,
    runtime_env: Path | None = None,
    environ: dict[str, str] | None = None,
    name: str = "serve.yaml",
) -> str:
    """The Serve config file's text: a header that says how to use it, then the YAML.

    The store URI is made absolute (replicas run elsewhere); a pinned ``model`` is checked
    against the store and pinned in it (``pins/``, so gc keeps it while a cluster serves the
    file), which needs the store's credentials here; without one the store is not touched."""
    import yaml

    from infra.store import Store
    from workers.serving.app import resolve_model
    from workers.serving.deploy import CREDENTIALS
    from workers.serving.deploy import serve_config as build_config

    opened = Store.open(store, check=model is not None)
    if model is not None:
        # A config file outlives this command: pin the model so `fewstep gc` keeps it while the
        # cluster serves it (foreground `fewstep serve --model` pins for as long as it runs).
        ref = resolve_model(opened, model).ref
        pin = "serve-config-" + ref.replace("/", "-")
        opened.pin(pin, ref)
        typer.echo(
            f"fewstep: pinned {ref} as {pin!r}: gc keeps it while a cluster serves this config; "
            f"`fewstep unpin {pin}` once none does",
            err=True,
        )
    extra = None
    if runtime_env is not None:
        if not runtime_env.is_file():
            raise UserError(f"runtime_env file {str(runtime_env)!r} does not exist: pass a YAML file")
        extra = yaml.safe_load(runtime_env.read_text()) or {}
        if not isinstance(extra, dict):
            raise UserError(f"runtime_env file {str(runtime_env)!r} must hold a mapping, got {type(extra).__name__}")
    config = build_config(
        opened.uri,
        serve_config,
        model,
        host=host,
        port=port,
        runtime_env=extra,
        environ=os.environ if environ is None else environ,
    )
    http = config["http_options"]
    header = [
        "# Ray Serve config for fewstep, written by `fewstep serve --emit-config`.",
        f"#   serve deploy {name} -a http://<head>:8265    (or: serve run {name}; or a RayService's serveConfigV2)",
        f"# HTTP on {http['host']}:{http['port']} of every node; POST /v1/generate, GET /v1/model, GET /healthz.",
        f"# Replicas open {opened.uri} themselves"
        + (
            f", with {', '.join(CREDENTIALS)} (or an IAM role) from their own environment:"
            if opened.uri.startswith("s3://")
            else " (a path every node must see)."
        ),
    ]
    if opened.uri.startswith("s3://"):
        header.append("# this file holds no credentials.")
    return "\n".join(header) + "\n" + yaml.safe_dump(config, sort_keys=False)
