"""The built-in RGB benchmark: procedural shapes on textured backgrounds, any size, from a seed.

Each image is one antialiased shape of one of ``len(SHAPE_CLASSES)`` classes (the label)
over a textured background. What varies, image by image:

- the shape's size (radius 27-40% of the image side), position and rotation;
- its colour (any hue and saturation) and the background's two colours, on opposite sides
  of a brightness gap (a bright shape on a dark background or the reverse, so every shape
  stays visible: the two values differ by at least ``MIN_CONTRAST``);
- the background texture: a linear gradient, stripes, a soft checkerboard or smooth noise,
  each with a random frequency, angle and phase.

Image ``i`` depends only on ``(seed, i)``: its parameters come from a random stream seeded
by ``SeedSequence([seed, 0, i])``, so any range of indices can be rendered in blocks of any
size, in any order, on any worker, and the pixels are the same. Labels are balanced
exactly: each aligned group of ``K`` consecutive indices holds each class once, in an order
drawn from ``SeedSequence([seed, 1, group])`` (so labels never follow a stride of the ids).

Rendering: the shape's coverage is drawn with PIL at ``SUPERSAMPLE`` times the resolution
and box-averaged down (antialiasing); backgrounds and compositing are vectorised numpy over
the block. Only ``Generator.random`` is used, whose stream NumPy keeps stable across
releases, and every random number is transformed here, so the images do not change with
the NumPy version. Pure numpy + PIL: no Ray, no torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPE_CLASSES = (
    "circle",
    "square",
    "triangle",
    "star",
    "cross",
    "ring",
    "heart",
    "hexagon",
    "arrow",
    "crescent",
)
SUPERSAMPLE = 4  # the coverage mask is drawn at 4x and box-averaged down
MIN_CONTRAST = 0.25  # least gap between the shape's and the background's HSV value
_IMAGE_STREAM, _LABEL_STREAM = 0, 1
_NOISE_GRID = 5  # smooth-noise textures interpolate a 5x5 grid of random values
_UNIFORMS = 20 + _NOISE_GRID**2  # random numbers drawn per image


@dataclass(frozen=True)
class ShapesBatch:
    """A block of images ``pixels`` (N, H, W, 3) uint8 with their class ids ``labels`` (N,) int64."""

    pixels: np.ndarray
    labels: np.ndarray


# ---------------------------------------------------------------------------- the shapes
# Outlines in unit coordinates (y up, centred on 0, radius about 1); placement scales them by
# the image's radius r, rotates them by theta and moves them to (cx, cy).


def _regular_polygon(corners: int, radius: float, start_degrees: float = 90.0) -> np.ndarray:
    angles = np.deg2rad(start_degrees) + 2 * np.pi * np.arange(corners) / corners
    return radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)  # (corners, 2)


def _star(points: int = 5, outer: float = 1.0, inner: float = 0.42) -> np.ndarray:
    angles = np.pi / 2 + np.pi * np.arange(2 * points) / points
    radii = np.where(np.arange(2 * points) % 2 == 0, outer, inner)
    return radii[:, None] * np.stack([np.cos(angles), np.sin(angles)], axis=1)  # (2 points, 2)


def _cross(half_width: float = 0.3, length: float = 0.92) -> np.ndarray:
    w, s = half_width, length
    return np.array(
        [(w, s), (w, w), (s, w), (s, -w), (w, -w), (w, -s), (-w, -s), (-w, -w), (-s, -w), (-s, w), (-w, w), (-w, s)]
    )


def _heart(points: int = 48) -> np.ndarray:
    """The classic heart curve x = 16 sin^3 t, y = 13 cos t - 5 cos 2t - 2 cos 3t - cos 4t."""
    t = 2 * np.pi * np.arange(points) / points
    x = 16 * np.sin(t) ** 3
    y = 13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)
    return np.stack([x, y + 2.5], axis=1) / 15.5  # centred, radius about 1


_ARROW = np.array([(-0.95, -0.24), (0.1, -0.24), (0.1, -0.7), (1.0, 0.0), (0.1, 0.7), (0.1, 0.24), (-0.95, 0.24)])
_OUTLINES = {
    "square": _regular_polygon(4, 1.02, start_degrees=45.0),
    "triangle": _regular_polygon(3, 1.05),
    "star": _star(),
    "cross": _cross(),
    "heart": _heart(),
    "hexagon": _regular_polygon(6, 0.9, start_degrees=0.0),
    "arrow": _ARROW,
}

Placement = tuple[float, float, float, float]  # (cx, cy, r, theta) in supersampled pixels


def _to_canvas(outline: np.ndarray, placement: Placement) -> list[tuple[float, float]]:
    """Rotate by theta, scale by r, move to (cx, cy); flip y (image rows grow downwards)."""
    cx, cy, r, theta = placement
    c, s = math.cos(theta), math.sin(theta)
    x = cx + r * (c * outline[:, 0] - s * outline[:, 1])
    y = cy - r * (s * outline[:, 0] + c * outline[:, 1])
    return list(zip(x.tolist(), y.tolist()))


def _disc(draw: ImageDraw.ImageDraw, cx: float, cy: float, radius: float, fill: int) -> None:
    draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill)


def _polygon_painter(name: str) -> Callable[[ImageDraw.ImageDraw, Placement], None]:
    outline = _OUTLINES[name]
    return lambda draw, placement: draw.polygon(_to_canvas(outline, placement), fill=255)


def _paint_circle(draw: ImageDraw.ImageDraw, placement: Placement) -> None:
    cx, cy, r, _ = placement
    _disc(draw, cx, cy, 0.88 * r, 255)


def _paint_ring(draw: ImageDraw.ImageDraw, placement: Placement) -> None:
    cx, cy, r, _ = placement
    _disc(draw, cx, cy, 0.92 * r, 255)
    _disc(draw, cx, cy, 0.52 * r, 0)


def _paint_crescent(draw: ImageDraw.ImageDraw, placement: Placement) -> None:
    """A disc with a smaller disc cut out, offset towards the rotation angle."""
    cx, cy, r, theta = placement
    _disc(draw, cx, cy, 0.92 * r, 255)
    _disc(draw, cx + 0.42 * r * math.cos(theta), cy - 0.42 * r * math.sin(theta), 0.78 * r, 0)


_PAINTERS: tuple[Callable[[ImageDraw.ImageDraw, Placement], None], ...] = tuple(
    {"circle": _paint_circle, "ring": _paint_ring, "crescent": _paint_crescent}.get(name) or _polygon_painter(name)
    for name in SHAPE_CLASSES
)


def _coverage(label: int, placement: Placement, size: int) -> np.ndarray:
    """The share of each pixel the shape covers, (size, size) uint8 in 0..255 (antialiased)."""
    canvas = Image.new("L", (size * SUPERSAMPLE, size * SUPERSAMPLE), 0)
    _PAINTERS[label](ImageDraw.Draw(canvas), placement)
    return np.asarray(canvas.reduce(SUPERSAMPLE))  # box average of 4x4 blocks, (size, size)


# ---------------------------------------------------------------------------- parameters


def _image_uniforms(seed: int, start: int, count: int) -> np.ndarray:
    """(count, _UNIFORMS) uniforms in [0, 1); row k depends only on (seed, start + k)."""
    rows = [
        np.random.default_rng(np.random.SeedSequence([seed, _IMAGE_STREAM, index])).random(_UNIFORMS)
        for index in range(start, start + count)
    ]
    return np.stack(rows) if rows else np.zeros((0, _UNIFORMS))


def balanced_labels(start: int, count: int, seed: int, classes: int, stream: int) -> np.ndarray:
    """Class ids (count,) int64 of images start..start+count-1: each aligned group of ``classes``
    ids holds every class once, in the order permutation(SeedSequence([seed, stream, group]))."""
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    k = classes
    indices = np.arange(start, start + count)
    first, last = start // k, (start + count - 1) // k
    orders = np.stack(
        [
            np.argsort(np.random.default_rng(np.random.SeedSequence([seed, stream, group])).random(k))
            for group in range(first, last + 1)
        ]
    )  # (groups, K): one permutation of the classes per group
    return orders[indices // k - first, indices % k].astype(np.int64)  # (count,)


def shape_labels(start: int, count: int, seed: int) -> np.ndarray:
    """Class ids (count,) int64 of images start..start+count-1: each aligned group of K ids
    holds every class once, in the order permutation(SeedSequence([seed, 1, group]))."""
    return balanced_labels(start, count, seed, len(SHAPE_CLASSES), _LABEL_STREAM)


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """(N,) hue, saturation, value in [0, 1] -> (N, 3) RGB in [0, 1].

    channel(n) = v - v s clip(min(k, 4 - k), 0, 1),  k = (n + 6 h) mod 6,  n = 5, 3, 1 for R, G, B
    """
    k = (np.array([5.0, 3.0, 1.0]) + 6 * h[:, None]) % 6  # (N, 3)
    return v[:, None] - (v * s)[:, None] * np.clip(np.minimum(k, 4 - k), 0, 1)


def _colours(u: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Shape colour (N, 3) and the background's two colours (N, 3) each, from uniforms (N, 8).

    Bright shapes (value 0.7-1) lie on dark backgrounds (value 0.05-0.45), dark shapes
    (value 0-0.3) on bright ones (0.55-0.95): the value gap is at least MIN_CONTRAST.
    """
    bright = u[:, 0] < 0.5
    fg_value = np.where(bright, 0.7 + 0.3 * u[:, 1], 0.3 * u[:, 1])
    bg_low = np.where(bright, 0.05, 0.55)  # background values span [bg_low, bg_low + 0.4]
    foreground = _hsv_to_rgb(u[:, 2], 0.35 + 0.65 * u[:, 3], fg_value)
    bg_hue = u[:, 4]
    bg_saturation = 0.7 * u[:, 5]
    background_a = _hsv_to_rgb(bg_hue, bg_saturation, bg_low + 0.4 * u[:, 6])
    background_b = _hsv_to_rgb((bg_hue + 0.3 * (u[:, 7] - 0.5)) % 1.0, bg_saturation, bg_low + 0.4 * (1 - u[:, 6]))
    return foreground, background_a, background_b


