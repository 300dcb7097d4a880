"""Tests for the seeded MNIST dataset shifts in training/shifts.py."""

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy import ndimage

from training import shifts as sh
from training.shifts import LABEL_SHIFTS, apply_shift, covariate_shifts, label_shift_indices

FloatArray = npt.NDArray[np.float32]

EXPECTED_NAMES = [
    "shot_noise",
    "impulse_noise",
    "glass_blur",
    "motion_blur",
    "shear",
    "scale",
    "rotate",
    "brightness",
    "translate",
    "stripe",
    "invert",
    "gaussian_noise_small",
    "gaussian_noise_medium",
    "gaussian_noise_large",
]
DETERMINISTIC = {"invert", "brightness"}
W = sh.STRIPE_WIDTH


def _ink(dist: npt.NDArray[np.float64], half_width: float = 1.0) -> FloatArray:
    """Stroke intensity from a distance field: 1 on the stroke, fading to 0 one pixel further out."""
    return np.clip(1.0 + half_width - dist, 0.0, 1.0).astype(np.float32)


def _segment(p0: tuple[float, float], p1: tuple[float, float]) -> npt.NDArray[np.float64]:
    rows, cols = np.indices((28, 28), dtype=np.float64)
    a, b = np.array(p0), np.array(p1)
    t = np.clip(((rows - a[0]) * (b - a)[0] + (cols - a[1]) * (b - a)[1]) / np.sum((b - a) ** 2), 0, 1)
    return np.hypot(rows - (a[0] + t * (b - a)[0]), cols - (a[1] + t * (b - a)[1]))


def _draw_digits() -> FloatArray:
    """Eight digit-like images (1, 7, 4, 0 at two ink levels) with all ink inside rows/cols [7, 21)."""
    rows, cols = np.indices((28, 28), dtype=np.float64)
    one = _ink(_segment((8, 14), (19, 13)))
    seven = np.maximum(_ink(_segment((8, 9), (8, 18))), _ink(_segment((8, 18), (19, 12))))
    four = np.maximum.reduce(
        [_ink(_segment((8, 10), (15, 10))), _ink(_segment((15, 10), (15, 18))), _ink(_segment((9, 16), (19, 16)))]
    )
    zero = _ink(np.abs(np.hypot(rows - 13.5, cols - 13.5) - 4.5))
    base = np.stack([one, seven, four, zero])
    return np.concatenate([base, 0.8 * base]).astype(np.float32)


DIGITS = _draw_digits()


def _centre_of_mass(images: FloatArray) -> npt.NDArray[np.float64]:
    return np.array([ndimage.center_of_mass(img) for img in images])  # (N, 2) row, col


def _mass(images: FloatArray) -> npt.NDArray[np.float64]:
    return images.sum(axis=(1, 2), dtype=np.float64)


def test_synthetic_digits_leave_the_stripe_bands_empty() -> None:
    assert DIGITS.shape == (8, 28, 28)
    assert DIGITS.max() == 1.0
    band = np.zeros((28, 28), dtype=bool)
    band[:W], band[-W:], band[:, :W], band[:, -W:] = True, True, True, True
    assert DIGITS[:, band].max() == 0.0


def test_registry_has_the_expected_shifts_in_order() -> None:
    shifts = covariate_shifts()
    assert list(shifts) == EXPECTED_NAMES
    for name, shift in shifts.items():
        assert shift.name == name
        assert shift.kind == "covariate"
        assert shift.description


@pytest.mark.parametrize("name", EXPECTED_NAMES)
def test_shift_contract(name: str) -> None:
    before = DIGITS.copy()
    out = apply_shift(name, DIGITS, seed=0)
    assert out.shape == DIGITS.shape
    assert out.dtype == np.float32
    assert out.min() >= 0.0
    assert out.max() <= 1.0
    np.testing.assert_array_equal(DIGITS, before)  # input untouched
    assert not np.shares_memory(out, DIGITS)
    assert np.abs(out - DIGITS).max() > 0.1  # every shift visibly changes the batch


@pytest.mark.parametrize("name", EXPECTED_NAMES)
def test_shift_is_seeded(name: str) -> None:
    first = apply_shift(name, DIGITS, seed=1)
    np.testing.assert_array_equal(first, apply_shift(name, DIGITS, seed=1))
    other = apply_shift(name, DIGITS, seed=2)
    if name in DETERMINISTIC:
        np.testing.assert_array_equal(first, other)
    else:
        assert not np.array_equal(first, other)


def test_invert_is_one_minus_x() -> None:
    np.testing.assert_allclose(apply_shift("invert", DIGITS, seed=0), 1.0 - DIGITS)


