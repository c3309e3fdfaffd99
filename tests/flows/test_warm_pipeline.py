"""A retrain that builds on what is served, end to end under Prefect's harness: week one trains from
scratch and is promoted; week two, on 10% more images, keeps the VAE, encodes only the new images
and warm-starts base, reflow and consistency from the served lineage, whose refs its cards carry.

Two pipelines at the micro sizes (minutes on a busy 2-core machine): the two weeks are the thing
under test, so neither can be left out. That a re-run finds a warm stage committed is checked on
its key (tests/workers/test_warm.py), not by a third pipeline."""

from __future__ import annotations

import pytest

from drills import kit
from drills.kit import MICRO
from infra.cards import GeneratorCard, LatentsCard
from infra.config import load_config
from infra.store import Store
from infra.version import code_version

pytestmark = [pytest.mark.timeout(900), pytest.mark.slow]

FIRST, NEW = 150, 15  # images in week one; new images in week two (10%)
WARM_STEPS = {"base": 4, "reflow": 2, "consistency": 2}


def test_week_two_warm_starts_from_the_promoted_week_one(prefect_harness, ray_local, tmp_path):
    from flows.pipeline import pipeline

    folder = tmp_path / "photos"
    kit.builtin_folder(folder, "digits", 0, FIRST)
    overrides = {
        **MICRO,
        "ingest": {"source": str(folder), "limit": None},
        "probe": {"enabled": False},
        "retrain": {"steps": WARM_STEPS},
    }
    cfg = load_config("quick", overrides=overrides)
    config = cfg.model_dump(mode="json")
    store_uri = str(tmp_path / "store")
    store = Store.open(store_uri)

    first = pipeline(config=config, store_uri=store_uri)
    assert first["retrain"]["plan"]["served"] is None and first["retrain"]["warm"] == {}
    assert first["promotion"]["promoted"], first["promotion"]
    one = first["refs"]
    # From scratch, each generator stage is keyed as main keys it: its section's values, its inputs, its code.
    base = store.get_ref(one["base"])
    assert base.key == store.stage_key(
        "base", cfg.base.keyed(), [store.get_ref(one["latents"])], code_version("workers.stages.s04_base")
    )
    assert started_from_scratch(store, one)

    kit.builtin_folder(folder, "digits", FIRST, FIRST + NEW)
    second = pipeline(config=config, store_uri=store_uri)
    two, retrain = second["refs"], second["retrain"]
    assert retrain["plan"]["served"] == one["consistency"]
    # The VAE is kept: the new test images reconstruct within its tolerance; only new images are encoded.
    assert retrain["vae"]["action"] == "keep", retrain["vae"]
    assert two["vae"] == one["vae"] and two["images"] != one["images"]
    latents = LatentsCard.from_manifest(store.get_ref(two["latents"]))
    assert (latents.encoded, latents.reused, latents.previous_ref) == (NEW, FIRST, one["latents"])
    # base, reflow and consistency start from week one's, for their warm steps; their cards say from what.
    expected = {"base": one["base"], "reflow_1": one["reflow_1"], "consistency": one["consistency"]}
    cards = {name: GeneratorCard.from_manifest(store.get_ref(two[name])) for name in expected}
    assert {name: card.parent_ref for name, card in cards.items()} == expected == retrain["warm"]
    assert [cards[name].steps for name in expected] == [WARM_STEPS[s] for s in ("base", "reflow", "consistency")]
    # The evaluation keeps week one's feature network: one feature space for the lineage's weekly FIDs.
    assert retrain["plan"]["features"] == one["features"] == two["features"]
    assert store.list_manifests("features") == [store.get_ref(one["features"])]
    # The champion is scored beside the warm challenger (the same VAE), and the run record keeps the retrain.
    assert one["consistency"] in store.get_ref(two["evaluate"]).inputs
    record = next(r for r in store.list_runs() if r["refs"] == two)
    assert record["info"]["retrain"]["warm"] == expected


def started_from_scratch(store: Store, refs: dict[str, str]) -> bool:
    """No generator of a run from scratch records a warm start in its key or its card."""
    from workers.warm import WARM_KEY

    manifests = [store.get_ref(refs[name]) for name in ("base", "reflow_1", "consistency")]
    return all(WARM_KEY not in m.config and GeneratorCard.from_manifest(m).parent_ref is None for m in manifests)


def test_a_corrupt_served_parent_fails_the_flow_before_any_stage(prefect_harness, tmp_path):
    """``retrain.mode: warm`` (the default) with a served model whose weights file is corrupt: the
    flow fails at its first task with one line naming the parent and the fix; nothing is committed."""
    from flows.pipeline import pipeline
    from infra.errors import WarmStartError

    tiny = kit.tiny_store(tmp_path / "store")
    kit.flip_byte(tiny.store, tiny.first)
    before = {m.ref for m in tiny.store.list_manifests()}
    config = load_config("quick", overrides=MICRO).model_dump(mode="json")
    with pytest.raises(WarmStartError) as raised:
        pipeline(config=config, store_uri=str(tmp_path / "store"))
    assert tiny.first.ref in str(raised.value) and "retrain.mode: warm_or_scratch" in str(raised.value)
    assert {m.ref for m in tiny.store.list_manifests()} == before
    assert [run["status"] for run in tiny.store.list_runs()] == ["failed"]