def _texture(u: np.ndarray, grid: np.ndarray, size: int) -> np.ndarray:
    """Background mixing weights m (N, size, size) in [0, 1] from uniforms (N, 4) and noise grids (N, 25).

    kind 0, gradient: m = clip(1/2 + a . q, 0, 1)
    kind 1, stripes:  m = 1/2 + 1/2 sin(2 pi f a . q + phase)
    kind 2, checker:  m = 1/2 + 1/2 tanh(3 sin(2 pi f a . q + phase) sin(2 pi f a_perp . q))
    kind 3, noise:    m = bilinear interpolation of a 5x5 grid of uniforms, contrast-stretched
    with q the pixel centre in [-1/2, 1/2]^2, a the unit vector at the texture's angle and f
    its frequency in cycles per image side (1 to 4.5).
    """
    n = u.shape[0]
    kind = np.minimum((u[:, 0] * 4).astype(np.int64), 3)
    centres = (np.arange(size) + 0.5) / size  # (S,)
    qx, qy = centres[None, None, :] - 0.5, centres[None, :, None] - 0.5  # (1, 1, S), (1, S, 1)
    m = np.empty((n, size, size))
    for k, paint in enumerate((_gradient, _stripes, _checker)):
        chosen = kind == k
        if chosen.any():
            v = u[chosen]
            angle = 2 * np.pi * v[:, 2, None, None]
            along = np.cos(angle) * qx + np.sin(angle) * qy  # (n_k, S, S)
            across = -np.sin(angle) * qx + np.cos(angle) * qy  # (n_k, S, S)
            m[chosen] = paint(along, across, 1.0 + 3.5 * v[:, 1, None, None], 2 * np.pi * v[:, 3, None, None])
    chosen = kind == 3
    if chosen.any():
        m[chosen] = _smooth_noise(grid[chosen], centres)
    return m


