"""Tests for model/image.py: decoding uploads and MNIST-style preprocessing."""

from __future__ import annotations

import io
import time
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image, ImageOps
from scipy import ndimage

from model.image import (
    MAX_IMAGE_PIXELS_DEFAULT,
    ImageError,
    decode_image,
    mnist_preprocess,
    preprocess_image_bytes,
)
from tests.support import png_claiming

# --- synthetic MNIST-style digits (ink = 1 on black, ink inside a 20x20 box, centred by mass) ---


def _segment_distance(rr: np.ndarray, cc: np.ndarray, p0: tuple[float, float], p1: tuple[float, float]):
    (r0, c0), (r1, c1) = p0, p1
    dr, dc = r1 - r0, c1 - c0
    t = np.clip(((rr - r0) * dr + (cc - c0) * dc) / (dr * dr + dc * dc), 0.0, 1.0)
    return np.hypot(rr - (r0 + t * dr), cc - (c0 + t * dc))


def _render_box(shape: str) -> np.ndarray:
    """A 20x20 antialiased digit (4x supersampled), coordinates in 20-px box units."""
    sub = 4
    grid = (np.arange(20 * sub) + 0.5) / sub
    rr, cc = np.meshgrid(grid, grid, indexing="ij")
    if shape == "seven":
        dist = np.minimum(
            _segment_distance(rr, cc, (1.5, 1.5), (1.5, 18.5)),
            _segment_distance(rr, cc, (1.5, 18.5), (18.5, 7.0)),
        )
        hi = (dist <= 1.5).astype(np.float32)
    else:  # ring, a "0"
        radius = np.hypot(rr - 10.0, cc - 10.0)
        hi = ((radius >= 6.5) & (radius <= 9.5)).astype(np.float32)
    return hi.reshape(20, sub, 20, sub).mean(axis=(1, 3))


def _mnist_digit(shape: str) -> np.ndarray:
    canvas = np.zeros((28, 28), dtype=np.float32)
    canvas[4:24, 4:24] = _render_box(shape)
    com = np.array(ndimage.center_of_mass(canvas))
    shift = np.floor(14.0 - com + 0.5).astype(int)
    return np.roll(canvas, tuple(shift), axis=(0, 1))


def _to_upload_image(digit: np.ndarray, *, size: int = 200, dark_on_light: bool = True) -> Image.Image:
    img = Image.fromarray(np.round(digit * 255).astype(np.uint8))
    img = img.resize((size, size), Image.Resampling.BICUBIC)
    return ImageOps.invert(img) if dark_on_light else img


