"""The procedural shapes benchmark (workers/sources/shapes.py): determinism, balance, ranges."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from workers.sources import shapes
from workers.sources.shapes import MIN_CONTRAST, SHAPE_CLASSES, SUPERSAMPLE, render_shapes, shape_labels


def test_an_image_depends_only_on_seed_and_index_not_on_the_block():
    whole = render_shapes(0, 37, seed=5)
    pieces = [render_shapes(start, count, seed=5) for start, count in ((0, 10), (10, 1), (11, 26))]
    np.testing.assert_array_equal(np.concatenate([p.pixels for p in pieces]), whole.pixels)
    np.testing.assert_array_equal(np.concatenate([p.labels for p in pieces]), whole.labels)
    # out of order and unaligned
    middle = render_shapes(23, 9, seed=5)
    np.testing.assert_array_equal(middle.pixels, whole.pixels[23:32])
    np.testing.assert_array_equal(middle.labels, whole.labels[23:32])
    # and reproducible from scratch
    np.testing.assert_array_equal(render_shapes(0, 37, seed=5).pixels, whole.pixels)


def test_another_seed_gives_other_images():
    a, b = render_shapes(0, 20, seed=0), render_shapes(0, 20, seed=1)
    assert not np.array_equal(a.labels, b.labels)
    # every image differs (a different placement, colour and background)
    assert (np.abs(a.pixels.astype(int) - b.pixels.astype(int)).mean(axis=(1, 2, 3)) > 5).all()


def test_labels_are_exactly_balanced_in_every_aligned_group_and_follow_no_stride():
    k = len(SHAPE_CLASSES)
    assert k >= 10
    labels = shape_labels(0, 50 * k, seed=3)
    assert labels.dtype == np.int64
    for group in labels.reshape(50, k):
        assert sorted(group.tolist()) == list(range(k))
    # any block is balanced up to its two partial groups
    counts = np.bincount(shape_labels(7, 1234, seed=3), minlength=k)
    assert counts.max() - counts.min() <= 2
    # ids at one residue mod K (e.g. every 10th id) still see many classes
    assert len(set(labels[::k].tolist())) >= k - 2
    np.testing.assert_array_equal(render_shapes(0, 3 * k, seed=3).labels, labels[: 3 * k])


def test_far_indices_render_and_stay_balanced():
    batch = render_shapes(999_990, 20, seed=0)
    assert batch.pixels.shape == (20, 32, 32, 3)
    assert np.bincount(batch.labels, minlength=len(SHAPE_CLASSES)).tolist() == [2] * len(SHAPE_CLASSES)


def test_pixels_and_labels_have_the_documented_types_and_ranges():
    batch = render_shapes(100, 200, seed=2, size=24)
    assert batch.pixels.shape == (200, 24, 24, 3) and batch.pixels.dtype == np.uint8
    assert batch.labels.shape == (200,) and batch.labels.dtype == np.int64
    assert batch.labels.min() >= 0 and batch.labels.max() < len(SHAPE_CLASSES)
    # colours span the whole range, and images are not flat
    assert batch.pixels.min() < 20 and batch.pixels.max() > 235
    assert (batch.pixels.reshape(200, -1, 3).std(axis=1).max(axis=1) > 20).all()


def test_every_class_paints_a_visible_shape_and_backgrounds_vary():
    batch = render_shapes(0, 300, seed=4)
    x = batch.pixels.astype(np.float64)
    corners = x[:, [0, 0, -1, -1], [0, -1, 0, -1]]  # (N, 4, 3): mostly background
    centre = x[:, 12:20, 12:20].reshape(300, -1, 3)
    # the shape covers part of the centre region in most images (ring holes and crescent
    # cut-outs can miss it): some centre pixels are far from every corner's colour
    distance = np.abs(centre[:, :, None, :] - corners[:, None, :, :]).sum(-1).min(-1)  # (N, 64)
    assert (distance.max(axis=1) > 40).mean() > 0.9
    # backgrounds are textured, not flat: the four corners differ in most images
    assert (np.ptp(corners.sum(-1), axis=1) > 10).mean() > 0.6


def test_the_shape_and_its_background_are_apart_in_brightness():
    u = np.random.default_rng(0).random((5000, 8))
    foreground, background_a, background_b = shapes._colours(u)
    for colour in (foreground, background_a, background_b):
        assert colour.min() >= 0 and colour.max() <= 1
    value = lambda rgb: rgb.max(axis=1)  # noqa: E731  (HSV value)
    gap = np.minimum(np.abs(value(foreground) - value(background_a)), np.abs(value(foreground) - value(background_b)))
    assert gap.min() >= MIN_CONTRAST - 1e-12
    assert (value(foreground) > 0.5).mean() == pytest.approx(0.5, abs=0.05)  # both polarities


def test_hsv_to_rgb_matches_colorsys():
    import colorsys

    hsv = np.random.default_rng(1).random((200, 3))
    expected = np.array([colorsys.hsv_to_rgb(*row) for row in hsv])
    np.testing.assert_allclose(shapes._hsv_to_rgb(hsv[:, 0], hsv[:, 1], hsv[:, 2]), expected, atol=1e-12)


def test_silhouettes_of_different_classes_differ_at_every_rotation():
    size, s = 32, SUPERSAMPLE

    def mask(label: int, theta: float) -> np.ndarray:
        return shapes._coverage(label, (s * 16.0, s * 16.0, s * 11.0, theta), size) / 255.0

    angles = [2 * math.pi * k / 24 for k in range(24)]
    masks = {label: [mask(label, a) for a in angles] for label in range(len(SHAPE_CLASSES))}
    for a, b in itertools.combinations(range(len(SHAPE_CLASSES)), 2):
        # the closest any rotation of b comes to a (at rotation 0): share of pixels that differ
        closest = min(np.abs(masks[a][0] - m).sum() for m in masks[b]) / masks[a][0].sum()
        assert closest > 0.1, f"{SHAPE_CLASSES[a]} and {SHAPE_CLASSES[b]} look alike ({closest:.3f})"
    # antialiased: edges carry intermediate coverage
    edge = masks[SHAPE_CLASSES.index("circle")][0]
    assert ((edge > 0.05) & (edge < 0.95)).sum() > 20


@pytest.mark.parametrize("bad", [dict(start=-1), dict(count=-2), dict(seed=-3), dict(size=4), dict(count=1.5)])
def test_render_shapes_rejects_bad_arguments(bad):
    arguments = dict(start=0, count=2, seed=0, size=32) | bad
    with pytest.raises(ValueError, match=next(iter(bad))):
        render_shapes(**arguments)


def test_an_empty_block_is_empty():
    batch = render_shapes(10, 0, seed=0)
    assert batch.pixels.shape == (0, 32, 32, 3) and batch.labels.shape == (0,)


def test_captions_say_what_the_image_shows():
    from workers.sources.shapes import (
        HUES,
        SHAPE_CLASSES,
        _colours,
        _image_uniforms,
        render_shapes,
        shape_attributes,
        shape_captions,
    )

    n = 300
    captions, attributes = shape_captions(0, n, 0), shape_attributes(0, n, 0)
    assert shape_captions(100, 5, 0) == captions[100:105]  # per image, like the pixels
    assert shape_captions(0, 5, 1) != captions[:5]
    batch = render_shapes(0, n, 0)
    np.testing.assert_array_equal(attributes.shape, batch.labels)
    for caption, label in zip(captions, batch.labels):
        assert caption.startswith("a ") and f" {SHAPE_CLASSES[label]} on " in caption
    # every value of every attribute occurs
    for name, count in (("size", 2), ("brightness", 2), ("hue", 6), ("texture", 4)):
        assert set(getattr(attributes, name).tolist()) == set(range(count)), name
    # the hue named is the shape's colour: its strongest channel is one the name allows
    foreground, _, _ = _colours(_image_uniforms(0, 0, n)[:, 4:12])
    allowed = {"red": {0}, "yellow": {0, 1}, "green": {1}, "cyan": {1, 2}, "blue": {2}, "magenta": {0, 2}}
    saturated = np.ptp(foreground, axis=1) > 0.05
    for rgb, hue in zip(foreground[saturated], attributes.hue[saturated]):
        assert int(rgb.argmax()) in allowed[HUES[hue]], (rgb, HUES[hue])
    assert saturated.sum() > 200
    # bright shapes on dark backgrounds make darker images on average, and the reverse
    mean = batch.pixels.reshape(n, -1).mean(1)
    assert mean[attributes.brightness == 0].mean() < mean[attributes.brightness == 1].mean()
