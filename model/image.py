"""Decode uploaded image bytes and turn them into 28x28 MNIST-style model input."""

from __future__ import annotations

import io
import math
import struct
import warnings
import zlib

import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "MAX_IMAGE_PIXELS_DEFAULT",
    "ImageError",
    "decode_image",
    "mnist_preprocess",
    "preprocess_image_bytes",
]

MAX_IMAGE_PIXELS_DEFAULT = 4_000_000

_ALLOWED_FORMATS = ("PNG", "JPEG", "BMP", "GIF")
_ALLOWED_TEXT = "PNG, JPEG, BMP or GIF"
_ALLOWED_MAGIC = {
    b"\x89PNG\r\n\x1a\n": "PNG",
    b"\xff\xd8\xff": "JPEG",
    b"GIF87a": "GIF",
    b"GIF89a": "GIF",
    b"BM": "BMP",
}
_UNSUPPORTED_MAGIC = {
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
    b"8BPS": "PSD",
    b"\xff\x4f\xff\x51": "JPEG 2000",
    b"\x00\x00\x00\x0cjP  ": "JPEG 2000",
    b"qoif": "QOI",
}
# Everything PIL may raise while parsing or decoding a malformed file.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error, zlib.error)

_SIZE = 28  # MNIST canvas side, pixels
_BOX = 20  # the digit is scaled to fit a _BOX x _BOX square, as in LeCun's MNIST
_CENTRE = 14.0  # where the centre of mass is placed, (row, col) index coordinates
# The strongest ink must stand at least this far (of full contrast) from the background,
# or the image counts as blank: JPEG noise and paper texture stay well below it.
_MIN_INK_CONTRAST = 0.2
# The bounding box keeps antialiased stroke edges down to this fraction of the strongest ink;
# a higher cut would trim the faint outer rows and enlarge the digit.
_EDGE_THRESHOLD = 0.1


class ImageError(ValueError):
    """An upload that cannot be turned into model input; the message is safe to show to a client."""


def _sniff(data: bytes) -> tuple[str | None, str | None]:
    """Guess (allowed format, unsupported format) from the magic bytes, for error messages only."""
    allowed = next((fmt for magic, fmt in _ALLOWED_MAGIC.items() if data.startswith(magic)), None)
    unsupported = next((fmt for magic, fmt in _UNSUPPORTED_MAGIC.items() if data.startswith(magic)), None)
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        unsupported = "WebP"
    elif data[4:8] == b"ftyp" and data[8:12] in (b"avif", b"avis", b"heic", b"heix", b"mif1", b"msf1"):
        unsupported = "HEIF/AVIF"
    return allowed, unsupported


def _to_gray(img: Image.Image) -> NDArray[np.float32]:
    """Any PIL mode -> float32 (H, W) luminance in [0, 1]; transparency is composited on white."""
    if img.mode.startswith("I"):  # 16-bit greyscale ("I;16", "I;16B", ...) or 32-bit "I"
        arr = np.asarray(img, dtype=np.float32) / 65535.0
        return np.clip(arr, 0.0, 1.0, out=arr)
    if img.mode == "F":
        return np.clip(np.asarray(img, dtype=np.float32), 0.0, 1.0)
    if img.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        img = img.convert("RGB")
    if "A" in img.mode or "a" in img.mode or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    gray = img.convert("L")
    return np.asarray(gray, dtype=np.float32) / 255.0


def decode_image(data: bytes, *, max_pixels: int = MAX_IMAGE_PIXELS_DEFAULT) -> NDArray[np.float32]:
    """Decode PNG/JPEG/BMP/GIF bytes (GIF: first frame) to float32 (H, W) grayscale, 1 = white.

    Raises ImageError for empty, unrecognised, unsupported, corrupt, truncated or oversized input.
    The pixel limit is checked from the header before any pixel data is decoded. PIL's own global
    ``Image.MAX_IMAGE_PIXELS`` still applies on top of ``max_pixels``; this module never changes it.

    >>> gray = decode_image(open("digit.png", "rb").read())  # doctest: +SKIP
    >>> gray.shape, gray.dtype  # doctest: +SKIP
    ((200, 200), dtype('float32'))
    """
    if max_pixels <= 0:
        raise ValueError("max_pixels must be > 0")
    if not data:
        raise ImageError("empty upload: no image bytes received")
    allowed, unsupported = _sniff(data)
    fmt = allowed or "image"
    try:
        # PIL warns (not raises) between 1x and 2x its own limit. Turn that warning into an error
        # here only; catch_warnings restores the filters on exit. The filter list is process-wide,
        # so concurrent decodes could at worst leave this one "error" filter installed.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=_ALLOWED_FORMATS) as img:
                fmt = img.format or fmt
                width, height = img.size
                if width * height > max_pixels:  # from the header alone: nothing decoded yet
                    raise ImageError(
                        f"image is too large: {width}x{height} = {width * height} pixels, "
                        f"the limit is {max_pixels} pixels"
                    )
                if width == 0 or height == 0:
                    raise ImageError(f"image has no pixels ({width}x{height})")
                img.load()  # full decode of frame 0, so truncation is detected here
                # Phone photos store rotation in EXIF; a sideways digit would be misread.
                upright = ImageOps.exif_transpose(img)
                return _to_gray(upright)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        pil_limit = Image.MAX_IMAGE_PIXELS or max_pixels
        raise ImageError(f"image is too large: more than {min(max_pixels, pil_limit)} pixels") from None
    except UnidentifiedImageError:
        if allowed is not None:
            raise ImageError(f"corrupt {allowed} image: the header could not be read") from None
        if unsupported is not None:
            raise ImageError(f"unsupported image format {unsupported}: use {_ALLOWED_TEXT}") from None
        raise ImageError(f"not a recognised image: expected {_ALLOWED_TEXT}") from None
    except _DECODE_ERRORS:
        raise ImageError(f"corrupt or truncated {fmt} image: it could not be decoded") from None


