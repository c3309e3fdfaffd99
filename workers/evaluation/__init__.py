"""Evaluation in one package: what to measure, the Ray tasks that measure it, one typed row, the report.

    plan       what to measure: a Cell per (model, sampler, steps, guidance); the inputs
    scoring    the feature space: images -> features and class logits
    references the real test split, the floor and the VAE ceiling every sample is scored beside
    tasks      the Ray tasks that sample, decode and score each cell; the driver that runs them
    measure    scored features -> rows: FID/KID with intervals, precision/recall, class accuracy
    table      the typed Row, the Parquet table it is written to and read from, and every ranking
    quality    the quality bars (ratios on excess over the floor) and the absolute "has it learned" bar
    report     the markdown report; plot and grids its figures; outputs writes it all with the card

The estimators themselves are :mod:`models.metrics`; the evaluate stage's entry is
:mod:`workers.stages.s10_evaluate`.
"""
