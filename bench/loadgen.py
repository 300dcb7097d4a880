"""Fallback load generator (when wrk is absent): closed-loop async clients in their own process, JSON to stdout."""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import httpx
import numpy as np


async def run(url: str, body: bytes, connections: int, duration: float) -> dict[str, float]:
    latencies: list[float] = []
    errors = 0
    stop = time.perf_counter() + duration
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    async with httpx.AsyncClient(limits=limits, timeout=10) as client:

        async def worker() -> None:
            nonlocal errors
            while time.perf_counter() < stop:
                t = time.perf_counter()
                try:
                    r = await client.post(url, content=body, headers={"Content-Type": "application/json"})
                    ok = r.status_code == 200
                except httpx.HTTPError:
                    ok = False
                latencies.append(time.perf_counter() - t)
                errors += not ok

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(connections)))
        elapsed = time.perf_counter() - started
    lat = np.array(latencies) * 1000
    return {
        "requests": len(latencies), "rps": len(latencies) / elapsed, "errors": errors,
        "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
    }  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("url")
    p.add_argument("body")
    p.add_argument("--connections", type=int, default=8)
    p.add_argument("--duration", type=float, default=10.0)
    a = p.parse_args()
    with open(a.body, "rb") as f:
        body = f.read()
    print(json.dumps(asyncio.run(run(a.url, body, a.connections, a.duration))))


if __name__ == "__main__":
    main()
