"""How the flow resolves ``pairs.guidance`` / ``consistency.guidance`` = None before the stages run."""

from __future__ import annotations

import logging

import pytest

from infra.cards import GeneratorCard
from infra.config import PipelineConfig, load_config
from infra.store import Manifest, Store


def commit_base(store: Store, num_classes: int) -> Manifest:
    """A base manifest with just its card (the flow reads no weights to resolve guidance)."""
    card = GeneratorCard(family="flow", steps=1, latent_shape=(2, 4, 4), num_classes=num_classes,
                         latent_scale=1.0, vae_ref="vae/none")  # fmt: skip
    with store.begin("base", f"classes{num_classes}", config={"classes": num_classes}) as writer:
        writer.write_json("note", {})
        return writer.commit(metrics=card.to_metrics())


def test_without_a_probe_the_best_guidance_falls_back_by_labels_and_says_so(tmp_path, caplog):
    from flows.pipeline import base_best_guidance, resolved_guidance

    store = Store.open(str(tmp_path / "store"))
    labelled, unlabelled = commit_base(store, 10), commit_base(store, 0)
    cfg = PipelineConfig()
    logger = logging.getLogger("fewstep.pipeline")  # Prefect stops "fewstep" logs propagating to caplog's root
    logger.addHandler(caplog.handler)
    try:
        assert base_best_guidance(store, labelled.ref, cfg) == 2.0
        assert base_best_guidance(store, unlabelled.ref, cfg) == 1.0
    finally:
        logger.removeHandler(caplog.handler)
    assert "no probe has measured" in caplog.text and labelled.ref in caplog.text and "labelled" in caplog.text

    pairs, consistency = resolved_guidance(cfg, store, labelled.ref)
    assert (pairs.guidance, consistency.guidance) == (2.0, 2.0)
    assert pairs.keyed()["guidance"] == 2.0  # the stage key holds the number, not None
    # A scale the config names is kept; only the section left at None takes the best.
    named = load_config("quick", overrides={"pairs": {"guidance": 3.0}})
    pairs, consistency = resolved_guidance(named, store, labelled.ref)
    assert (pairs.guidance, consistency.guidance) == (3.0, 2.0)


def test_a_probe_of_the_base_model_gives_its_best_guidance(tmp_path):
    from flows.pipeline import base_best_guidance

    store = Store.open(str(tmp_path / "store"))
    base, other = commit_base(store, 10), commit_base(store, 3)
    with store.begin("probe", "of-other", config={}, inputs=[other]) as writer:
        writer.write_json("note", {})
        writer.commit(metrics={"best_guidance": 4.0})
    assert base_best_guidance(store, base.ref, PipelineConfig()) == 2.0  # a probe of another model does not count
    with store.begin("probe", "of-base", config={}, inputs=[base]) as writer:
        writer.write_json("note", {})
        writer.commit(metrics={"best_guidance": 3.0})
    assert base_best_guidance(store, base.ref, PipelineConfig()) == 3.0


def test_resolve_guidance_takes_the_named_scale_else_the_best():
    from infra.config import ConfigError
    from workers.guidance import require_guidance, resolve_guidance

    assert resolve_guidance(None, 2.0) == 2.0 and resolve_guidance(1.5, 2.0) == 1.5 and resolve_guidance(0, 4) == 0.0
    with pytest.raises(ConfigError, match="not a scale"):
        resolve_guidance(None, float("nan"))
    with pytest.raises(ConfigError, match="pairs.guidance is None"):
        require_guidance("pairs", None)
