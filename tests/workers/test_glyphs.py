"""The procedural glyphs set (workers/sources/glyphs.py): determinism, balance, backgrounds, ingest."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from infra.config import IngestConfig
from workers.pixels import decode_png
from workers.sources import glyphs
from workers.sources.glyphs import BACKGROUND_GAP, GLYPH_CLASSES, MIN_CONTRAST, render_glyphs
from workers.sources.shapes import render_shapes


def test_an_image_depends_only_on_seed_and_index_not_on_the_block():
    whole = render_glyphs(0, 33, seed=5)
    pieces = [render_glyphs(start, count, seed=5) for start, count in ((0, 7), (7, 1), (8, 25))]
    np.testing.assert_array_equal(np.concatenate([p.pixels for p in pieces]), whole.pixels)
    np.testing.assert_array_equal(np.concatenate([p.labels for p in pieces]), whole.labels)
    middle = render_glyphs(21, 9, seed=5)  # out of order and unaligned
    np.testing.assert_array_equal(middle.pixels, whole.pixels[21:30])
    assert render_glyphs(0, 33, seed=5).pixels.tobytes() == whole.pixels.tobytes()  # same bytes from scratch
    other = render_glyphs(0, 33, seed=6)
    assert (np.abs(other.pixels.astype(int) - whole.pixels.astype(int)).mean(axis=(1, 2, 3)) > 5).all()


def test_labels_cover_the_ten_digits_evenly_and_differ_from_the_shapes_order():
    labels = render_glyphs(0, 300, seed=3).labels
    assert labels.dtype == np.int64 and len(GLYPH_CLASSES) == 10
    assert np.bincount(labels, minlength=10).tolist() == [30] * 10  # every aligned group of 10 holds each once
    counts = np.bincount(glyphs.glyph_labels(7, 1234, seed=3), minlength=10)
    assert counts.max() - counts.min() <= 2
    assert not np.array_equal(labels[:100], render_shapes(0, 100, seed=3).labels)  # a stream of its own


def test_images_are_rgb_32_uint8_with_a_visible_glyph_on_a_textured_background():
    batch = render_glyphs(100, 300, seed=2)
    assert batch.pixels.shape == (300, 32, 32, 3) and batch.pixels.dtype == np.uint8
    assert batch.labels.shape == (300,) and 0 <= batch.labels.min() and batch.labels.max() <= 9
    assert batch.pixels.min() < 20 and batch.pixels.max() > 235  # colours span the range
    # not flat: the per-image pixel std (the largest of the three channels); measured min 31
    assert (batch.pixels.reshape(300, -1, 3).astype(float).std(axis=1).max(axis=1) > 20).all()


def test_backgrounds_are_gradients_or_stripes_never_flat():
    rng = np.random.default_rng(0)
    n, size = 2000, 32
    _, a, b = glyphs._colours(rng.random((n, 8)))
    m = glyphs._background(rng.random((n, 4)), size)[..., None]  # (N, S, S, 1)
    background = 255 * (a[:, None, None, :] * (1 - m) + b[:, None, None, :] * m)
    value = lambda rgb: rgb.max(axis=-1)  # noqa: E731  (HSV value)
    assert (np.abs(value(a) - value(b)) >= BACKGROUND_GAP - 1e-12).all()
    # a background alone (no glyph) varies across the image: per-image std, measured min about 11
    assert (background.reshape(n, -1, 3).std(axis=1).max(axis=1) > 8).all()


def test_the_glyph_and_its_background_are_apart_in_brightness():
    glyph, background_a, background_b = glyphs._colours(np.random.default_rng(1).random((5000, 8)))
    for colour in (glyph, background_a, background_b):
        assert colour.min() >= 0 and colour.max() <= 1
    value = lambda rgb: rgb.max(axis=1)  # noqa: E731
    gap = np.minimum(np.abs(value(glyph) - value(background_a)), np.abs(value(glyph) - value(background_b)))
    assert gap.min() >= MIN_CONTRAST - 1e-12
    assert (value(glyph) > 0.5).mean() == pytest.approx(0.5, abs=0.05)  # both polarities


def test_the_ten_digits_have_different_strokes():
    # one neutral pose (centred, upright, no slant, middle size and width): u = 0.5 everywhere
    masks = [glyphs._coverage(label, np.full(7, 0.5), 32) / 255.0 for label in range(10)]
    for mask in masks:
        assert 0.05 < mask.mean() < 0.5  # a stroke, not a blob and not nothing
    for a, b in itertools.combinations(range(10), 2):
        differ = np.abs(masks[a] - masks[b]).sum() / min(masks[a].sum(), masks[b].sum())
        assert differ > 0.3, f"digits {a} and {b} look alike ({differ:.2f})"


@pytest.mark.parametrize("bad", [dict(start=-1), dict(count=-2), dict(seed=-3), dict(size=4), dict(count=1.5)])
def test_render_glyphs_rejects_bad_arguments(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        render_glyphs(**(dict(start=0, count=2, seed=0, size=32) | bad))


def test_an_empty_block_is_empty():
    batch = render_glyphs(10, 0, seed=0)
    assert batch.pixels.shape == (0, 32, 32, 3) and batch.labels.shape == (0,)


@pytest.mark.timeout(600)
def test_ingest_of_the_glyphs_source(ray_local, local_store):
    from workers.stages.s01_ingest import run_ingest

    config = IngestConfig(source="glyphs", shapes_count=300, channels=3, image_size=32)
    manifest = run_ingest(local_store, config)
    table = local_store.read_table(manifest, "images")
    assert table.num_rows == 300
    assert np.bincount(table.column("label").to_pylist(), minlength=10).tolist() == [30] * 10
    images = dict(zip(table.column("id").to_pylist(), table.column("image").to_pylist()))
    np.testing.assert_array_equal(decode_png(images["glyphs-0000007"], 3), render_glyphs(7, 1, seed=0).pixels[0])
    assert set(table.column("split").to_pylist()) == {"train", "test"}
    # the shapes set of the same size and seed is another dataset (and another key)
    shapes = run_ingest(local_store, config.model_copy(update={"source": "shapes"}))
    assert shapes.key != manifest.key
