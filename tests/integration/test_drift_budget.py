"""The drift budget behind a real server: one client at a time is always monitored in full; under concurrent load
past the budget some batches go unmonitored, and every image is counted one way or the other."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from tests.support import ServerProcess, metric

pytestmark = pytest.mark.integration


def test_load_past_the_budget_goes_unmonitored_and_every_image_is_counted(tiny_artifact_dir: Path, test_images) -> None:  # type: ignore[no-untyped-def]
    body = {"instances": test_images[0][:4].reshape(4, -1).tolist()}

    async def load(url: str, clients: int, requests: int) -> list[int]:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:

            async def one_client() -> list[int]:
                return [(await client.post("/v1/predict", json=body)).status_code for _ in range(requests)]

            return [s for statuses in await asyncio.gather(*(one_client() for _ in range(clients))) for s in statuses]

    with ServerProcess(tiny_artifact_dir, drift_budget=0.001, drift_window=16) as srv:
        assert asyncio.run(load(srv.url, clients=1, requests=20)) == [200] * 20
        alone = httpx.get(f"{srv.url}/v1/drift").json()
        assert (alone["images_seen"], alone["images_unmonitored"]) == (80, 0), "no load: every image is monitored"

        assert asyncio.run(load(srv.url, clients=16, requests=25)) == [200] * 400
        report = httpx.get(f"{srv.url}/v1/drift").json()
        assert report["images_unmonitored"] > 0, "requests queued behind running batches, and 0.1 % pays for few"
        assert report["images_seen"] + report["images_unmonitored"] == 80 + 1600
        assert report["status"] in ("ok", "drift"), "the window still fills, from the monitored batches"
        text = httpx.get(f"{srv.url}/metrics").text
        assert metric(text, "bnserve_drift_images_total", monitored="false") == report["images_unmonitored"]
        assert metric(text, "bnserve_drift_images_total", monitored="true") == report["images_seen"]
