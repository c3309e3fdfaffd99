"""New data as a Prefect event, and the deployment trigger that runs the pipeline on it.

One event, whoever sends it (``fewstep watch`` polling a folder or bucket, or a forwarder of
S3 object-created notifications)::

    event:    fewstep.data.landed
    resource: {"prefect.resource.id": "fewstep.source.<uri>", "prefect.resource.name": "<uri>"}
    payload:  {"fingerprint": "<listing fingerprint>", "files": <count>}   (informational)

``<uri>`` is the source as :func:`source_uri` writes it: an absolute local path without a
trailing slash, or ``s3://bucket/prefix`` without one. The deployment's trigger matches the
event name and that resource id exactly, so a deployment reacts only to its own source.

The trigger passes no parameters: a triggered run is the deployment's own run, the same call as
the cron's, so ingest lists the source itself and an unchanged listing returns the committed
stages at once. The payload is never read by the pipeline.
"""

from __future__ import annotations

import asyncio
import os

import fsspec
from prefect.events import DeploymentEventTrigger, Event

from flows.errors import UserError

EVENT = "fewstep.data.landed"
RESOURCE_PREFIX = "fewstep.source."
SEND_ATTEMPTS = 2  # connection tries per event; the watcher retries on its next poll


def source_uri(source: str) -> str:
    """The one spelling of a source that the event and the trigger agree on.

    ``./images/``, ``images`` and ``/abs/images`` (from the same folder) are one source;
    ``s3a://b/p/`` and ``s3://b/p`` are one source.
    """
    protocol, path = fsspec.core.split_protocol(source)
    if protocol in (None, "file", "local"):
        return os.path.realpath(os.path.expanduser(path))
    if protocol == "s3a":
        protocol = "s3"
    return f"{protocol}://{path.rstrip('/')}"


def resource_id(source: str) -> str:
    return RESOURCE_PREFIX + source_uri(source)


def _literal(value: str) -> str:
    """``value`` as a pattern that matches only itself (Prefect matches resource labels as globs)."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in value)


def data_trigger(source: str, deployment_name: str) -> DeploymentEventTrigger:
    """The trigger that runs a deployment when ``fewstep.data.landed`` names ``source``."""
    return DeploymentEventTrigger(
        name=f"{deployment_name}: new data in {source_uri(source)}",
        description=f"Runs the deployment when a {EVENT} event names {resource_id(source)}",
        expect={EVENT},
        match={"prefect.resource.id": _literal(resource_id(source))},
        parameters=None,  # the deployment's own parameters: the same run as the cron's
    )


def landed_event(source: str, fingerprint: str, files: int) -> Event:
    uri = source_uri(source)
    return Event(
        event=EVENT,
        resource={"prefect.resource.id": RESOURCE_PREFIX + uri, "prefect.resource.name": uri},
        payload={"fingerprint": fingerprint, "files": files},
    )


async def _send(event: Event) -> None:
    from prefect.events.clients import get_events_client

    async with get_events_client(reconnection_attempts=SEND_ATTEMPTS) as client:
        await client.emit(event)


def emit(event: Event) -> None:
    """Send one event to the Prefect API now (not through a background worker), or raise."""
    require_api()
    asyncio.run(_send(event))


def require_api() -> str:
    """The Prefect API URL, which a trigger and its events need: another process must reach it."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise UserError(
            "a data trigger needs a Prefect server that the watcher and the deployment share: "
            "start one (prefect server start) and set PREFECT_API_URL, e.g. "
            "export PREFECT_API_URL=http://127.0.0.1:4200/api"
        )
    return url