def test_brightness_adds_a_constant_and_clips() -> None:
    out = apply_shift("brightness", DIGITS, seed=0)
    np.testing.assert_allclose(out, np.clip(DIGITS + sh.BRIGHTNESS_DELTA, 0, 1), atol=1e-6)
    assert out.mean() > DIGITS.mean() + 0.3


def test_gaussian_noise_strengths_are_ordered() -> None:
    change = [
        np.abs(apply_shift(f"gaussian_noise_{level}", DIGITS, seed=0) - DIGITS).mean()
        for level in ("small", "medium", "large")
    ]
    assert 0.0 < change[0] < change[1] < change[2]
    sigmas = sh.GAUSSIAN_NOISE_SIGMAS
    assert sigmas["small"] < sigmas["medium"] < sigmas["large"]


def test_shot_noise_is_quantised_and_keeps_black_black() -> None:
    out = apply_shift("shot_noise", DIGITS, seed=0)
    scaled = out.astype(np.float64) * sh.SHOT_NOISE_PHOTONS
    np.testing.assert_allclose(scaled, np.round(scaled), atol=1e-4)  # multiples of 1/c
    assert np.all(out[DIGITS == 0.0] == 0.0)  # Poisson(0) is always 0
    assert len(np.unique(out)) > 2


def test_impulse_noise_sets_pixels_to_exactly_zero_or_one() -> None:
    grey = np.full((20, 28, 28), 0.5, dtype=np.float32)
    out = apply_shift("impulse_noise", grey, seed=0)
    hit = out != 0.5
    assert set(np.unique(out[hit]).tolist()) == {0.0, 1.0}
    assert hit.mean() == pytest.approx(sh.IMPULSE_AMOUNT, abs=0.02)
    assert (out[hit] == 1.0).mean() == pytest.approx(0.5, abs=0.05)  # salt and pepper in equal parts


def test_glass_blur_blurs_and_shuffles() -> None:
    out = apply_shift("glass_blur", DIGITS, seed=0)
    np.testing.assert_allclose(_mass(out), _mass(DIGITS), rtol=0.1)
    assert out.max() < DIGITS.max()
    sigma = sh.GLASS_BLUR[0]
    plain = ndimage.gaussian_filter(DIGITS, (0, sigma, sigma), mode="nearest")
    plain = ndimage.gaussian_filter(plain, (0, sigma, sigma), mode="nearest")
    assert np.abs(out - plain).max() > 0.05  # the local shuffle did something beyond blurring


def test_motion_blur_smears_ink_over_more_pixels() -> None:
    out = apply_shift("motion_blur", DIGITS, seed=0)
    np.testing.assert_allclose(_mass(out), _mass(DIGITS), rtol=0.05)
    inked = (out > 0.05).sum(axis=(1, 2))
    assert np.all(inked > (DIGITS > 0.05).sum(axis=(1, 2)))


@pytest.mark.parametrize("name", ["shear", "rotate"])
def test_shear_and_rotate_move_ink_but_keep_its_mass(name: str) -> None:
    out = apply_shift(name, DIGITS, seed=0)
    np.testing.assert_allclose(_mass(out), _mass(DIGITS), rtol=0.15)
    strokes = slice(0, 3)  # 1, 7, 4: the ring is rotation invariant
    moved = np.abs(out - DIGITS)[strokes].sum(axis=(1, 2))
    assert np.all(moved > 0.3 * _mass(DIGITS)[strokes])


def test_rotate_turns_about_the_image_centre() -> None:
    out = apply_shift("rotate", DIGITS, seed=0)
    ring = [3, 7]  # a ring centred on (13.5, 13.5) maps onto itself
    assert np.abs(out[ring] - DIGITS[ring]).mean() < 0.02


def test_scale_shrinks_the_digit_about_the_centre() -> None:
    out = apply_shift("scale", DIGITS, seed=0)
    low, high = sh.SCALE_RANGE
    ratio = _mass(out) / _mass(DIGITS)
    assert np.all((ratio > 0.9 * low**2) & (ratio < 1.1 * high**2))  # area scales as factor²

    def spread(images: FloatArray) -> npt.NDArray[np.float64]:
        rows, cols = np.indices((28, 28))
        r2 = (rows - 13.5) ** 2 + (cols - 13.5) ** 2
        return np.sqrt((images * r2).sum(axis=(1, 2)) / _mass(images))

    shrink = spread(out) / spread(DIGITS)
    assert np.all((shrink > 0.9 * low) & (shrink < 1.1 * high))


