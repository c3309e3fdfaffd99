"""A second built-in labelled RGB set: the digits 0-9 drawn as strokes on gradient or striped backgrounds.

It exists so that a preset is never fitted to one procedural generator: the ``glyphs`` preset
is the ``shapes`` preset with only the source switched, and nobody tunes on it.

Each image is one digit (the label, 0-9), drawn from our own vector strokes (polylines and
elliptic arcs in a unit box; no font file, so the pixels do not depend on FreeType or a font
version). What varies, image by image:

- the glyph's height (56-80% of the image side), position, rotation (within +-15 degrees),
  slant, width and stroke width;
- its colour (any hue and saturation) and the background's two colours, on opposite sides of
  a brightness gap (a bright glyph on a dark background or the reverse; the values differ by
  at least ``MIN_CONTRAST``, as in :mod:`workers.sources.shapes`);
- the background: a linear gradient or stripes (1-3.5 cycles per side), at any angle and phase.

Image ``i`` depends only on ``(seed, i)``: its parameters come from ``SeedSequence([seed, 2, i])``
and its label from a balanced order per aligned group of 10 ids, drawn from
``SeedSequence([seed, 3, group])`` (streams other than the shapes set's, so a seed does not
give both sets the same label sequence). Rendering: the strokes are drawn with PIL at
``SUPERSAMPLE`` times the resolution and box-averaged down. Pure numpy + PIL.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from workers.sources.shapes import SUPERSAMPLE, ShapesBatch, _hsv_to_rgb, balanced_labels

GLYPH_CLASSES = tuple(str(d) for d in range(10))
MIN_CONTRAST = 0.25  # least gap between the glyph's and the background's HSV value
BACKGROUND_GAP = 0.16  # least gap between the HSV values of the background's two colours
_IMAGE_STREAM, _LABEL_STREAM = 2, 3
_UNIFORMS = 19  # random numbers drawn per image


# ---------------------------------------------------------------------------- the strokes
# Each digit is a few polylines in unit coordinates: x in [-0.5, 0.5] right, y in [-1, 1] up.


def _arc(cx: float, cy: float, rx: float, ry: float, start: float, stop: float, points: int = 28) -> np.ndarray:
    """Points of an elliptic arc from angle ``start`` to ``stop`` (degrees, counter-clockwise positive)."""
    a = np.deg2rad(np.linspace(start, stop, points))
    return np.stack([cx + rx * np.cos(a), cy + ry * np.sin(a)], axis=1)


def _line(*points: tuple[float, float]) -> np.ndarray:
    return np.array(points, dtype=np.float64)


def _join(*parts: np.ndarray) -> np.ndarray:
    return np.concatenate(parts)


_STROKES: tuple[tuple[np.ndarray, ...], ...] = (
    (_arc(0, 0, 0.45, 0.92, 90, 450, 48),),  # 0
    (_line((-0.28, 0.58), (0.05, 0.92), (0.05, -0.92)), _line((-0.28, -0.92), (0.38, -0.92))),  # 1
    (_join(_arc(0, 0.47, 0.42, 0.45, 160, -35), _line((-0.45, -0.92), (0.47, -0.92))),),  # 2
    (_join(_arc(0, 0.47, 0.4, 0.43, 150, -90), _arc(0, -0.45, 0.45, 0.47, 90, -150)),),  # 3
    (_line((0.22, -0.92), (0.22, 0.92), (-0.47, -0.35), (0.47, -0.35)),),  # 4
    (_join(_line((0.42, 0.92), (-0.3, 0.92), (-0.38, 0.08)), _arc(0, -0.4, 0.45, 0.5, 125, -145)),),  # 5
    (
        _join(
            _line((0.35, 0.88), (0.02, 0.76), (-0.28, 0.45), (-0.43, 0.0)),
            _arc(0, -0.45, 0.43, 0.47, 180, -180, 40),
        ),
    ),  # 6
    (_line((-0.45, 0.92), (0.45, 0.92), (-0.1, -0.92)),),  # 7
    (_arc(0, 0.5, 0.36, 0.42, -90, 270, 40), _arc(0, -0.44, 0.45, 0.48, 90, 450, 40)),  # 8
    (
        _join(
            _arc(0, 0.45, 0.43, 0.47, 0, 360, 40),
            _line((0.43, 0.0), (0.33, -0.45), (0.02, -0.8), (-0.35, -0.88)),
        ),
    ),  # 9
)


def _coverage(label: int, u: np.ndarray, size: int) -> np.ndarray:
    """The share of each pixel the glyph covers, (size, size) uint8 in 0..255, from uniforms u (7,).

    u: height, x, y, rotation, slant, width, stroke width.
    """
    half = size * (0.28 + 0.12 * u[0])  # half the glyph's height, pixels
    aspect = 0.85 + 0.35 * u[5]  # width relative to the unit box
    theta = math.radians(30.0 * (u[3] - 0.5))  # rotation, +-15 degrees
    slant = 0.3 * (u[4] - 0.5)  # x += slant * y (italics either way)
    margin_x, margin_y = 0.75 * half, 1.1 * half
    cx = margin_x + u[1] * (size - 2 * margin_x)
    cy = margin_y + u[2] * max(size - 2 * margin_y, 0.0)
    width = half * (0.2 + 0.1 * u[6])  # stroke width, pixels
    c, s, k = math.cos(theta), math.sin(theta), SUPERSAMPLE
    canvas = Image.new("L", (size * k, size * k), 0)
    draw = ImageDraw.Draw(canvas)
    for stroke in _STROKES[label]:
        x = half * (aspect * stroke[:, 0] + slant * stroke[:, 1])
        y = half * stroke[:, 1]
        px = k * (cx + c * x - s * y)  # rotate, then flip y: image rows grow downwards
        py = k * (cy - (s * x + c * y))
        points = list(zip(px.tolist(), py.tolist()))
        draw.line(points, fill=255, width=max(1, round(k * width)), joint="curve")
        r = k * width / 2
        for ex, ey in (points[0], points[-1]):  # round caps
            draw.ellipse((ex - r, ey - r, ex + r, ey + r), fill=255)
    return np.asarray(canvas.reduce(k))


# ---------------------------------------------------------------------------- rendering


def glyph_labels(start: int, count: int, seed: int) -> np.ndarray:
    """Class ids (count,) int64: each aligned group of 10 ids holds every digit once."""
    return balanced_labels(start, count, seed, len(GLYPH_CLASSES), _LABEL_STREAM)


def _uniforms(seed: int, start: int, count: int) -> np.ndarray:
    rows = [
        np.random.default_rng(np.random.SeedSequence([seed, _IMAGE_STREAM, index])).random(_UNIFORMS)
        for index in range(start, start + count)
    ]
    return np.stack(rows) if rows else np.zeros((0, _UNIFORMS))


def _background(u: np.ndarray, size: int) -> np.ndarray:
    """Mixing weights m (N, size, size) in [0, 1] from uniforms (N, 4): kind, frequency, angle, phase.

    gradient: m = clip(1/2 + a . q, 0, 1);  stripes: m = 1/2 + 1/2 sin(2 pi f a . q + phase)
    with q the pixel centre in [-1/2, 1/2]^2, a the unit vector at the angle, f in 1..3.5.
    """
    centres = (np.arange(size) + 0.5) / size - 0.5
    angle = 2 * np.pi * u[:, 2, None, None]
    along = np.cos(angle) * centres[None, None, :] + np.sin(angle) * centres[None, :, None]  # (N, S, S)
    frequency = 1.0 + 2.5 * u[:, 1, None, None]
    stripes = 0.5 + 0.5 * np.sin(2 * np.pi * frequency * along + 2 * np.pi * u[:, 3, None, None])
    gradient = np.clip(0.5 + along, 0, 1)
    return np.where(u[:, 0, None, None] < 0.5, gradient, stripes)


def _colours(u: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Glyph colour and the background's two colours, (N, 3) each, from uniforms (N, 8).

    Bright glyphs (value 0.7-1) lie on dark backgrounds (value 0.05-0.45), dark glyphs (0-0.3)
    on bright ones (0.55-0.95). The background's two values are at least ``BACKGROUND_GAP`` apart,
    and its second hue is 0.1-0.5 of a turn from its first.
    """
    bright = u[:, 0] < 0.5
    glyph = _hsv_to_rgb(u[:, 1], 0.4 + 0.6 * u[:, 2], np.where(bright, 0.7 + 0.3 * u[:, 3], 0.3 * u[:, 3]))
    low = np.where(bright, 0.05, 0.55)  # background values span [low, low + 0.4]
    saturation = 0.2 + 0.7 * u[:, 5]
    background_a = _hsv_to_rgb(u[:, 4], saturation, low + 0.12 * u[:, 6])
    hue_b = (u[:, 4] + 0.1 + 0.4 * u[:, 7]) % 1.0
    background_b = _hsv_to_rgb(hue_b, saturation, low + 0.4 - 0.12 * u[:, 6])  # value gap >= BACKGROUND_GAP
    return glyph, background_a, background_b