def _encode(img: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def _aligned_corr(a: np.ndarray, b: np.ndarray) -> float:
    """Best correlation over shifts of at most 1 px: a centre of mass at x.5 may round either way."""
    shifts = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    return max(_corr(np.roll(a, shift, axis=(0, 1)), b) for shift in shifts)


# --- round trip and MNIST conventions ---


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
@pytest.mark.parametrize("shape", ["seven", "ring"])
def test_round_trip_recovers_mnist_digit(fmt: str, shape: str) -> None:
    original = _mnist_digit(shape)
    data = _encode(_to_upload_image(original), fmt)

    out = preprocess_image_bytes(data)

    assert out.shape == (28, 28)
    assert out.dtype == np.float32
    assert out.min() >= 0.0
    assert out.max() == pytest.approx(1.0)
    assert _aligned_corr(out, original) > 0.9
    com = np.array(ndimage.center_of_mass(out))
    np.testing.assert_allclose(com, (14.0, 14.0), atol=1.0)
    np.testing.assert_array_equal(preprocess_image_bytes(data), out)  # deterministic


def test_light_background_is_inverted_and_dark_is_not() -> None:
    digit = _mnist_digit("seven")
    from_light = mnist_preprocess(1.0 - digit)
    from_dark = mnist_preprocess(digit)

    for out in (from_light, from_dark):
        assert _corr(out, digit) > 0.95  # an un-inverted light page would anticorrelate
        assert out[0, 0] == 0.0
        assert out[-1, -1] == 0.0
    np.testing.assert_allclose(from_light, from_dark, atol=1e-5)


def test_grey_paper_and_faint_ink_are_normalised() -> None:
    digit = _mnist_digit("ring")
    photo = 0.8 - 0.3 * digit  # grey paper, faint grey pencil
    out = mnist_preprocess(photo)
    assert out.max() == pytest.approx(1.0)
    assert out[0, 0] == 0.0
    assert _aligned_corr(out, digit) > 0.95


def test_aspect_ratio_is_kept() -> None:
    page = np.ones((100, 100), dtype=np.float32)
    page[10:90, 45:55] = 0.0  # a tall thin dark stroke, 80 x 10

    out = mnist_preprocess(page)

    rows = np.flatnonzero((out > 0).any(axis=1))
    cols = np.flatnonzero((out > 0).any(axis=0))
    assert rows[-1] - rows[0] + 1 == 20
    assert cols[-1] - cols[0] + 1 <= 5


# --- decoding formats and modes ---


def test_gif_uses_first_frame_only() -> None:
    frame0 = _to_upload_image(_mnist_digit("seven"), size=100)
    frame1 = _to_upload_image(_mnist_digit("ring"), size=100)
    gif = _encode(frame0, "GIF", save_all=True, append_images=[frame1])
    with Image.open(io.BytesIO(gif)) as check:
        assert getattr(check, "n_frames", 1) == 2

    out = preprocess_image_bytes(gif)

    expected0 = preprocess_image_bytes(_encode(frame0, "PNG"))
    expected1 = preprocess_image_bytes(_encode(frame1, "PNG"))
    assert _corr(out, expected0) > 0.99
    assert _corr(out, expected1) < 0.8


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_transparent_background_is_composited_on_white(mode: str) -> None:
    ink = np.asarray(_to_upload_image(_mnist_digit("seven"), size=64, dark_on_light=False))
    # Black everywhere; only the alpha channel carries the digit. Ignoring alpha gives a black page.
    img = Image.new(mode, (64, 64), 0)
    img.putalpha(Image.fromarray(ink))

    gray = decode_image(_encode(img, "PNG"))

    np.testing.assert_allclose(gray, 1.0 - ink / 255.0, atol=1.5 / 255)
    assert _corr(preprocess_image_bytes(_encode(img, "PNG")), _mnist_digit("seven")) > 0.9


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [("L", "PNG"), ("P", "PNG"), ("RGB", "BMP"), ("L", "BMP"), ("P", "GIF"), ("CMYK", "JPEG"), ("L", "JPEG")],
)
def test_modes_decode_to_the_same_grayscale(mode: str, fmt: str) -> None:
    base = _to_upload_image(_mnist_digit("ring"), size=64)
    data = _encode(base.convert(mode), fmt)
    with Image.open(io.BytesIO(data)) as check:
        assert check.mode == mode  # the file really is in the mode under test

    gray = decode_image(data)

    assert gray.dtype == np.float32
    assert gray.shape == (64, 64)
    tolerance = 0.06 if fmt == "JPEG" else 1.5 / 255
    assert np.abs(gray - np.asarray(base) / 255.0).mean() < tolerance


def test_16_bit_png_keeps_full_range() -> None:
    values = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)
    data = _encode(Image.fromarray(values), "PNG")
    with Image.open(io.BytesIO(data)) as check:
        assert check.mode == "I;16"

    gray = decode_image(data)

    np.testing.assert_allclose(gray, values / 65535.0, atol=1e-6)


def test_exif_orientation_is_applied() -> None:
    page = Image.new("L", (80, 30), 255)  # stored landscape
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": the upright image is portrait
    gray = decode_image(_encode(page, "PNG", exif=exif.tobytes()))
    assert gray.shape == (80, 30)


# --- guards ---


def test_empty_bytes_are_refused() -> None:
    with pytest.raises(ImageError, match="empty upload"):
        decode_image(b"")


def test_random_bytes_are_not_an_image() -> None:
    data = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    with pytest.raises(ImageError, match="not a recognised image: expected PNG, JPEG, BMP or GIF"):
        decode_image(b"x" + data)


def test_corrupt_png_header_is_named() -> None:
    with pytest.raises(ImageError, match="corrupt PNG image"):
        decode_image(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "BMP"])
