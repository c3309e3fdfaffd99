"""What ``fewstep run`` shows while it works: one line per stage, progress with an ETA."""

from __future__ import annotations

import io

from flows.cli import progress_view
from flows.cli.progress_view import ProgressView
from infra.cards import LEARNED, ImagesCard, ProbeCard


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


def probe(verdict: str) -> Committed:
    card = ProbeCard(
        model_ref="base/ab12cd34ef",
        model_stage="base",
        sampler="euler",
        steps=16,
        n=500,
        extractor="features/f",
        scales=(
            {"guidance": 1.0, "fid": 393.0, "class_accuracy": 0.12},
            {"guidance": 2.0, "fid": 364.0, "class_accuracy": 0.15},
        ),
        best_guidance=2.0,
        verdict=verdict,
        chance=0.1,
    )
    return Committed("probe", card.to_metrics())


def test_a_probe_that_did_not_learn_prints_a_plain_warning_line_ran_or_reused():
    out = io.StringIO()
    view = ProgressView(out, tty=True)
    warning = "base/ab12…: class accuracy 0.15 at its best guidance 2 (chance 0.10): this model has not learned"
    view.started("probe")
    view.finished("probe", probe(warning))
    view.reused("probe", probe(warning))
    view.finished("probe", probe(LEARNED))
    lines = out.getvalue().replace("\r\x1b[2K", "\n").split("\n")
    lines = [line for line in lines if line and "running" not in line]
    assert lines[0].startswith("✓ probe") and "base/ab12…: NOT learned; best guidance 2: FID 364" in lines[0]
    assert "class accuracy 0.15 (chance 0.1)" in lines[0]
    assert lines[1] == f"WARNING {warning}"
    assert lines[2] == "= probe        reused probe/0123456789abcdef" and lines[3] == f"WARNING {warning}"
    assert "learned; best guidance 2" in lines[4] and len(lines) == 5  # a model that learned: no warning
