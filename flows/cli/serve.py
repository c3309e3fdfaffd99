"""``fewstep serve``: the promoted model (or ``--model REF``) over HTTP, in the foreground.

    fewstep serve [--store URI] [--model REF] [--host H] [--port P] [--config FILE] [--preset NAME]

Prints the URL once the app answers, then waits. Ctrl-C (SIGINT) or SIGTERM tears the Serve
app and its HTTP proxy down and exits with status 0. Without ``--model`` the app follows the
store's ``serving/current`` pointer, so a later promotion swaps the model while it runs.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
from pathlib import Path
from typing import Callable, Optional

import typer

from flows.cli.options import RAY_HELP, STORE_HELP


def serve(
    store: Optional[str] = typer.Option(None, "--store", help=STORE_HELP),
    model: Optional[str] = typer.Option(None, "--model", help="Serve this ref (stage/key) and ignore promotions."),
    host: Optional[str] = typer.Option(None, "--host", help="Interface to listen on (default serve.host, 127.0.0.1)."),
    port: Optional[int] = typer.Option(None, "--port", help="Port to listen on (default serve.port, 8765)."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML file; its serve: section sets limits and resources."),
    preset: str = typer.Option("default", "--preset", help="Config preset the file applies to."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", envvar="RAY_ADDRESS", help=RAY_HELP),
) -> None:
    """Serve the promoted model over HTTP (playground at /, API docs at /docs) until Ctrl-C."""
    from flows.errors import UserError
    from infra.config import load_config
    from infra.store import Store
    from workers.serving.app import check_servable, resolve_model
    from workers.serving.swap import UnfitModel

    serve_config = load_config(preset, config).serve
    opened = Store.open(store)
    manifest = resolve_model(opened, model)
    try:
        check_servable(opened, manifest.ref, serve_config)  # a NaN model fails here, in one line
    except UnfitModel as error:
        raise UserError(str(error)) from None
    serve_foreground(opened.uri, serve_config, manifest.ref, pinned=model is not None, host=host, port=port,
                     ray_address=ray_address)


def serve_foreground(store_uri: str, config, ref: str, *, pinned: bool, host: str | None = None, port: int | None = None,
                     ray_address: str | None = None, echo: Callable[[str], None] = typer.echo) -> None:
    """Start Ray (or attach), deploy the app, print its URL, block until SIGINT/SIGTERM, tear down.

    A pinned model is recorded in the store (``pins/``) while it is served, so ``fewstep gc``
    keeps it and everything it was built from."""
    from infra.store import Store
    from workers.runtime import ensure_ray, shutdown_ray
    from workers.serving import app as serve_app

    ensure_ray(ray_address)
    stop = threading.Event()
    previous = {}
    store = Store.open(store_uri)
    pin = f"serve-{socket.gethostname()}-{os.getpid()}"
    if pinned:
        store.pin(pin, ref)
    try:
        url = serve_app.start(store_uri, config, ref if pinned else None, host=host, port=port)
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
