"""Image upload: MNIST digits drawn dark-on-white at 200×200 are read like their originals."""

from __future__ import annotations

import io

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.support import ServerProcess

pytestmark = pytest.mark.integration


def as_photo(image: np.ndarray, fmt: str = "PNG", size: int = 200) -> bytes:
    """An MNIST digit (28×28 in [0, 1], white ink on black) as a dark-on-white size×size image file."""
    pil = Image.fromarray(np.uint8(255 - image * 255), mode="L").resize((size, size), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    pil.convert("RGB").save(buf, format=fmt)
    return buf.getvalue()


def test_upscaled_inverted_digits_agree_with_the_pixel_endpoint(server: ServerProcess, test_images) -> None:  # type: ignore[no-untyped-def]
    images, _ = test_images
    n, per_request = 160, 16
    agree = 0
    for start in range(0, n, per_request):
        batch = images[start : start + per_request]
        pixels = httpx.post(f"{server.url}/v1/predict", json={"instances": batch.tolist()}, timeout=30).json()
        files = [("files", (f"digit{start + i}.png", as_photo(img), "image/png")) for i, img in enumerate(batch)]
        r = httpx.post(f"{server.url}/v1/predict/image", files=files, timeout=30)
        assert r.status_code == 200, r.text
        uploaded = r.json()["predictions"]
        assert [p["filename"] for p in uploaded] == [f"digit{start + i}.png" for i in range(len(batch))]
        agree += sum(a["label"] == b["label"] for a, b in zip(pixels["predictions"], uploaded, strict=True))
    assert agree / n >= 0.95, f"only {agree}/{n} uploads classified like their MNIST originals"


@pytest.mark.parametrize("fmt", ["JPEG", "BMP", "GIF"])
def test_other_formats(server: ServerProcess, test_images, fmt: str) -> None:  # type: ignore[no-untyped-def]
    images, _ = test_images
    pixels = httpx.post(f"{server.url}/v1/predict", json={"instances": images[:4].tolist()}).json()
    files = [("files", (f"d.{fmt.lower()}", as_photo(img, fmt), f"image/{fmt.lower()}")) for img in images[:4]]
    r = httpx.post(f"{server.url}/v1/predict/image", files=files, timeout=30)
    assert r.status_code == 200, r.text
    got = [p["label"] for p in r.json()["predictions"]]
    assert sum(g == p["label"] for g, p in zip(got, pixels["predictions"], strict=True)) >= 3


@pytest.mark.parametrize(
    ("payload", "status", "message"),
    [
        (b"", 422, "empty"),
        (b"this is not an image at all", 422, "not a recognised image"),
        (as_photo(np.zeros((28, 28)))[:200], 422, "corrupt"),
        (as_photo(np.zeros((28, 28))), 422, "no ink"),
    ],
)
def test_bad_uploads_get_clear_4xx(server: ServerProcess, payload: bytes, status: int, message: str) -> None:
    r = httpx.post(f"{server.url}/v1/predict/image", files=[("files", ("x.png", payload, "image/png"))])
    assert r.status_code == status, r.text
    assert message in r.json()["error"] and r.json()["loc"] == ["files", 0]


def test_upload_limits(server: ServerProcess) -> None:
    blank = as_photo(np.eye(28), size=32)
    r = httpx.post(f"{server.url}/v1/predict/image", files=[("files", ("x.png", blank, "image/png"))] * 17)
    assert r.status_code == 400, r.text
    assert "Too many files" in r.json()["error"] and "16" in r.json()["error"]
    r = httpx.post(f"{server.url}/v1/predict/image", data={"other": "1"})
    assert r.status_code in (415, 422) and "files" in r.json()["error"]
    r = httpx.post(f"{server.url}/v1/predict/image", content=b"{}", headers={"Content-Type": "application/json"})
    assert r.status_code == 415