def render_glyphs(start: int, count: int, seed: int, size: int = 32) -> ShapesBatch:
    """Images ``start .. start + count - 1`` of the glyphs set with seed ``seed``.

    Returns pixels (count, size, size, 3) uint8 and labels (count,) int64 in 0..9 (the digit).
    Image i depends only on (seed, i) (see the module docstring).
    """
    for name, value, least in (("start", start, 0), ("count", count, 0), ("seed", seed, 0), ("size", size, 8)):
        if not isinstance(value, (int, np.integer)) or value < least:
            raise ValueError(f"render_glyphs: {name}={value!r} must be an integer >= {least}")
    labels = glyph_labels(start, count, seed)
    u = _uniforms(seed, start, count)  # (N, 19): 0:7 the glyph, 7:15 colours, 15:19 background
    alpha = (
        np.stack([_coverage(int(labels[n]), u[n, 0:7], size) for n in range(count)])
        if count
        else np.zeros((0, size, size), np.uint8)
    )  # (N, S, S)
    glyph, background_a, background_b = _colours(u[:, 7:15])
    m = _background(u[:, 15:19], size)[..., None]  # (N, S, S, 1)
    background = background_a[:, None, None, :] * (1 - m) + background_b[:, None, None, :] * m
    a = (alpha.astype(np.float64) / 255.0)[..., None]
    image = background * (1 - a) + glyph[:, None, None, :] * a  # (N, S, S, 3) in [0, 1]
    pixels = np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)
    return ShapesBatch(pixels=pixels, labels=labels)