def test_translate_moves_the_centre_of_mass_by_the_offset() -> None:
    out = apply_shift("translate", DIGITS, seed=0)
    delta = _centre_of_mass(out) - _centre_of_mass(DIGITS)
    np.testing.assert_allclose(np.abs(delta), sh.TRANSLATE_PIXELS, atol=1e-3)
    np.testing.assert_allclose(_mass(out), _mass(DIGITS), rtol=1e-4)


def test_stripe_inverts_the_outer_bands_as_in_mnist_c() -> None:
    images = np.random.default_rng(0).random((64, 28, 28), dtype=np.float32)
    out = apply_shift("stripe", images, seed=0)
    vertical = np.array([np.allclose(o[:, :W], 1 - x[:, :W]) for o, x in zip(out, images, strict=True)])
    assert 0 < vertical.sum() < len(images)  # both orientations occur
    for o, x in zip(np.moveaxis(out[~vertical], 1, 2), np.moveaxis(images[~vertical], 1, 2), strict=True):
        np.testing.assert_allclose(o[:, :W], 1 - x[:, :W])  # horizontal: same thing on rows
    flipped = np.where(vertical[:, None, None], out, np.moveaxis(out, 1, 2))
    unflipped = np.where(vertical[:, None, None], images, np.moveaxis(images, 1, 2))
    np.testing.assert_allclose(flipped[:, :, -W:], 1 - unflipped[:, :, -W:])
    np.testing.assert_array_equal(flipped[:, :, W:-W], unflipped[:, :, W:-W])


def test_stripe_adds_white_bands_to_digits() -> None:
    out = apply_shift("stripe", DIGITS, seed=0)
    for img in out:
        cols_white = np.all(img[:, :W] == 1.0) and np.all(img[:, -W:] == 1.0)
        rows_white = np.all(img[:W] == 1.0) and np.all(img[-W:] == 1.0)
        assert cols_white != rows_white


def test_apply_shift_names_the_valid_choices() -> None:
    with pytest.raises(ValueError, match="valid names") as info:
        apply_shift("fog", DIGITS, seed=0)
    assert all(name in str(info.value) for name in EXPECTED_NAMES)
    with pytest.raises(ValueError, match="label_shift_indices"):
        apply_shift("label_one_class", DIGITS, seed=0)


@pytest.mark.parametrize(
    ("images", "match"),
    [
        (DIGITS.astype(np.float64), "float32"),
        (DIGITS[0], "float32"),
        (DIGITS * 255, "0, 1"),
    ],
)
def test_apply_shift_rejects_bad_images(images: npt.NDArray[np.floating], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        apply_shift("invert", images, seed=0)


@settings(max_examples=25, deadline=None)
@given(
    images=hnp.arrays(
        np.float32,
        st.tuples(st.integers(1, 3), st.just(28), st.just(28)),
        elements=st.floats(0.0, 1.0, width=32),
    ),
    seed=st.integers(0, 2**32 - 1),
)
def test_every_shift_stays_in_the_unit_interval(images: FloatArray, seed: int) -> None:
    for name in EXPECTED_NAMES:
        out = apply_shift(name, images, seed=seed)
        assert out.shape == images.shape
        assert out.dtype == np.float32
        assert out.min() >= 0.0
        assert out.max() <= 1.0


LABELS = np.random.default_rng(0).permutation(np.repeat(np.arange(10), 50))


@pytest.mark.parametrize("name", list(LABEL_SHIFTS))
@pytest.mark.parametrize("n", [30, 300])  # fewer and more than the 50 or 100 available
def test_label_shift_draws_only_the_requested_classes(name: str, n: int) -> None:
    classes = LABEL_SHIFTS[name]
    idx = label_shift_indices(LABELS, classes, n=n, seed=0)
    assert idx.shape == (n,)
    assert set(LABELS[idx].tolist()) == set(classes)
    np.testing.assert_array_equal(idx, label_shift_indices(LABELS, classes, n=n, seed=0))
    assert not np.array_equal(idx, label_shift_indices(LABELS, classes, n=n, seed=1))
    if n <= 50 * len(classes):
        assert len(np.unique(idx)) == n  # no repeats unless the pool is too small


def test_label_shift_presets() -> None:
    assert [len(c) for c in LABEL_SHIFTS.values()] == [1, 2]
    assert all(0 <= k <= 9 for classes in LABEL_SHIFTS.values() for k in classes)


@pytest.mark.parametrize(
    ("classes", "n", "match"),
    [((3,), 0, "n must be > 0"), ((), 10, "at least one class"), ((3, 11), 10, r"\[11\]")],
)
def test_label_shift_rejects_bad_requests(classes: tuple[int, ...], n: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        label_shift_indices(LABELS, classes, n=n, seed=0)
