"""The drift sampling rule behind a real server: light traffic is monitored in full; saturating traffic is sampled,
and every image is counted one way or the other."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from tests.support import ServerProcess, metric

pytestmark = pytest.mark.integration


def test_saturating_load_is_sampled_and_every_image_is_counted(tiny_artifact_dir: Path, test_images) -> None:  # type: ignore[no-untyped-def]
    body = {"instances": test_images[0][:4].reshape(4, -1).tolist()}

    async def load(url: str, clients: int, requests: int, pause: float = 0.0) -> list[int]:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:

            async def one_client() -> list[int]:
                statuses = []
                for _ in range(requests):
                    statuses.append((await client.post("/v1/predict", json=body)).status_code)
                    await asyncio.sleep(pause)
                return statuses

            return [s for statuses in await asyncio.gather(*(one_client() for _ in range(clients))) for s in statuses]

    with ServerProcess(tiny_artifact_dir, drift_sample=0.05, drift_window=16) as srv:
        # one request every 0.1 s: the worker is idle before each, so each is monitored
        assert asyncio.run(load(srv.url, clients=1, requests=20, pause=0.1)) == [200] * 20
        light = httpx.get(f"{srv.url}/v1/drift").json()
        assert (light["images_seen"], light["images_unmonitored"]) == (80, 0), "light traffic: every image monitored"

        assert asyncio.run(load(srv.url, clients=16, requests=50)) == [200] * 800
        report = httpx.get(f"{srv.url}/v1/drift").json()
        assert report["images_unmonitored"] > 0, "16 clients back to back: the worker is busy, 5 % are monitored"
        assert report["images_seen"] + report["images_unmonitored"] == 80 + 3200
        assert report["status"] in ("ok", "drift"), "the window still fills, from the monitored batches"
        text = httpx.get(f"{srv.url}/metrics").text
        assert metric(text, "bnserve_drift_images_total", monitored="false") == report["images_unmonitored"]
        assert metric(text, "bnserve_drift_images_total", monitored="true") == report["images_seen"]
