"""Progress of long stages, for whoever shows it (the CLI's per-stage view, or nobody).

The driver registers one :class:`Listener` (``listen``); stages call the module functions:
``stage_started`` / ``stage_reused`` / ``stage_finished`` around every stage (the runner does)
and ``advance(stage, done, total)`` as work completes. Work that runs on Ray Train workers
reports to a small :class:`Board` actor instead (:class:`RemoteProgress`), which the driver
polls while it waits (:func:`watching`). With no listener every call is a no-op, so the
stages cost nothing when nobody watches.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any, Protocol

_listener: Listener | None = None


class Listener(Protocol):
    def started(self, stage: str) -> None: ...
    def reused(self, stage: str, manifest: Any) -> None: ...
    def finished(self, stage: str, manifest: Any) -> None: ...
    def advanced(self, stage: str, done: int, total: int, note: str) -> None: ...


def listen(listener: Listener | None) -> None:
    """Send this process's progress to ``listener`` (None: to nobody)."""
    global _listener
    _listener = listener


def listening() -> bool:
    return _listener is not None


def stage_started(stage: str) -> None:
    if _listener is not None:
        _listener.started(stage)


def stage_reused(stage: str, manifest: Any) -> None:
    if _listener is not None:
        _listener.reused(stage, manifest)


def stage_finished(stage: str, manifest: Any) -> None:
    if _listener is not None:
        _listener.finished(stage, manifest)


def advance(stage: str, done: int, total: int, note: str = "") -> None:
    """``done`` of ``total`` units of ``stage`` are finished (called on the driver)."""
    if _listener is not None:
        _listener.advanced(stage, int(done), int(total), note)


# --------------------------------------------------------------------------- from Ray workers


class Board:
    """A Ray actor holding the latest progress a remote loop reported (see :func:`watching`)."""

    def __init__(self) -> None:
        self.latest: tuple[int, int, str] | None = None

    def update(self, done: int, total: int, note: str) -> None:
        self.latest = (done, total, note)

    def read(self) -> tuple[int, int, str] | None:
        return self.latest


class RemoteProgress:
    """What a Ray worker holds: the board's name; reports are fire-and-forget."""

    def __init__(self, name: str):
        self.name = name
        self._handle = None

    def report(self, done: int, total: int, note: str = "") -> None:
        import ray

        if self._handle is None:
            try:
                self._handle = ray.get_actor(self.name)
            except ValueError:  # the driver stopped watching; nothing to report to
                return
        self._handle.update.remote(int(done), int(total), note)


@contextlib.contextmanager
def watching(stage: str, name: str, poll_s: float = 1.0) -> Iterator[RemoteProgress | None]:
    """On the driver: a board named ``name`` while the block runs, polled into :func:`advance`.
    Yields what to hand the remote workers (None when nobody listens)."""
    if _listener is None:
        yield None
        return
    import ray

    board = ray.remote(num_cpus=0)(Board).options(name=name, get_if_exists=True).remote()
    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(poll_s):
            try:
                latest = ray.get(board.read.remote(), timeout=poll_s * 5)
            except Exception:  # noqa: BLE001 - progress is best effort; the stage's own errors surface elsewhere
                continue
            if latest is not None:
                advance(stage, *latest)

    thread = threading.Thread(target=poll, name=f"progress-{stage}", daemon=True)
    thread.start()
    try:
        yield RemoteProgress(name)
    finally:
        stop.set()
        thread.join(timeout=poll_s * 2)
        ray.kill(board)


def eta_seconds(done: int, total: int, started: float) -> float | None:
    """Seconds left at the rate so far (None before any progress)."""
    elapsed = time.perf_counter() - started
    return None if done <= 0 or total <= done else elapsed * (total - done) / done
