"""Overload of a real server: excess load is shed with 503 + Retry-After or 504, memory stays flat, and it recovers."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bench.serve_bench import rss_mb
from service.serving.heap_trim import TRIM_INTERVAL
from tests.support import ServerProcess, metric

pytestmark = pytest.mark.integration

IMAGES_PER_REQUEST = 32


async def burst(url: str, body: bytes, requests: int) -> tuple[Counter[int], list[httpx.Response], list[str]]:
    """`requests` POSTs at once, each on its own connection; returns statuses, the non-200 answers, transport errors."""
    limits = httpx.Limits(max_connections=requests, max_keepalive_connections=requests)
    statuses: Counter[int] = Counter()
    refused: list[httpx.Response] = []
    errors: list[str] = []
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:

        async def one() -> None:
            try:
                r = await client.post("/v1/predict", content=body, headers={"Content-Type": "application/json"})
            except httpx.HTTPError as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                return
            statuses[r.status_code] += 1
            if r.status_code != 200:
                refused.append(r)

        await asyncio.wait_for(asyncio.gather(*(one() for _ in range(requests))), timeout=120)
    return statuses, refused, errors


def no_500(page: str) -> bool:
    """No request was ever answered with a 500 (the metrics count every answer by status)."""
    codes = {
        sample.labels["status"]
        for family in text_string_to_metric_families(page)
        for sample in family.samples
        if sample.name == "bnserve_http_requests_total"
    }
    return "500" not in codes and "200" in codes


def single_request_ok(url: str, image: np.ndarray) -> None:
    r = httpx.post(f"{url}/v1/predict", json={"instances": [image.reshape(-1).tolist()]}, timeout=10)
    assert r.status_code == 200, r.text


@pytest.mark.slow
async def test_overload_is_shed_with_503_bounded_memory_and_recovery(
    tiny_artifact_dir: Path, test_images: tuple[np.ndarray, np.ndarray]
) -> None:
    images, _ = test_images
    body = orjson.dumps({"instances": images[:IMAGES_PER_REQUEST].reshape(IMAGES_PER_REQUEST, -1).tolist()})
    settings = {"max_queue_images": 64, "max_batch_size": 8, "max_instances": 32, "torch_threads": 1}
    with ServerProcess(tiny_artifact_dir, access_log="false", **settings) as srv:
        assert srv.proc is not None
        await burst(srv.url, body, 50)  # warm-up: lazy allocations happen before the baseline
        rss_start = rss_mb(srv.proc.pid)
        before = httpx.get(f"{srv.url}/metrics").text
        total: Counter[int] = Counter()
        rss_after_round = []
        for _ in range(3):
            statuses, refused, errors = await burst(srv.url, body, 300)
            assert not errors, f"connections failed under overload: {errors[:5]}\n{srv.logs()[-3000:]}"
            total += statuses
            await asyncio.sleep(2 * TRIM_INTERVAL)  # what the server keeps, once it has given back what it freed
            rss_after_round.append(rss_mb(srv.proc.pid))
            for r in refused:
                assert r.status_code == 503, f"{r.status_code}: {r.text}\n{srv.logs()[-3000:]}"
                assert r.json()["code"] == "overloaded" and "queue is full" in r.json()["error"]
                assert int(r.headers["Retry-After"]) >= 1
            single_request_ok(srv.url, images[0])  # recovers as soon as the load drops
        after = httpx.get(f"{srv.url}/metrics").text
        logs = srv.logs()
    assert set(total) == {200, 503}, dict(total)
    assert total[503] > total[200], f"the load must be far beyond capacity: {dict(total)}"
    rejected = metric(after, "bnserve_rejections_total", reason="queue_full") - metric(
        before, "bnserve_rejections_total", reason="queue_full"
    )
    assert rejected == total[503]
    route = {"route": "/v1/predict", "method": "POST"}
    served_503 = metric(after, "bnserve_http_requests_total", **route, status="503") - metric(
        before, "bnserve_http_requests_total", **route, status="503"
    )
    assert served_503 == total[503]
    assert no_500(after)
    assert metric(after, "bnserve_batch_queue_images") == 0
    growth = max(rss_after_round) - rss_start
    assert growth < 100, f"RSS grew {growth:.0f} MB: {rss_start:.0f} → {rss_after_round}"
    assert rss_after_round[-1] - rss_after_round[0] < 30, f"RSS keeps growing per burst: {rss_after_round}"
    assert "Traceback" not in logs, logs[-3000:]


async def test_deadline_gives_504_never_500_and_recovers(
    tiny_artifact_dir: Path, test_images: tuple[np.ndarray, np.ndarray]
) -> None:
    images, _ = test_images
    body = orjson.dumps({"instances": images[:IMAGES_PER_REQUEST].reshape(IMAGES_PER_REQUEST, -1).tolist()})
    settings = {"request_timeout": 0.1, "max_queue_images": 8192, "max_batch_size": 8, "torch_threads": 1}
    with ServerProcess(tiny_artifact_dir, access_log="false", **settings) as srv:
        before = httpx.get(f"{srv.url}/metrics").text
        statuses, late, errors = await burst(srv.url, body, 200)
        assert not errors, f"{errors[:5]}\n{srv.logs()[-3000:]}"
        for r in late:
            assert r.status_code == 504, f"{r.status_code}: {r.text}\n{srv.logs()[-3000:]}"
            assert r.json()["code"] == "deadline_exceeded" and "no result within 0.1 s" in r.json()["error"]
        for _ in range(5):
            single_request_ok(srv.url, images[0])
        after = httpx.get(f"{srv.url}/metrics").text
        logs = srv.logs()
    assert statuses[504] > 0, dict(statuses)
    assert set(statuses) <= {200, 504}, dict(statuses)
    rejected = metric(after, "bnserve_rejections_total", reason="deadline") - metric(
        before, "bnserve_rejections_total", reason="deadline"
    )
    assert rejected == statuses[504]
    assert no_500(after)
    assert metric(after, "bnserve_batch_queue_images") == 0
    assert "Traceback" not in logs, logs[-3000:]
