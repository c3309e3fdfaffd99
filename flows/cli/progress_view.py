"""The per-stage progress view of ``fewstep run``: one line per stage, live progress on a terminal.

    ✓ ingest        2.1 s   600 images (480 train, 120 test), 10 classes
    ▸ base        [#######.............]  35%  1050/3000  ETA 1m12s  loss 0.412
    = latents     reused latents/3f2a9c0d1e2b4a5c
    ✓ probe        21.4 s  base/ab12…: best guidance 2: FID 364, class accuracy 0.15 (chance 0.1)
    WARNING base/ab12…: class accuracy 0.15 at its best guidance 2 (chance 0.10, ...): this model has not learned ...

A stage whose output carries a warning (a probe's verdict) gets a plain ``WARNING`` line under
its own, whether it ran or was reused.

On a terminal the running stage's line is redrawn in place; elsewhere (CI logs) a progress
line is printed at most every :data:`QUIET_EVERY_S` seconds. Everything else (Ray's and
Prefect's own logs) stays at warning level unless ``--verbose``.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TextIO

from infra.cards import (
    EvaluationCard,
    FeaturesCard,
    GeneratorCard,
    ImagesCard,
    LatentsCard,
    PairsCard,
    ProbeCard,
    VAECard,
)

QUIET_EVERY_S = 30.0
BAR = 20


def fmt_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def _num(value: Any, digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}g}"


def images_headline(m: Any) -> str:
    c = ImagesCard.from_manifest(m)
    text = f"{c.n_images} images ({c.n_train} train, {c.n_test} test), {c.num_classes or 'no'} classes"
    return text + (f", {c.quarantined} quarantined" if c.quarantined else "")


def vae_headline(m: Any) -> str:
    c = VAECard.from_manifest(m)
    return f"latents {'x'.join(map(str, c.latent_shape))}, scale {_num(c.latent_scale)}, test recon MSE {_num(c.recon_mse)}"


def pairs_headline(m: Any) -> str:
    c = PairsCard.from_manifest(m)
    return f"{c.pairs} pairs, {c.solver} {c.steps} steps"


def generator_headline(m: Any) -> str:
    c = GeneratorCard.from_manifest(m)
    warm = f", warm from {c.parent_ref}" if c.parent_ref else ""
    return f"{c.steps} steps, final loss {_num(c.final_loss)}{warm}"


def features_headline(m: Any) -> str:
    c = FeaturesCard.from_manifest(m)
    if c.classifies:
        return f"classifier, test accuracy {_num(c.test_accuracy, 3)}"
    return f"self-supervised encoder ({c.feature_dim}-d), final loss {_num(c.final_loss)}"


def evaluation_headline(m: Any) -> str:
    c = EvaluationCard.from_manifest(m)
    return f"{c.rows} rows, best FID {_num((c.best or {}).get('fid'))} (floor {_num(c.floor_fid)}, VAE ceiling {_num(c.vae_fid)})"


def probe_headline(m: Any) -> str:
    c = ProbeCard.from_manifest(m)
    stage, _, key = c.model_ref.partition("/")
    best = c.best
    accuracy = f", class accuracy {_num(best['class_accuracy'], 2)} (chance {_num(c.chance, 2)})" if c.chance else ""
    verdict = "learned" if c.learned else "NOT learned"
    return f"{stage}/{key[:4]}…: {verdict}; best guidance {best['guidance']:g}: FID {_num(best['fid'])}{accuracy}"


def probe_warning(m: Any) -> str | None:
    c = ProbeCard.from_manifest(m)
    return None if c.learned else c.verdict


# What the view says about a finished stage, from its card.
HEADLINES: dict[str, Callable[[Any], str]] = {
    "ingest": images_headline,
    "vae": vae_headline,
    "latents": lambda m: f"{LatentsCard.from_manifest(m).n_latents} latents",
    "pairs": pairs_headline,
    **{stage: generator_headline for stage in GeneratorCard.STAGES},
    "features": features_headline,
    "evaluate": evaluation_headline,
    "probe": probe_headline,
}
# A warning the user must see under a stage's line (None: none), from its card.
WARNINGS: dict[str, Callable[[Any], str | None]] = {"probe": probe_warning}


class ProgressView:
    """A :class:`workers.progress.Listener` that draws the stages on ``stream``."""

    def __init__(self, stream: TextIO | None = None, tty: bool | None = None):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.lock = threading.Lock()
        self.started_at: dict[str, float] = {}
        self.last_quiet: dict[str, float] = {}
        self.last_done: dict[str, int] = {}

    def _line(self, text: str, live: bool = False) -> None:
        with self.lock:
            if self.tty:  # redraw the current line; a live line stays open for the next redraw
                self.stream.write("\r\x1b[2K" + text + ("" if live else "\n"))
            else:
                self.stream.write(text + "\n")
            self.stream.flush()

    def started(self, stage: str) -> None:
        self.started_at[stage] = self.last_quiet[stage] = time.perf_counter()
        self._line(f"▸ {stage:<12} running", live=True)

    def reused(self, stage: str, manifest: Any) -> None:
        self._line(f"= {stage:<12} reused {manifest.ref}")
        self._warn(stage, manifest)

    def _warn(self, stage: str, manifest: Any) -> None:
        try:
            warning = WARNINGS[stage](manifest) if stage in WARNINGS else None
        except Exception:  # noqa: BLE001 - a warning line never fails the run
            warning = None
        if warning:
            self._line(f"WARNING {warning}")

    def finished(self, stage: str, manifest: Any) -> None:
        seconds = time.perf_counter() - self.started_at.get(stage, time.perf_counter())
        try:
            headline = HEADLINES[stage](manifest) if stage in HEADLINES else ""
        except Exception as error:  # noqa: BLE001 - a headline never fails the run
            headline = f"({type(error).__name__})"
        self._line(f"✓ {stage:<12} {seconds:6.1f} s  {headline}")
        self._warn(stage, manifest)

    def advanced(self, stage: str, done: int, total: int, note: str) -> None:
        now = time.perf_counter()
        started = self.started_at.setdefault(stage, now)
        if done == self.last_done.get(stage):
            return  # nothing new (the remote board is polled every second)
        if not self.tty and done < total and now - self.last_quiet.get(stage, started) < QUIET_EVERY_S:
            return
        self.last_done[stage], self.last_quiet[stage] = done, now
        fraction = min(1.0, done / total) if total else 0.0
        eta = None if done <= 0 else (now - started) * (total - done) / done
        bar = "#" * round(fraction * BAR) + "." * (BAR - round(fraction * BAR))
        self._line(
            f"▸ {stage:<12} [{bar}] {fraction:4.0%}  {done}/{total}  ETA {fmt_seconds(eta)}  {note}".rstrip(), live=True
        )
