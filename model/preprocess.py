"""Input normalisation and validation of pixel arrays, shared by training and serving."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # the serving process imports this module and must not import torch
    import torch

IMAGE_SIDE = 28
IMAGE_PIXELS = IMAGE_SIDE * IMAGE_SIDE

# Mean and std of the MNIST training pixels on the [0, 1] scale (the classic constants).
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081


class PixelError(ValueError):
    """A client-facing problem with pixel input; `loc` says where, e.g. ("instances", 3)."""

    def __init__(self, message: str, loc: tuple[str | int, ...] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.loc = loc


@dataclass(frozen=True)
class Normalization:
    """Per-pixel affine normalisation applied before the network: (x - mean) / std, with x in [0, 1]."""

    mean: float = MNIST_MEAN
    std: float = MNIST_STD

    def __post_init__(self) -> None:
        if not np.isfinite(self.mean) or not np.isfinite(self.std) or self.std <= 0:
            raise ValueError(f"normalisation needs finite mean and std > 0, got {self.mean}, {self.std}")

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, 28, 28) pixels in [0, 1] → the network's input scale."""
        return (x - self.mean) / self.std


def to_image_batch(pixels: np.ndarray, *, field: str = "instances") -> np.ndarray:
    """Validate pixels shaped (N, 784) or (N, 28, 28) in [0, 1]; return (N, 1, 28, 28) float32.

    Raises PixelError naming the first offending instance. Values are checked for finiteness and range
    on the whole array at once, so a valid batch costs two vectorised passes.
    """
    flat = pixels.ndim == 2 and pixels.shape[1] == IMAGE_PIXELS
    if flat or (pixels.ndim == 3 and pixels.shape[1:] == (IMAGE_SIDE, IMAGE_SIDE)):
        batch = pixels.reshape(-1, 1, IMAGE_SIDE, IMAGE_SIDE)
    elif pixels.ndim == 4 and pixels.shape[1:] == (1, IMAGE_SIDE, IMAGE_SIDE):
        batch = pixels
    else:
        shape = "×".join(str(s) for s in pixels.shape[1:]) or "a scalar"
        raise PixelError(
            f"each instance must be {IMAGE_PIXELS} numbers or {IMAGE_SIDE}×{IMAGE_SIDE} nested lists, got {shape}",
            (field, 0),
        )
    if batch.shape[0] == 0:
        raise PixelError("at least one instance is required", (field,))
    flat = batch.reshape(batch.shape[0], -1)  # checked in the caller's dtype: 1e300 is out of range, not Infinity
    if flat.size and flat.min() >= 0.0 and flat.max() <= 1.0:  # the common case in two passes (NaN fails both)
        return np.ascontiguousarray(batch, dtype=np.float32)
    bad = ~np.isfinite(flat).all(axis=1)
    if bad.any():
        i = int(np.argmax(bad))
        raise PixelError("values must be finite numbers (no NaN or Infinity)", (field, i))
    bad = (flat < 0.0).any(axis=1) | (flat > 1.0).any(axis=1)
    if bad.any():
        i = int(np.argmax(bad))
        j = int(np.argmax((flat[i] < 0.0) | (flat[i] > 1.0)))
        raise PixelError(f"pixel values must be in [0, 1]; found {float(flat[i, j]):g} at pixel {j}", (field, i))
    return np.ascontiguousarray(batch, dtype=np.float32)


def uint8_to_unit(images: np.ndarray) -> np.ndarray:
    """uint8 pixels 0..255 → float32 in [0, 1], shape kept."""
    return images.astype(np.float32) / np.float32(255.0)
