"""What ``fewstep run`` shows while it works: one line per stage, progress with an ETA."""

from __future__ import annotations

import io

from flows.cli import progress_view
from flows.cli.progress_view import ProgressView
from infra.cards import ImagesCard


class Committed:
    """Enough of a manifest for the view: its stage, ref and metrics."""

    def __init__(self, stage: str, metrics: dict):
        self.stage, self.ref, self.metrics = stage, f"{stage}/0123456789abcdef", metrics


def images() -> Committed:
    card = ImagesCard(
        n_images=600,
        n_train=491,
        n_test=109,
        num_classes=10,
        image_size=16,
        channels=1,
        source_kind="digits",
        quarantined=2,
    )
    return Committed("ingest", card.to_metrics())


def test_a_log_gets_a_line_per_stage_and_throttled_progress(monkeypatch):
    clock = iter(range(0, 1000, 5))  # every call to the clock moves 5 s
    monkeypatch.setattr(progress_view.time, "perf_counter", lambda: float(next(clock)))
    out = io.StringIO()
    view = ProgressView(out, tty=False)
    view.started("base")
    for step in range(1, 101):
        view.advanced("base", step, 100, f"loss {1 / step:.3g}")
    view.advanced("base", 100, 100, "loss 0.01")  # the same again: nothing new to say
    view.finished("ingest", images())
    view.reused("vae", Committed("vae", {}))
    lines = out.getvalue().splitlines()
    progress = [line for line in lines if line.startswith("▸ base") and "%" in line]
    # At most one line per 30 s of a 500 s run (5 s a step), plus the last one.
    assert 2 <= len(progress) <= 500 / 30 + 2, lines
    assert progress[-1].startswith("▸ base         [####################] 100%  100/100  ETA 0s")
    assert any("ETA" in line and "loss" in line for line in progress[:-1])
    assert "✓ ingest" in lines[-2] and "600 images (491 train, 109 test), 10 classes, 2 quarantined" in lines[-2]
    assert lines[-1] == "= vae          reused vae/0123456789abcdef"


def test_a_terminal_redraws_one_line():
    out = io.StringIO()
    view = ProgressView(out, tty=True)
    view.started("latents")
    view.advanced("latents", 50, 100, "")
    view.finished("ingest", images())
    text = out.getvalue()
    assert text.count("\r\x1b[2K") == 3 and text.endswith("\n") and text.count("\n") == 1


def test_a_headline_never_fails_the_run():
    out = io.StringIO()
    ProgressView(out, tty=False).finished("ingest", Committed("ingest", {"n_images": 1}))  # a card field missing
    assert "✓ ingest" in out.getvalue() and "(CardError)" in out.getvalue()
