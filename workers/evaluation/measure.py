"""Scored features -> table rows: where each number of a :class:`~workers.evaluation.table.Row` is computed.

    FID, KID         against the real test split, with intervals, over every row at once
                     (:func:`with_intervals`: paired draws, so rows compare draw by draw)
    precision/recall k-NN manifolds (Kynkäänniemi et al., 2019) against the test split
    class accuracy   share of samples asked for class y that the classifier calls y
    seconds/image    wall time of sampling + decoding, per image, on one evaluation task

The estimators are :mod:`models.metrics`; this module applies them to what the Ray tasks
scored (:mod:`workers.evaluation.tasks`). Plain code: no Ray.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import torch

from infra.config import EvaluateConfig
from models.metrics import Draws, class_accuracy, fid_draws, interval, kid_draws, precision_recall
from workers.evaluation.scoring import Scored
from workers.evaluation.table import Row


def measured_row(
    model: str,
    stage_key: str,
    sampler: str,
    steps: int,
    nfe: int,
    guidance: float | None,
    extractor: str,
    real: Scored,
    fake: Scored,
    k: int,
    seconds: float | None,
) -> Row:
    """One row: precision/recall of fake vs real features, and the classifier's verdict on the fake
    images (FID and KID, with their intervals, come from :func:`with_intervals`, over every row at once)."""
    real_f, fake_f = torch.tensor(real.features), torch.tensor(fake.features)  # copies: Ray hands read-only arrays
    pr = precision_recall(real_f, fake_f, k=k)
    accuracy = None
    if fake.logits is not None:
        keep = (fake.labels >= 0) & (fake.labels < fake.logits.shape[1])
        if keep.any():
            accuracy = class_accuracy(torch.tensor(fake.logits[keep]), torch.tensor(fake.labels[keep]))
    n = len(fake.features)
    return Row(
        model=model,
        stage_key=stage_key,
        sampler=sampler,
        steps=steps,
        nfe=nfe,
        guidance=guidance,
        n=n,
        extractor=extractor,
        precision=pr.precision,
        recall=pr.recall,
        class_accuracy=accuracy,
        seconds_per_image=None if seconds is None else seconds / n,
    )


def with_intervals(
    config: EvaluateConfig, reference: np.ndarray, rows: Sequence[Row], features: dict[str, np.ndarray]
) -> tuple[list[Row], dict[str, Draws]]:
    """FID and KID of every row (``features`` by :attr:`Row.key`) against the reference (the real
    test split) with intervals, in one paired computation; returns the rows and their FID draws.

    Every bootstrap draw resamples the same reference rows for every row, so the floor, a baseline
    and a candidate move together and their differences and ratios have honest intervals.
    """
    reference_t = torch.tensor(reference)
    named = {key: torch.tensor(f) for key, f in features.items()}
    fids = fid_draws(reference_t, named, resamples=config.fid_resamples, seed=config.seed)
    kids = kid_draws(
        reference_t, named, subsets=config.kid_subsets, subset_size=config.kid_subset_size, seed=config.seed
    )
    out = []
    for row in rows:
        f, k = interval(fids[row.key], config.interval_level), interval(kids[row.key], config.interval_level)
        out.append(
            replace(
                row,
                fid=f.value,
                fid_low=f.low,
                fid_high=f.high,
                fid_corrected=f.corrected,
                kid=k.value,
                kid_low=k.low,
                kid_high=k.high,
            )
        )
    return out, fids
