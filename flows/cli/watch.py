"""``fewstep watch SOURCE``: turn new data in a folder or bucket into ``fewstep.data.landed`` events.

It polls the source's listing every ``--every`` seconds, with the same listing and fingerprint
that ingest keys its stage by (:func:`workers.sources.listing.resolve_source`: each image or
Parquet file's path, size and modification time or ETag). When the fingerprint changes and
then holds still for one more poll (a copy in progress becomes one event, not one per poll),
it sends one event (:mod:`flows.trigger`) to the Prefect server in ``PREFECT_API_URL``; a
deployment served with ``fewstep schedule --on-new-data`` on the same source runs on it.

The first listing is the baseline and sends nothing: data that landed while nothing watched is
the cron's to pick up. An event that cannot be sent (the server is down) is reported and sent
at the next poll. A listing ingest would refuse (a folder that holds images and Parquet files)
is reported and sends nothing until it is fixed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import typer

from flows.cli.options import STORE_HELP
from flows.errors import UserError

if TYPE_CHECKING:
    from infra.store import Store


@dataclass
class Watcher:
    """One source's listing, polled: :meth:`poll` sends an event when a change has settled."""

    source: str
    store: Store  # its clients list an s3:// source on the store's endpoint
    announced: str | None = None  # the fingerprint last sent (or the baseline)
    pending: str | None = None  # a new fingerprint seen once; sent if the next poll sees it again
    problem: str | None = None  # why the last listing could not be read (reported once)
    sent: list[str] = field(default_factory=list)  # fingerprints sent, in order

    def listing(self) -> tuple[str, int] | None:
        """(fingerprint, files) of the source now, or None when ingest would refuse it."""
        from infra.config import StageInputError
        from workers.sources.listing import resolve_source

        try:
            found = resolve_source(self.store, self.source)
        except StageInputError as error:
            if str(error) != self.problem:
                self.problem = str(error)
                typer.echo(f"fewstep watch: not sending: {error}", err=True)
            return None
        self.problem = None
        return found.fingerprint, len(found.files)

    def poll(self) -> str | None:
        """List the source once; the fingerprint sent in an event, if this poll sent one."""
        from websockets.exceptions import WebSocketException

        from flows.trigger import EVENT, emit, landed_event

        now = self.listing()
        if now is None:
            return None
        fingerprint, files = now
        if self.announced is None:
            self.announced = fingerprint
            return None
        if fingerprint == self.announced:
            self.pending = None
            return None
        if fingerprint != self.pending:
            self.pending = fingerprint  # changed: send once it holds still for a poll
            return None
        event = landed_event(self.source, fingerprint, files)
        try:
            emit(event)
        except (OSError, TimeoutError, WebSocketException) as error:
            typer.echo(f"fewstep watch: could not send {EVENT} ({error}); trying again at the next poll", err=True)
            return None
        self.announced, self.pending = fingerprint, None
        self.sent.append(fingerprint)
        typer.echo(f"sent {EVENT} for {event.resource.id}: {files} file(s), fingerprint {fingerprint[:12]}")
        return fingerprint


def watch(
    source: str = typer.Argument(..., help="Image folder, Parquet file/folder or s3://bucket/prefix to watch."),
    every: float = typer.Option(30.0, "--every", min=0.1, help="Seconds between listings."),
    store: str | None = typer.Option(
        None, "--store", help=STORE_HELP + " Only its S3 endpoint and keys are used, to list an s3:// source."
    ),
) -> None:
    """Send a fewstep.data.landed event to Prefect whenever SOURCE's images change."""
    from flows.trigger import EVENT, require_api, resource_id
    from infra.store import Store
    from workers.sources.listing import BUILTIN, source_filesystem

    if source in BUILTIN:
        raise UserError(f"{source!r} is a built-in set that never changes: watch an image folder or an s3:// URI")
    api = require_api()
    opened = Store.open(store)
    fs, _, root = source_filesystem(opened, source)
    if not fs.exists(root):
        raise UserError(f"cannot watch {source!r}: it does not exist. Create it first, or check the path")
    watcher = Watcher(source, opened)
    watcher.poll()  # the baseline
    typer.echo(f"watching {resource_id(source)} every {every:g}s; {EVENT} goes to {api}; Ctrl-C stops it")
    while True:
        time.sleep(every)
        watcher.poll()