def test_truncated_file_is_refused(fmt: str) -> None:
    data = _encode(_to_upload_image(_mnist_digit("seven")), fmt)
    with pytest.raises(ImageError, match=f"corrupt or truncated {fmt} image"):
        decode_image(data[: len(data) // 2])


def test_decompression_bomb_header_is_refused_quickly() -> None:
    bomb = png_claiming(100_000, 100_000)  # 10 G pixels; the file is ~100 bytes
    start = time.perf_counter()
    with pytest.raises(ImageError, match="too large"):
        decode_image(bomb)
    assert time.perf_counter() - start < 2.0


def test_pixel_limit_is_checked_before_decoding() -> None:
    # The IDAT holds far fewer than 3000x3000 pixels, so decoding would report truncation;
    # "too large" therefore proves the check ran on the header alone.
    data = png_claiming(3000, 3000)
    with pytest.raises(ImageError, match=r"too large: 3000x3000 = 9000000 pixels, the limit is 4000000"):
        decode_image(data)
    with pytest.raises(ImageError, match="too large"):
        decode_image(_encode(Image.new("L", (50, 50), 255), "PNG"), max_pixels=2499)
    assert decode_image(_encode(Image.new("L", (50, 50), 255), "PNG"), max_pixels=2500).shape == (50, 50)
    assert MAX_IMAGE_PIXELS_DEFAULT == 4_000_000


def test_pil_bomb_warning_is_an_error_even_when_warnings_are_ignored() -> None:
    # 100 M pixels is between PIL's warning and error limits; max_pixels allows it, so only PIL's
    # DecompressionBombWarning stands in the way. With warnings ignored globally, decoding would
    # otherwise go on and fail as "truncated".
    data = png_claiming(10_000, 10_000)
    filters_before = list(warnings.filters)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ImageError, match=f"too large: more than {Image.MAX_IMAGE_PIXELS} pixels"):
            decode_image(data, max_pixels=10**9)
    assert warnings.filters == filters_before


@pytest.mark.parametrize(("fmt", "name"), [("TIFF", "TIFF"), ("WEBP", "WebP")])
def test_unsupported_format_is_named(fmt: str, name: str) -> None:
    data = _encode(Image.new("L", (16, 16), 255), fmt)
    with pytest.raises(ImageError, match=f"unsupported image format {name}: use PNG, JPEG, BMP or GIF"):
        decode_image(data)


def test_blank_image_has_no_ink() -> None:
    with pytest.raises(ImageError, match=r"image contains no ink \(blank\)"):
        preprocess_image_bytes(_encode(Image.new("RGB", (64, 64), (255, 255, 255)), "PNG"))


def test_bad_max_pixels_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="max_pixels must be > 0") as info:
        decode_image(b"x", max_pixels=0)
    assert not isinstance(info.value, ImageError)


@pytest.mark.parametrize(
    ("gray", "message"),
    [
        (np.zeros((4, 4, 3), dtype=np.float32), "expected a 2-D grayscale image"),
        (np.zeros((0, 5), dtype=np.float32), "no pixels"),
        (np.full((4, 4), np.nan, dtype=np.float32), "non-finite"),
        (np.full((4, 4), 255.0, dtype=np.float32), r"must lie in \[0, 1\]"),
    ],
)
def test_preprocess_rejects_bad_arrays(gray: np.ndarray, message: str) -> None:
    with pytest.raises(ImageError, match=message):
        mnist_preprocess(gray)


# --- property ---


@st.composite
def _gray_with_ink(draw: st.DrawFn) -> np.ndarray:
    height, width = draw(st.integers(1, 64)), draw(st.integers(1, 64))
    values = st.floats(0.0, 1.0, width=32)
    arr = draw(hnp.arrays(np.float32, (height, width), elements=values))
    r0, c0 = draw(st.integers(0, height - 1)), draw(st.integers(0, width - 1))
    r1, c1 = draw(st.integers(r0 + 1, height)), draw(st.integers(c0 + 1, width))
    arr[r0:r1, c0:c1] = draw(st.sampled_from([0.0, 1.0]))
    return arr


@settings(max_examples=50, deadline=None, database=None)
@given(_gray_with_ink())
def test_preprocess_output_is_always_valid_or_image_error(gray: np.ndarray) -> None:
    try:
        out = mnist_preprocess(gray)
    except ImageError:
        return
    assert out.shape == (28, 28)
    assert out.dtype == np.float32
    assert np.isfinite(out).all()
    assert out.min() >= 0.0
    assert out.max() <= 1.0


def test_import_leaves_pil_globals_alone() -> None:
    from PIL import ImageFile

    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    assert Image.MAX_IMAGE_PIXELS == 1024 * 1024 * 1024 // 4 // 3  # PIL's own default