def _gradient(along: np.ndarray, across: np.ndarray, frequency: np.ndarray, phase: np.ndarray) -> np.ndarray:
    return np.clip(0.5 + along, 0, 1)


def _stripes(along: np.ndarray, across: np.ndarray, frequency: np.ndarray, phase: np.ndarray) -> np.ndarray:
    return 0.5 + 0.5 * np.sin(2 * np.pi * frequency * along + phase)


def _checker(along: np.ndarray, across: np.ndarray, frequency: np.ndarray, phase: np.ndarray) -> np.ndarray:
    return 0.5 + 0.5 * np.tanh(
        3 * np.sin(2 * np.pi * frequency * along + phase) * np.sin(2 * np.pi * frequency * across)
    )


def _smooth_noise(grid: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Bilinear interpolation of (n, 25) grid values at the pixel centres, (n, S, S).

    Written as elementwise sums (no BLAS), so the pixels do not depend on the block size.
    """
    position = centres * (_NOISE_GRID - 1)  # (S,) in grid units
    low = np.minimum(position.astype(np.int64), _NOISE_GRID - 2)
    w = position - low  # (S,)
    g = grid.reshape(-1, _NOISE_GRID, _NOISE_GRID)
    rows = g[:, low, :] * (1 - w)[None, :, None] + g[:, low + 1, :] * w[None, :, None]  # (n, S, G)
    noise = rows[:, :, low] * (1 - w) + rows[:, :, low + 1] * w  # (n, S, S)
    return np.clip(0.5 + 1.8 * (noise - 0.5), 0, 1)


# ---------------------------------------------------------------------------- rendering


def render_shapes(start: int, count: int, seed: int, size: int = 32) -> ShapesBatch:
    """Images ``start .. start + count - 1`` of the shapes benchmark with seed ``seed``.

    Returns pixels (count, size, size, 3) uint8 and labels (count,) int64 in
    0..len(SHAPE_CLASSES)-1. Image i depends only on (seed, i) (see the module docstring).
    """
    for name, value, least in (("start", start, 0), ("count", count, 0), ("seed", seed, 0), ("size", size, 8)):
        if not isinstance(value, (int, np.integer)) or value < least:
            raise ValueError(f"render_shapes: {name}={value!r} must be an integer >= {least}")
    labels = shape_labels(start, count, seed)
    u = _image_uniforms(seed, start, count)  # (N, _UNIFORMS)

    # u[:, 0:4] placement, 4:12 colours, 12:16 texture, 20: the noise grid
    radius = size * (0.27 + 0.13 * u[:, 0])  # pixels
    margin = 0.75 * radius
    cx = margin + u[:, 1] * (size - 2 * margin)
    cy = margin + u[:, 2] * (size - 2 * margin)
    theta = 2 * np.pi * u[:, 3]
    alpha = (
        np.stack(
            [
                _coverage(
                    int(labels[k]), (SUPERSAMPLE * cx[k], SUPERSAMPLE * cy[k], SUPERSAMPLE * radius[k], theta[k]), size
                )
                for k in range(count)
            ]
        )
        if count
        else np.zeros((0, size, size), np.uint8)
    )  # (N, S, S)

    foreground, background_a, background_b = _colours(u[:, 4:12])  # (N, 3) each
    m = _texture(u[:, 12:16], u[:, 20:], size)[..., None]  # (N, S, S, 1)
    background = background_a[:, None, None, :] * (1 - m) + background_b[:, None, None, :] * m  # (N, S, S, 3)
    a = (alpha.astype(np.float64) / 255.0)[..., None]  # (N, S, S, 1)
    # composite: x = (1 - a) background + a foreground
    image = background * (1 - a) + foreground[:, None, None, :] * a
    pixels = np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)
    return ShapesBatch(pixels=pixels, labels=labels)


# ---------------------------------------------------------------------------- captions

SIZES = ("small", "large")
BRIGHTNESS = ("bright", "dark")
HUES = ("red", "yellow", "green", "cyan", "blue", "magenta")
TEXTURES = ("gradient", "stripes", "checkerboard", "noise")  # the order of _texture's kinds


@dataclass(frozen=True)
class ShapeAttributes:
    """What a caption says about each image, as class ids (N,) each: the text benchmark's attributes."""

    shape: np.ndarray  # SHAPE_CLASSES
    size: np.ndarray  # SIZES: radius below or above the middle of its range
    brightness: np.ndarray  # BRIGHTNESS: a bright shape on a dark background, or the reverse
    hue: np.ndarray  # HUES: the shape's hue in six 60-degree bins centred on each name
    texture: np.ndarray  # TEXTURES: the background's


def shape_attributes(start: int, count: int, seed: int) -> ShapeAttributes:
    """The attributes of images ``start .. start + count - 1``, from the same random stream as their pixels."""
    u = _image_uniforms(seed, start, count)  # (N, _UNIFORMS), as render_shapes reads it
    return ShapeAttributes(
        shape=shape_labels(start, count, seed),
        size=(u[:, 0] >= 0.5).astype(np.int64),
        brightness=(u[:, 4] >= 0.5).astype(np.int64),  # _colours: u[:, 0] < 0.5 is a bright shape
        hue=(np.floor(u[:, 6] * 6 + 0.5).astype(np.int64) % 6),  # hue 0 is red; bins centred on k / 6
        texture=np.minimum((u[:, 12] * 4).astype(np.int64), 3),
    )


def shape_captions(start: int, count: int, seed: int) -> list[str]:
    """A caption per image from its own parameters, e.g. "a small bright red triangle on stripes"."""
    a = shape_attributes(start, count, seed)
    return [
        f"a {SIZES[a.size[k]]} {BRIGHTNESS[a.brightness[k]]} {HUES[a.hue[k]]} {SHAPE_CLASSES[a.shape[k]]} "
        f"on {TEXTURES[a.texture[k]]}"
        for k in range(count)
    ]