def _validate_gray(gray: np.ndarray) -> NDArray[np.float32]:
    if gray.ndim != 2:
        raise ImageError(f"expected a 2-D grayscale image, got shape {gray.shape}")
    if gray.size == 0:
        raise ImageError("image has no pixels")
    arr = np.asarray(gray, dtype=np.float32)
    if not np.isfinite(arr).all():
        raise ImageError("image contains non-finite values")
    if arr.min() < 0.0 or arr.max() > 1.0:
        raise ImageError("grayscale values must lie in [0, 1]")
    return arr


def _border_median(arr: NDArray[np.float32]) -> float:
    border = np.concatenate([arr[0, :], arr[-1, :], arr[:, 0], arr[:, -1]])
    return float(np.median(border))


def _centre_of_mass(patch: NDArray[np.float32]) -> tuple[float, float]:
    total = float(patch.sum())
    rows = np.arange(patch.shape[0], dtype=np.float64)
    cols = np.arange(patch.shape[1], dtype=np.float64)
    return float(patch.sum(axis=1) @ rows) / total, float(patch.sum(axis=0) @ cols) / total


def _paste_offset(com: float, extent: int) -> int:
    """Top/left offset that puts ``com`` at _CENTRE, rounded half up, clipped inside the canvas."""
    offset = math.floor(_CENTRE - com + 0.5)
    return min(max(offset, 0), _SIZE - extent)


def mnist_preprocess(gray: np.ndarray) -> NDArray[np.float32]:
    """Float (H, W) grayscale in [0, 1] -> float32 (28, 28) in [0, 1] with ink = 1, like LeCun's MNIST.

    Inverts light backgrounds, crops to the ink, scales it to fit 20x20 keeping the aspect ratio,
    stretches the contrast so the strongest ink is 1.0, and pastes it into a black 28x28 canvas
    with its centre of mass at (14, 14). Raises ImageError for a blank image.

    >>> digit = mnist_preprocess(decode_image(png_bytes))  # doctest: +SKIP
    >>> digit.shape, float(digit.max())  # doctest: +SKIP
    ((28, 28), 1.0)
    """
    arr = _validate_gray(gray)
    if _border_median(arr) > 0.5:  # dark ink on light paper: MNIST wants white ink on black
        arr = 1.0 - arr
    background = _border_median(arr)  # <= 0.5 after the inversion above
    arr = np.clip((arr - background) / (1.0 - background), 0.0, 1.0)

    peak = float(arr.max())
    if peak <= _MIN_INK_CONTRAST:
        raise ImageError("image contains no ink (blank)")
    arr = arr / peak  # MNIST strokes saturate: the strongest ink becomes 1.0

    ink = arr > _EDGE_THRESHOLD
    rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    crop = np.ascontiguousarray(arr[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1], dtype=np.float32)

    height, width = crop.shape
    scale = _BOX / max(height, width)
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    resized = Image.fromarray(crop).resize((new_w, new_h), Image.Resampling.LANCZOS)  # mode "F"
    patch = np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)  # LANCZOS rings past [0, 1]
    if patch.max() <= 0.0:
        raise ImageError("image contains no ink (blank)")
    patch /= patch.max()

    com_row, com_col = _centre_of_mass(patch)
    top, left = _paste_offset(com_row, new_h), _paste_offset(com_col, new_w)
    canvas = np.zeros((_SIZE, _SIZE), dtype=np.float32)
    canvas[top : top + new_h, left : left + new_w] = patch
    return canvas


def preprocess_image_bytes(data: bytes, *, max_pixels: int = MAX_IMAGE_PIXELS_DEFAULT) -> NDArray[np.float32]:
    """Uploaded image bytes -> float32 (28, 28) MNIST-style input in [0, 1]; raises ImageError."""
    return mnist_preprocess(decode_image(data, max_pixels=max_pixels))
