"""The FID-vs-NFE plot of an evaluation: each row's bias-corrected FID with its interval."""

from __future__ import annotations

import io
from collections.abc import Sequence

from workers.evaluation.table import CEILING, FLOOR, Row, finite, generated, reference_row


def plot_fid_vs_nfe(rows: Sequence[Row], title: str) -> bytes:
    """FID against NFE (log x), one line per (model, sampler, guidance); dashed lines for the two references."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullLocator

    figure = Figure(figsize=(7, 4.5), dpi=100)
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    lines: dict[tuple[str, str, float | None], list[tuple[int, float, float, float]]] = {}
    for r in generated(rows):
        y = r.fid_centre
        low = y - r.fid_low if finite(r.fid_low) else 0.0
        high = r.fid_high - y if finite(r.fid_high) else 0.0
        lines.setdefault((r.model, r.sampler, r.guidance), []).append((r.nfe, y, max(low, 0.0), max(high, 0.0)))
    scales = {}  # model -> its scales: the legend names a scale only where a model has several
    for model, _, guidance in lines:
        scales.setdefault(model, set()).add(guidance)
    for (model, sampler, guidance), points in lines.items():
        points.sort()
        label = model if sampler == model.split("-")[0] else f"{model} ({sampler})"
        if len(scales[model]) > 1:
            label += f" w={guidance:g}"
        ax.errorbar(
            [p[0] for p in points],
            [p[1] for p in points],
            yerr=[[p[2] for p in points], [p[3] for p in points]],
            marker="o",
            capsize=2,
            label=label,
        )
    for model, label, color in (
        (FLOOR, "real train vs test (floor)", "black"),
        (CEILING, "VAE reconstructions (ceiling)", "grey"),
    ):
        row = reference_row(rows, model)
        if row is not None and finite(row.fid_centre):
            ax.axhline(row.fid_centre, linestyle="--", color=color, linewidth=1, label=label)
            if finite(row.fid_low) and finite(row.fid_high):
                ax.axhspan(row.fid_low, row.fid_high, color=color, alpha=0.08)
    ax.set_xscale("log")
    nfes = sorted({point[0] for points in lines.values() for point in points})
    if nfes:  # plain numbers at the measured NFEs, not 10^0, 2x10^0, ...
        ax.set_xticks(nfes, [str(v) for v in nfes])
        ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("NFE (network evaluations per image)")
    ax.set_ylabel("FID (bias-corrected) with its interval")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()
