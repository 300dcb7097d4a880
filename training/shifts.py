"""Seeded MNIST dataset shifts for evaluating the BN-statistic drift detector.

Covariate shifts follow MNIST-C (Mu & Gilmer 2019, github.com/google-research/mnist-c) at the
default severity of its corruptions.py; Gaussian noise comes in small/medium/large strengths as in
"Failing Loudly" (Rabanser et al. 2019). Label shifts restrict traffic to one or two classes. Every shift
takes a float32 batch ``(N, 28, 28)`` in [0, 1] and returns a new float32 batch clipped to [0, 1];
all randomness comes from the ``np.random.Generator`` passed in.

Example:
    >>> shifted = apply_shift("rotate", images, seed=0)
    >>> idx = label_shift_indices(labels, LABEL_SHIFTS["label_two_classes"], n=1000, seed=0)
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Literal

import numpy as np
import numpy.typing as npt
from scipy import ndimage

FloatArray = npt.NDArray[np.float32]
ShiftFn = Callable[[FloatArray, np.random.Generator], FloatArray]

# Strengths. "MNIST-C severity k" is the default severity of that corruption in its corruptions.py.
# Noise std on [0, 1]: small is below MNIST-C's mildest level (0.08), medium ~ its severity 3 (0.18),
# large ~ its severity 5 (0.38) and Failing Loudly's large shift (100/255).
GAUSSIAN_NOISE_SIGMAS = {"small": 0.05, "medium": 0.15, "large": 0.40}
SHOT_NOISE_PHOTONS = 3.0  # Poisson rate at x = 1; values become multiples of 1/3 (MNIST-C severity 5)
IMPULSE_AMOUNT = 0.17  # fraction of pixels set to 0 or 1, half each (MNIST-C severity 4)
GLASS_BLUR = (0.7, 1, 2)  # (blur sigma px, max swap distance px, swap rounds) (MNIST-C severity 1)
MOTION_BLUR = (10, 3.0, 45.0)  # (kernel radius px, gaussian sigma px, max |angle| deg) (severity 1)
SHEAR_RADIANS = 0.4  # random sign per image (MNIST-C severity 2)
ROTATE_RADIANS = 0.4  # ~23 degrees, random sign per image (MNIST-C severity 2)
SCALE_RANGE = (0.6, 0.8)  # digit shrink factor, uniform per image around MNIST-C's 0.7
TRANSLATE_PIXELS = 3  # shift per axis with random sign per image (MNIST-C severity 3)
BRIGHTNESS_DELTA = 0.5  # added to HSV value (MNIST-C severity 5)
STRIPE_WIDTH = 7  # inverted outer band width px, as MNIST-C's columns [0, 7) and [21, 28)

LABEL_SHIFTS: dict[str, tuple[int, ...]] = {"label_one_class": (3,), "label_two_classes": (1, 7)}


@dataclass(frozen=True)
class Shift:
    """A named dataset shift; ``apply(images, rng)`` returns a shifted copy (covariate shifts)."""

    name: str
    kind: Literal["covariate", "label"]
    description: str
    apply: ShiftFn


def _finish(images: npt.NDArray[np.floating]) -> FloatArray:
    return np.asarray(np.clip(images, 0.0, 1.0), dtype=np.float32)


def _gather(images: FloatArray, d_row: npt.NDArray[np.integer], d_col: npt.NDArray[np.integer]) -> FloatArray:
    """``images[n, r + d_row, c + d_col]`` with offsets broadcastable to (N, H, W); 0 outside."""
    n, h, w = images.shape
    pad = int(max(np.abs(d_row).max(), np.abs(d_col).max(), 0))
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad)))
    hp, wp = h + 2 * pad, w + 2 * pad
    rows, cols = np.indices((h, w))
    start = (np.arange(n) * hp * wp)[:, None, None] + (rows + pad) * wp + cols + pad  # (N, H, W)
    out: FloatArray = padded.reshape(-1)[start + (d_row.astype(np.intp) * wp + d_col)]
    return out


def _affine(images: FloatArray, matrices: npt.NDArray[np.float64], shifts: npt.NDArray[np.float64]) -> FloatArray:
    """Bilinear warp about the image centre: output p samples input ``M @ (p - c) + c - shift``.

    matrices: (N, 2, 2) in (row, col) order; shifts: (N, 2) pixels the content moves by.
    """
    centre = (np.array(images.shape[1:], dtype=np.float64) - 1) / 2  # 13.5, as in MNIST-C
    out = np.empty_like(images)
    # One C call per image beats a single batched map_coordinates (~0.3 s vs ~1 s for 10k).
    for i in range(images.shape[0]):
        offset = centre - matrices[i] @ centre - shifts[i]
        out[i] = ndimage.affine_transform(images[i], matrices[i], offset, order=1, mode="constant")
    return out


def _signs(rng: np.random.Generator, size: int | tuple[int, ...]) -> npt.NDArray[np.float64]:
    return rng.choice(np.array([-1.0, 1.0]), size=size)


def _gaussian_noise(images: FloatArray, rng: np.random.Generator, *, sigma: float) -> FloatArray:
    return _finish(images + np.float32(sigma) * rng.standard_normal(images.shape, dtype=np.float32))


def _shot_noise(images: FloatArray, rng: np.random.Generator) -> FloatArray:
    return _finish(rng.poisson(images * SHOT_NOISE_PHOTONS) / SHOT_NOISE_PHOTONS)


def _impulse_noise(images: FloatArray, rng: np.random.Generator) -> FloatArray:
    hit = rng.random(images.shape) < IMPULSE_AMOUNT
    salt = rng.random(images.shape) < 0.5
    return _finish(np.where(hit, salt.astype(np.float32), images))


def _glass_blur(images: FloatArray, rng: np.random.Generator) -> FloatArray:
    sigma, delta, rounds = GLASS_BLUR
    blur = partial(ndimage.gaussian_filter, sigma=(0, sigma, sigma), mode="nearest")
    out = blur(images)
    # Vectorised stand-in for MNIST-C's sequential swaps: each pixel, with probability 1/2,
    # takes the value of a neighbour at most `delta` away.
    for _ in range(rounds):
        moved = rng.random(images.shape) < 0.5
        d_row, d_col = rng.integers(-delta, delta + 1, size=(2, *images.shape), dtype=np.int8) * moved
        out = _gather(out, d_row, d_col)
    return _finish(blur(out))


def _motion_blur(images: FloatArray, rng: np.random.Generator) -> FloatArray:
    radius, sigma, max_angle = MOTION_BLUR
    angle = np.deg2rad(rng.uniform(-max_angle, max_angle, size=images.shape[0]))
    taps = np.arange(radius + 1)
    weights = np.exp(-(taps**2) / (2 * sigma**2))
    weights /= weights.sum()
    out = np.zeros_like(images)
    # ImageMagick's one-sided kernel: tap i reads the pixel i steps along the angle, rounded.
    for i, weight in zip(taps, weights, strict=True):
        d_row = np.rint(-i * np.sin(angle)).astype(np.int64)[:, None, None]
        d_col = np.rint(i * np.cos(angle)).astype(np.int64)[:, None, None]
        out += np.float32(weight) * _gather(images, d_row, d_col)
    return _finish(out)


def _shear(images: FloatArray, rng: np.random.Generator) -> FloatArray:
    c = SHEAR_RADIANS * _signs(rng, images.shape[0])
    matrices = np.zeros((images.shape[0], 2, 2))
    matrices[:, 0, 0], matrices[:, 1, 0], matrices[:, 1, 1] = np.cos(c), -np.sin(c), 1.0
    return _finish(_affine(images, matrices, np.zeros((images.shape[0], 2))))


def _rotate(images: FloatArray, rng: np.random.Generator) -> FloatArray:
    c = ROTATE_RADIANS * _signs(rng, images.shape[0])
    cos, sin = np.cos(c), np.sin(c)
    matrices = np.stack([np.stack([cos, sin], -1), np.stack([-sin, cos], -1)], 1)  # (N, 2, 2)
    return _finish(_affine(images, matrices, np.zeros((images.shape[0], 2))))


def _scale(images: FloatArray, rng: np.random.Generator) -> FloatArray:
    low, high = SCALE_RANGE
    factor = rng.uniform(low, high, size=(images.shape[0],))
    matrices = np.eye(2) / factor[:, None, None]
    return _finish(_affine(images, matrices, np.zeros((images.shape[0], 2))))


def _translate(images: FloatArray, rng: np.random.Generator) -> FloatArray:
    shifts = TRANSLATE_PIXELS * _signs(rng, (images.shape[0], 2))
    return _finish(_affine(images, np.broadcast_to(np.eye(2), (images.shape[0], 2, 2)), shifts))


def _brightness(images: FloatArray, rng: np.random.Generator) -> FloatArray:
    # For grey pixels HSV value == intensity and saturation == 0, so MNIST-C's
    # gray->HSV, V += c, ->gray round trip is exactly clip(x + c).
    return _finish(images + np.float32(BRIGHTNESS_DELTA))


def _stripe(images: FloatArray, rng: np.random.Generator) -> FloatArray:
    out = images.copy()
    w = STRIPE_WIDTH
    vertical = rng.random(images.shape[0]) < 0.5
    for band in (slice(0, w), slice(images.shape[-1] - w, None)):
        out[vertical, :, band] = 1.0 - out[vertical, :, band]
        out[~vertical, band, :] = 1.0 - out[~vertical, band, :]
    return _finish(out)


def _invert(images: FloatArray, rng: np.random.Generator) -> FloatArray:
    return _finish(1.0 - images)


_COVARIATE: tuple[tuple[str, ShiftFn, str], ...] = (
    ("shot_noise", _shot_noise, f"Poisson(x*{SHOT_NOISE_PHOTONS:g})/{SHOT_NOISE_PHOTONS:g} photon noise"),
    ("impulse_noise", _impulse_noise, f"salt & pepper on {IMPULSE_AMOUNT:.0%} of pixels"),
    ("glass_blur", _glass_blur, "gaussian blur, local pixel shuffle, gaussian blur"),
    ("motion_blur", _motion_blur, f"one-sided line kernel at a random angle within ±{MOTION_BLUR[2]:g}°"),
    ("shear", _shear, f"horizontal shear by ±{SHEAR_RADIANS} rad about the centre"),
    ("scale", _scale, f"shrink the digit by a factor in {SCALE_RANGE} about the centre"),
    ("rotate", _rotate, f"rotate by ±{ROTATE_RADIANS} rad about the centre"),
    ("brightness", _brightness, f"add {BRIGHTNESS_DELTA} to every pixel (HSV value)"),
    ("translate", _translate, f"move the digit ±{TRANSLATE_PIXELS} px along each axis"),
    ("stripe", _stripe, f"invert the outer {STRIPE_WIDTH}-px bands, vertical or horizontal"),
    ("invert", _invert, "1 - x: white background, black ink"),
    *(
        (f"gaussian_noise_{level}", partial(_gaussian_noise, sigma=sigma), f"additive N(0, {sigma}²) noise")
        for level, sigma in GAUSSIAN_NOISE_SIGMAS.items()
    ),
)


def covariate_shifts() -> dict[str, Shift]:
    """All covariate shifts, in a fixed order, keyed by name."""
    return {name: Shift(name, "covariate", desc, fn) for name, fn, desc in _COVARIATE}


def apply_shift(name: str, images: FloatArray, seed: int) -> FloatArray:
    """Apply the covariate shift ``name`` to a float32 (N, 28, 28) batch in [0, 1], seeded."""
    shifts = covariate_shifts()
    if name not in shifts:
        hint = " (a label shift: use label_shift_indices)" if name in LABEL_SHIFTS else ""
        raise ValueError(f"unknown covariate shift {name!r}{hint}; valid names: {', '.join(shifts)}")
    if images.ndim != 3 or images.dtype != np.float32:
        raise ValueError(f"images must be float32 (N, H, W), got {images.dtype} {images.shape}")
    if images.size and (images.min() < 0.0 or images.max() > 1.0):
        raise ValueError("images must lie in [0, 1]; divide uint8 pixels by 255")
    return shifts[name].apply(images, np.random.default_rng(seed))


def label_shift_indices(
    labels: npt.NDArray[np.integer], classes: Sequence[int], n: int, seed: int
) -> npt.NDArray[np.intp]:
    """Indices of ``n`` samples drawn only from ``classes``, with replacement if there are too few."""
    if n <= 0:
        raise ValueError(f"n must be > 0, got {n}")
    if not classes:
        raise ValueError("classes must name at least one class")
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    missing = sorted(set(classes) - set(np.unique(labels).tolist()))
    if missing:
        raise ValueError(f"classes {missing} do not occur in labels")
    pool = np.flatnonzero(np.isin(labels, classes))
    rng = np.random.default_rng(seed)
    return rng.choice(pool, size=n, replace=n > pool.size)
