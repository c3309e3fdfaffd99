"""Pixels: image bytes <-> arrays <-> model batches, for every stage that touches images.

Conventions, in one place:

- a stored image is a PNG of ``uint8`` pixels, mode ``L`` (1 channel) or ``RGB`` (3 channels);
- an array image is ``(H, W, C)`` uint8; a model batch is ``(N, C, H, W)`` float32 in [-1, 1]:

      x = u / 127.5 - 1          u = round((x + 1) * 127.5), clipped to 0..255

  :func:`to_model_range` / :func:`from_model_range` convert numpy arrays, and
  :func:`tensor_to_model_range` / :func:`tensor_to_uint8` torch tensors, by those two formulas;
- a source image wider than 8 bits per sample is brought to 8 bits by the range its *type* can
  hold, never by the image's own min/max (a dark 16-bit photo stays dark), see :func:`to_8bit`:

      16-bit (PIL I;16, I;16B, ...; 16-bit PNG/TIFF)   u = round(v / 257)     0..65535 -> 0..255
      32-bit integer (PIL I)                           the same, for values in 0..65535
      32-bit float (PIL F)                             u = round(255 v)      0..1 -> 0..255

  A 32-bit integer image with values outside 0..65535, or a float image with values outside
  [0, 1] (or NaN/inf), has no range to read it by: :class:`UnsupportedPixels`, which ingest
  quarantines with the reason. (16-bit RGB(A) PNGs are already read as 8-bit by PIL, v >> 8.)
"""

from __future__ import annotations

import io
from collections.abc import Iterable

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

MODES = {1: "L", 3: "RGB"}


class UnsupportedPixels(ValueError):
    """An image whose pixel values fewstep cannot map to 8 bits; the message says which and why."""


# Errors a broken or foreign file raises while PIL opens or decodes it. Anything else is a bug.
# (UnsupportedPixels is a ValueError, so it is one of them.)
DECODE_ERRORS = (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError)

UINT16_MODES = ("I;16", "I;16L", "I;16B", "I;16N")  # unsigned 16-bit grayscale, any byte order
UINT16_MAX = 65535


def mode_for(channels: int) -> str:
    if channels not in MODES:
        raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")
    return MODES[channels]


def open_image(data: bytes) -> Image.Image:
    """Decode encoded bytes (PNG, JPEG, ...) fully, so truncated files fail here, not later."""
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def to_8bit(image: Image.Image) -> Image.Image:
    """A 16-bit, 32-bit integer or float grayscale image -> ``L``, scaled by its type's range.

    u = round(v / 257) for 16-bit (and 32-bit integer within 0..65535), u = round(255 v) for float
    in [0, 1]; see the module docstring. Other modes come back unchanged. PIL's own
    ``convert("L")`` clips instead (v > 255 -> white), which is what this replaces.
    """
    mode = image.mode
    if mode not in UINT16_MODES and mode not in ("I", "F"):
        if mode.startswith(("I;", "F;")):
            raise UnsupportedPixels(f"pixel mode {mode!r} is not supported; save the image as 8- or 16-bit")
        return image
    v = np.asarray(image)  # (H, W): uint16 (any byte order), int32 or float32
    if v.size == 0:
        raise UnsupportedPixels(f"the image has no pixels ({image.width}x{image.height})")
    if mode == "F":
        lo, hi = float(np.min(v)), float(np.max(v))
        if not (np.isfinite(lo) and np.isfinite(hi)):
            raise UnsupportedPixels("float pixels include NaN or infinity; save finite values in [0, 1]")
        if lo < 0.0 or hi > 1.0:
            raise UnsupportedPixels(
                f"float pixels span [{lo:.4g}, {hi:.4g}], outside [0, 1] (the float range fewstep "
                "reads); rescale them to [0, 1] or save the image as 8- or 16-bit"
            )
        u = np.rint(v.astype(np.float64) * 255.0)
    else:
        lo, hi = int(np.min(v)), int(np.max(v))
        if lo < 0 or hi > UINT16_MAX:
            raise UnsupportedPixels(
                f"32-bit integer pixels span [{lo}, {hi}], outside 0..{UINT16_MAX} (the 16-bit range "
                "fewstep reads them by); save the image as 8- or 16-bit"
            )
        u = np.rint(v.astype(np.float64) / 257.0)  # 65535 / 255 = 257 exactly
    return Image.fromarray(u.astype(np.uint8))  # (H, W) uint8 -> mode L


