"""Which model a replica serves, without Ray: the sanity batch, the pointer watch, its back-off, /healthz.

Real stores and real (tiny, untrained) generators; the only thing the tests control is the
watch's clock, so that a back-off of minutes is checked in milliseconds. The same logic over
real HTTP is in test_serve.py and test_serve_drills.py.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import pytest

from drills import kit
from infra.cards import GeneratorCard
from infra.errors import IntegrityError
from infra.store import SERVING_POINTER
from workers.generator import Generator
from workers.serving.swap import UnfitModel, Watch, default_guidance, load_served, sanity_check

STEPS = 2


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> kit.TinyStore:
    return kit.tiny_store(tmp_path_factory.mktemp("swap") / "store")


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def failures(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "fewstep.serve" and "could not switch" in r.getMessage()]


# --------------------------------------------------------------------------- the sanity batch


@pytest.mark.parametrize(
    "poison, message",
    [
        ("nan", r"1 tensor\(s\) of its network hold NaN or inf \(final_layer.linear.weight\)"),
        ("inf", r"1 tensor\(s\) of its network hold NaN or inf \(final_layer.linear.weight\)"),
        (
            "overflow",
            r"draws non-finite latents \(\d+ NaN and \d+ infinite of 64 values\) in a seeded sanity batch "
            r"of 2 images at 2 step\(s\) with euler",
        ),
    ],
)
def test_a_model_that_cannot_draw_finite_images_is_refused(tiny, poison, message):
    bad = kit.commit_generator(
        tiny.store, "base", "flow", 10, tiny.store.get_ref(kit.commit_vae(tiny.store).ref), poison
    )
    generator = Generator.load(tiny.store, bad, device="cpu")
    with pytest.raises(UnfitModel, match=message):
        sanity_check(generator, "euler", STEPS)
    with pytest.raises(UnfitModel, match="it is not served"):
        load_served(tiny.store, bad.ref, "euler", STEPS)


def test_good_models_pass_and_a_flipped_byte_fails_its_digest(tiny):
    for ref in (tiny.first.ref, tiny.second.ref):
        served = load_served(tiny.store, ref, "euler", STEPS)
        assert served.ref == ref and served.card["ref"] == ref
    sanity_check(Generator.load(tiny.store, tiny.first, device="cpu"), "consistency", STEPS)
    with pytest.raises(IntegrityError, match=r"file 'model' of base/tiny5 .* is corrupt \(sha256"):
        load_served(tiny.store, tiny.corrupt.ref, "euler", STEPS)


def test_default_guidance_is_the_promoted_scale_else_the_cards_else_one(tiny):
    store, pointer = tiny.store, "serving/guidance-test"  # its own pointer: the module's watch tests use theirs
    # No record (served by hand) and no scale on its card: 1.
    assert load_served(store, tiny.second.ref, "euler", STEPS, pointer).guidance == 1.0
    # Promotion's record for this ref: its scale, shown by /v1/model.
    store.put_pointer(pointer, tiny.second.ref, about={"guidance": 3.0})
    served = load_served(store, tiny.second.ref, "euler", STEPS, pointer)
    assert served.guidance == 3.0 and served.card["guidance"] == 3.0
    # The record describes the ref it points at, not another model served beside it.
    assert load_served(store, tiny.first.ref, "consistency", STEPS, pointer).guidance == 1.0
    # A model whose card names its scale (a student distilled at 2.5), with no record for it.
    with store.begin("consistency", "guided", config={"g": 2.5}) as writer:
        writer.write_json("note", {})
        card = GeneratorCard.from_manifest(tiny.first)
        student = writer.commit(metrics=dataclasses.replace(card, guidance=2.5).to_metrics())
    assert default_guidance(store, student, pointer) == 2.5


# --------------------------------------------------------------------------- the watch


def test_a_failed_swap_keeps_the_old_model_logs_once_and_backs_off(tiny, caplog):
    caplog.set_level(logging.INFO, logger="fewstep.serve")
    clock = Clock()
    watch = Watch(tiny.store, SERVING_POINTER, "euler", STEPS, retry_s=60, max_retry_s=200, clock=clock)
    served = load_served(tiny.store, tiny.first.ref, "euler", STEPS)
    tiny.store.put_pointer(SERVING_POINTER, tiny.first.ref)
    assert watch.poll(served, follow=True) is served
    assert watch.health(served) == {"status": "ok", "model": tiny.first.ref, "reasons": [], "failed_swap": None}

    try:
        tiny.store.put_pointer(SERVING_POINTER, tiny.nan.ref)
        for _ in range(20):  # twenty polls within the back-off: one load, one line
            assert watch.poll(served, follow=True) is served
            clock.now += 1
        assert len(failures(caplog)) == 1
        assert all(record.exc_info is None for record in failures(caplog)), "a failed swap logged a traceback"
        health = watch.health(served)
        assert health["status"] == "degraded" and health["model"] == tiny.first.ref
        assert health["failed_swap"] == {
            "ref": tiny.nan.ref,
            "error": health["failed_swap"]["error"],
            "attempts": 1,
            "retry_in_s": 40.0,
        }
        assert health["failed_swap"]["error"].startswith("UnfitModel: base/tiny3-nan: 1 tensor(s)")
        assert (
            f"could not switch to {tiny.nan.ref}" in health["reasons"][0] and "next try in 40 s" in health["reasons"][0]
        )

        clock.now += 40  # the back-off is over: one more try, then twice as long (capped)
        watch.poll(served, follow=True)
        assert len(failures(caplog)) == 2 and watch.failed.attempts == 2
        assert watch.failed.retry_at == clock.now + 120
        clock.now += 120
        watch.poll(served, follow=True)
        assert watch.failed.attempts == 3 and watch.failed.retry_at == clock.now + 200

        # The pointer moves to another ref: tried at once, whatever the back-off said.
        tiny.store.put_pointer(SERVING_POINTER, tiny.corrupt.ref)
        assert watch.poll(served, follow=True) is served
        assert len(failures(caplog)) == 4 and watch.failed.ref == tiny.corrupt.ref and watch.failed.attempts == 1
        assert watch.failed.error.startswith("IntegrityError: file 'model' of base/tiny5")

        # ... and to a good model: swapped in, healthy again.
        tiny.store.put_pointer(SERVING_POINTER, tiny.second.ref)
        swapped = watch.poll(served, follow=True)
        assert swapped.ref == tiny.second.ref and swapped.sampler == "euler"
        assert watch.health(swapped) == {"status": "ok", "model": tiny.second.ref, "reasons": [], "failed_swap": None}
    finally:
        tiny.store.put_pointer(SERVING_POINTER, tiny.first.ref)


def test_health_is_degraded_while_the_store_is_gone_and_recovers(tiny, caplog):
    caplog.set_level(logging.INFO, logger="fewstep.serve")
    root = Path(tiny.store.uri)
    served = load_served(tiny.store, tiny.first.ref, "euler", STEPS)
    for follow in (True, False):  # following the pointer, and pinned
        caplog.clear()
        watch = Watch(tiny.store, SERVING_POINTER, "euler", STEPS)
        assert watch.poll(served, follow) is served and watch.health(served)["status"] == "ok"
        moved = root.with_name("store-moved")
        os.rename(root, moved)
        try:
            for _ in range(5):
                assert watch.poll(served, follow) is served
            health = watch.health(served)
        finally:
            os.rename(moved, root)
        assert health["status"] == "degraded" and health["model"] == tiny.first.ref
        assert f"the served model {tiny.first.ref} is no longer in the store {tiny.store.uri}" in health["reasons"][0]
        if follow:
            assert f"the pointer '{SERVING_POINTER}' is unset in {tiny.store.uri}" in health["reasons"][1]
        assert len(health["reasons"]) == (2 if follow else 1)
        degraded_lines = [r for r in caplog.records if r.getMessage().startswith("degraded:")]
        assert len(degraded_lines) == len(health["reasons"]), "store trouble was logged every poll"
        watch.poll(served, follow)
        assert watch.health(served) == {"status": "ok", "model": tiny.first.ref, "reasons": [], "failed_swap": None}


def test_an_unreadable_pointer_is_degraded_not_a_crash(tiny):
    watch = Watch(tiny.store, "serving/broken", "euler", STEPS)
    served = load_served(tiny.store, tiny.first.ref, "euler", STEPS)
    path = Path(tiny.store.uri) / "pointers" / "serving" / "broken.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("{not json")
    assert watch.poll(served, follow=True) is served
    health = watch.health(served)
    assert health["status"] == "degraded"
    assert (
        "cannot read the pointer 'serving/broken'" in health["reasons"][0] and "IntegrityError" in health["reasons"][0]
    )
