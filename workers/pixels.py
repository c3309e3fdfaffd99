"""Pixels: image bytes <-> arrays <-> model batches, for every stage that touches images.

Conventions, in one place:

- a stored image is a PNG of ``uint8`` pixels, mode ``L`` (1 channel) or ``RGB`` (3 channels);
- an array image is ``(H, W, C)`` uint8; a model batch is ``(N, C, H, W)`` float32 in [-1, 1]:

      x = u / 127.5 - 1          u = round((x + 1) * 127.5), clipped to 0..255

  :func:`to_model_range` / :func:`from_model_range` convert numpy arrays, and
  :func:`tensor_to_model_range` / :func:`tensor_to_uint8` torch tensors, by those two formulas.
"""

from __future__ import annotations

import io
from typing import Iterable

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

MODES = {1: "L", 3: "RGB"}

# Errors a broken or foreign file raises while PIL opens or decodes it. Anything else is a bug.
DECODE_ERRORS = (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def mode_for(channels: int) -> str:
    if channels not in MODES:
        raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")
    return MODES[channels]


def open_image(data: bytes) -> Image.Image:
    """Decode encoded bytes (PNG, JPEG, ...) fully, so truncated files fail here, not later."""
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def to_mode(image: Image.Image, channels: int) -> Image.Image:
    """Convert to ``L`` or ``RGB``; transparent pixels are composed over white first."""
    mode = mode_for(channels)
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
