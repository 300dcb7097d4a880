"""Image upload: MNIST digits drawn dark-on-white at 200×200 are read like their originals."""

from __future__ import annotations

import io
import zlib
from pathlib import Path

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


def gzip_bomb(prefix: bytes, inflated: int) -> bytes:
    """`prefix` then zeros up to `inflated` bytes, gzip-compressed without ever holding them uncompressed."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    zeros = bytes(1 << 20)
    out = [packer.compress(prefix)]
    for _ in range((inflated - len(prefix)) // len(zeros)):
        out.append(packer.compress(zeros))
    out.append(packer.flush())
    return b"".join(out)


def test_an_amplified_upload_is_refused_and_costs_the_server_little_memory(server: ServerProcess) -> None:
    """About 1 MiB of gzip that inflates to 1 GiB of multipart body: 413 at the upload limit (32 MiB by default),
    found while decompressing, and the server process's peak memory stays small."""
    boundary = "bomb"
    part = f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="x.png"\r\nContent-Type: image/png\r\n\r\n'
    body = gzip_bomb(part.encode(), 1 << 30)
    assert len(body) < 2 << 20
    r = httpx.post(
        f"{server.url}/v1/predict/image", content=body, timeout=60,
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}", "Content-Encoding": "gzip"},
    )  # fmt: skip
    assert r.status_code == 413 and "once decompressed" in r.json()["error"], r.text
    assert server.proc is not None
    status = Path(f"/proc/{server.proc.pid}/status").read_text()
    peak_mb = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) / 1024
    assert peak_mb < 256, f"the server process peaked at {peak_mb:.0f} MB"
    assert httpx.get(f"{server.url}/readyz").status_code == 200