def to_mode(image: Image.Image, channels: int) -> Image.Image:
    """Convert to ``L`` or ``RGB`` (wide pixels through :func:`to_8bit`); transparent pixels are
    composed over white first."""
    mode = mode_for(channels)
    image = to_8bit(image)
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image if image.mode == mode else image.convert(mode)


def resize_center_crop(image: Image.Image, size: int, resample: int = Image.Resampling.BICUBIC) -> Image.Image:
    """Scale the shorter side to ``size``, then crop the central ``size x size`` square."""
    width, height = image.size
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), resample=resample)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return image.crop((left, top, left + size, top + size))


def prepare_image(data: bytes, size: int, channels: int) -> Image.Image:
    """Encoded bytes of any size/mode -> a ``size x size`` image of ``channels`` channels."""
    return resize_center_crop(to_mode(open_image(data), channels), size)


def encode_png(image: Image.Image | np.ndarray) -> bytes:
    """A PIL image or a uint8 array (H, W) / (H, W, 1) / (H, W, 3) -> PNG bytes."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise ValueError(f"encode_png needs uint8 pixels, got {image.dtype}")
        if image.ndim == 3 and image.shape[2] == 1:
            image = image[:, :, 0]
        image = Image.fromarray(image)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def decode_png(data: bytes, channels: int) -> np.ndarray:
    """PNG (or any PIL-readable) bytes -> uint8 array (H, W, C) with ``channels`` channels."""
    array = np.asarray(to_mode(open_image(data), channels), dtype=np.uint8)
    return array[:, :, None] if array.ndim == 2 else array  # (H, W, C)


def to_model_range(pixels: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, C) -> float32 (N, C, H, W) in [-1, 1].

    x = u / 127.5 - 1
    """
    x = pixels.astype(np.float32) / 127.5 - 1.0
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))  # (N, C, H, W)


def from_model_range(x: np.ndarray) -> np.ndarray:
    """float (N, C, H, W) in [-1, 1] -> uint8 (N, H, W, C), clipped and rounded.

    u = round((x + 1) * 127.5)
    """
    u = np.clip(np.rint((np.asarray(x, dtype=np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)
    return u.transpose(0, 2, 3, 1)  # (N, H, W, C)


def tensor_to_model_range(u: Tensor) -> Tensor:
    """uint8 (N, C, H, W) tensor -> float32 in [-1, 1], on the same device: x = u / 127.5 - 1."""
    return u.float() / 127.5 - 1.0


def tensor_to_uint8(x: Tensor) -> np.ndarray:
    """float (N, C, H, W) tensor in [-1, 1] (e.g. a decoder's output) -> uint8 (N, H, W, C) on the host.

    u = round((x + 1) * 127.5)
    """
    pixels = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).cpu().numpy()


def decode_pixels(images: Iterable[bytes], channels: int) -> np.ndarray:
    """A batch of stored PNGs (all the same size) -> uint8 (N, H, W, C)."""
    arrays = [decode_png(bytes(data), channels) for data in images]
    if not arrays:
        raise ValueError("decode_pixels got no images")
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise ValueError(f"images in one batch must share a shape, got {sorted(shapes)}")
    return np.stack(arrays)  # (N, H, W, C)


def decode_batch(images: Iterable[bytes], channels: int) -> np.ndarray:
    """A batch of stored PNGs (all the same size) -> float32 (N, C, H, W) in [-1, 1]."""
    return to_model_range(decode_pixels(images, channels))
