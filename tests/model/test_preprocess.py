"""Pixel validation and normalisation."""

import numpy as np
import pytest
import torch

from model.preprocess import Normalization, PixelError, to_image_batch, uint8_to_unit


@pytest.mark.parametrize("shape", [(3, 784), (3, 28, 28), (3, 1, 28, 28)])
def test_accepted_layouts(shape: tuple[int, ...]) -> None:
    x = np.random.default_rng(0).random(shape)
    out = to_image_batch(x)
    assert out.shape == (3, 1, 28, 28) and out.dtype == np.float32
    np.testing.assert_allclose(out.reshape(3, -1), x.reshape(3, -1), rtol=1e-6)


@pytest.mark.parametrize(
    ("x", "message", "loc"),
    [
        (np.zeros((2, 783)), "784 numbers or 28×28", ("instances", 0)),
        (np.zeros((2, 27, 28)), "got 27×28", ("instances", 0)),
        (np.zeros((0, 784)), "at least one", ("instances",)),
        (np.full((2, 784), 0.5) + np.eye(2, 784) * np.nan, "finite", ("instances", 0)),
        (np.concatenate([np.zeros((1, 784)), np.full((1, 784), 1.5)]), "found 1.5 at pixel 0", ("instances", 1)),
        (np.full((1, 784), -0.1), "in \\[0, 1\\]", ("instances", 0)),
    ],
)
def test_bad_pixels_are_named(x: np.ndarray, message: str, loc: tuple[object, ...]) -> None:
    with pytest.raises(PixelError, match=message) as info:
        to_image_batch(x)
    assert info.value.loc == loc


def test_normalization() -> None:
    norm = Normalization(0.5, 0.25)
    assert torch.equal(norm.apply(torch.tensor([0.5, 1.0])), torch.tensor([0.0, 2.0]))
    with pytest.raises(ValueError, match="std > 0"):
        Normalization(0.1, 0.0)
    assert uint8_to_unit(np.array([0, 255], np.uint8)).tolist() == [0.0, 1.0]
