"""Soak benchmark: many mixed requests against one bnserve process, with its memory (RSS) sampled every second.

    python -m bench.soak [--artifact artifacts/mnist-bn] [--requests 100000] [--concurrency 32] [--out bench/results]

The server is started here on a free loopback port with its default settings (drift monitoring on) and a read
timeout of STALL_TIMEOUT s. The mix, drawn with a fixed seed: ≈74.5% valid JSON predictions of 1-8 real MNIST test
images, ≈10% invalid requests of several kinds (each must get its own 4xx), ≈10% image uploads (an MNIST test digit
as a PNG, upscaled 4× and inverted to dark ink on white), and over raw sockets ≈3% slow clients (a valid request
sent in 8 pieces 50 ms apart: 200), ≈2% vanishing clients (half a body, then the connection closes: no answer, the
server counts 499) and ≈0.5% stalled clients (half a body, then silence: 408 after the read timeout). A bounded pool
of async clients keeps `--concurrency` requests in flight. Targets: no 5xx, no dropped connection, the server's
499 count equal to the vanishing and stalled clients, and RSS growth after warm-up (the first 10% of requests) of
at most 50 MB. Results go to
soak.json, soak.md and soak_rss.png under --out; the exit status is 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers or in CI

import httpx
import matplotlib.pyplot as plt
import numpy as np
import orjson
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from bench.serve_bench import REPO, RESULTS, cpu_seconds, free_port, rss_mb, server_commands, wait_ready

WARMUP_FRACTION = 0.1
STALL_TIMEOUT = 2.0  # the server's BNSERVE_READ_TIMEOUT in the soak: stalled clients get their 408 this soon
KINDS = {"valid": 0.745, "invalid": 0.1, "image": 0.1, "slow": 0.03, "vanishing": 0.02, "stalled": 0.005}
RAW_KINDS = ("slow", "vanishing", "stalled")  # sent over a raw socket: what an HTTP client library cannot do
RSS_GROWTH_TARGET_MB = 50.0
BOUNDARY = "soak-boundary-7d1f"


@dataclass(frozen=True)
class Call:
    """One pre-encoded request, what it must get back, and the true labels of its images (for accuracy)."""

    kind: str  # "valid", "invalid" or "image"
    name: str
    method: str
    path: str
    body: bytes
    content_type: str
    expect: int
    labels: tuple[int, ...] = ()


def multipart(png: bytes) -> bytes:
    return (
        (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="files"; filename="digit.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        + png
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )


def digit_png(image: np.ndarray) -> bytes:
    """An MNIST digit (uint8, white on black) as a user would photograph it: dark ink on white, 112×112."""
    img = Image.fromarray(255 - image).resize((112, 112), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def build_calls(images: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> dict[str, list[Call]]:
    """Pools of requests per kind, encoded once so the client spends its time sending, not encoding."""
    x = images.astype(np.float32) / 255.0
    js, form = "application/json", f"multipart/form-data; boundary={BOUNDARY}"
    valid = []
    for _ in range(256):
        n = int(rng.integers(1, 9))
        idx = rng.choice(len(x), n, replace=False)
        body = orjson.dumps({"instances": [[round(float(v), 4) for v in x[i].reshape(-1)] for i in idx]})
        valid.append(
            Call("valid", f"json×{n}", "POST", "/v1/predict", body, js, 200, tuple(int(labels[i]) for i in idx))
        )
    uploads = [
        Call("image", "png", "POST", "/v1/predict/image", multipart(digit_png(images[i])), form, 200, (int(labels[i]),))
        for i in rng.choice(len(x), 64, replace=False)
    ]
    row = [0.5] * 784
    png = digit_png(images[0])
    bad: list[tuple[str, str, str, bytes, str, int]] = [
        ("not-json", "POST", "/v1/predict", b"{not json", js, 400),
        ("no-instances", "POST", "/v1/predict", b'{"instances": []}', js, 422),
        ("short-row", "POST", "/v1/predict", orjson.dumps({"instances": [row[:783]]}), js, 422),
        ("out-of-range", "POST", "/v1/predict", orjson.dumps({"instances": [[*row[:783], 1.5]]}), js, 422),
        ("nan", "POST", "/v1/predict", b'{"instances": [[NaN' + b", 0.5" * 783 + b"]]}", js, 422),
        ("string-pixel", "POST", "/v1/predict", orjson.dumps({"instances": [[*row[:783], "0.5"]]}), js, 422),
        ("too-many", "POST", "/v1/predict", orjson.dumps({"instances": [[0.0] * 784] * 65}), js, 422),
        ("text-plain", "POST", "/v1/predict", orjson.dumps({"instances": [row]}), "text/plain", 415),
        ("get-predict", "GET", "/v1/predict", b"", js, 405),
        ("truncated-png", "POST", "/v1/predict/image", multipart(png[: len(png) // 2]), form, 422),
        ("not-an-image", "POST", "/v1/predict/image", multipart(b"hello, world" * 10), form, 422),
        ("no-files", "POST", "/v1/predict/image", f"--{BOUNDARY}--\r\n".encode(), form, 422),
    ]
    invalid = [Call("invalid", *spec) for spec in bad]
    raw = {
        kind: [Call(kind, kind, c.method, c.path, c.body, c.content_type, expect, c.labels) for c in valid[:32]]
        for kind, expect in (("slow", 200), ("vanishing", 0), ("stalled", 408))
    }
    return {"valid": valid, "invalid": invalid, "image": uploads, **raw}


async def raw_exchange(host: str, port: int, call: Call) -> int:
    """A request over its own connection, sent the way a slow, vanishing or stalled client sends it; the answer's
    status (0: none, the client went away first)."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        head = (
            f"{call.method} {call.path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {call.content_type}\r\n"
            f"Content-Length: {len(call.body)}\r\nConnection: close\r\n\r\n"
        ).encode()
        request = head + call.body
        if call.kind == "slow":
            piece = len(request) // 8 + 1
            for i in range(0, len(request), piece):
                writer.write(request[i : i + piece])
                await writer.drain()
                await asyncio.sleep(0.05)
        else:  # vanishing or stalled: half of the body, then it closes, or says nothing more
            writer.write(head + call.body[: len(call.body) // 2])
            await writer.drain()
            if call.kind == "vanishing":
                return 0
        status_line = await asyncio.wait_for(reader.readline(), STALL_TIMEOUT * 5 + 30)
        await reader.read()  # the rest, until the server closes
        return int(status_line.split()[1]) if status_line else 0
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


@dataclass
class Tally:
    statuses: Counter[tuple[str, int]] = field(default_factory=Counter)  # (kind, status)
    unexpected: Counter[tuple[str, int]] = field(default_factory=Counter)  # (call name, status) ≠ expected
    errors: Counter[str] = field(default_factory=Counter)  # transport errors by type
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    correct: Counter[str] = field(default_factory=Counter)  # right top-1 labels, by kind
    images: Counter[str] = field(default_factory=Counter)
    done: int = 0


async def drive(url: str, schedule: list[Call], concurrency: int, tally: Tally) -> None:
    """A bounded pool of closed-loop clients working through the schedule."""
    # Reuse a connection only while it is fresh: uvicorn closes idle ones after 5 s, and a request sent just then
    # would be lost to a race of the client's own making.
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency, keepalive_expiry=2.0)
    next_index = iter(range(len(schedule)))
    step = max(1, len(schedule) // 10)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as client:
        host, port = url.removeprefix("http://").split(":")

        async def worker() -> None:
            for i in next_index:
                call = schedule[i]
                started = time.perf_counter()
                content = b""
                try:
                    if call.kind in RAW_KINDS:
                        status = await raw_exchange(host, int(port), call)
                    else:
                        r = await client.request(
                            call.method, call.path, content=call.body, headers={"Content-Type": call.content_type}
                        )
                        status, content = r.status_code, r.content
                except (httpx.HTTPError, OSError, TimeoutError) as exc:
                    tally.errors[f"{type(exc).__name__} on {call.name}"] += 1
                    continue
                finally:
                    tally.done += 1
                    if tally.done % step == 0:
                        print(f"  {tally.done:>7d} requests", flush=True)
                tally.latencies[call.kind].append(time.perf_counter() - started)
                tally.statuses[call.kind, status] += 1
                if status != call.expect:
                    tally.unexpected[call.name, status] += 1
                elif call.labels and content:
                    got = [p["label"] for p in orjson.loads(content)["predictions"]]
                    tally.correct[call.kind] += sum(g == t for g, t in zip(got, call.labels, strict=True))
                    tally.images[call.kind] += len(call.labels)

        await asyncio.gather(*(worker() for _ in range(concurrency)))


def sample_rss(pid: int, tally: Tally, samples: list[tuple[float, float, int]], stop: threading.Event) -> None:
    """(seconds since start, RSS MB, requests done) once a second, on its own thread so a busy loop cannot delay it."""
    t0 = time.monotonic()
    while not stop.is_set():
        samples.append((time.monotonic() - t0, rss_mb(pid), tally.done))
        stop.wait(1.0)


def summarise(samples: list[tuple[float, float, int]], total: int, tally: Tally) -> dict[str, Any]:
    warm = int(total * WARMUP_FRACTION)
    after = [s for s in samples if s[2] >= warm] or samples[-1:]
    base = after[0][1]
    t = np.array([s[0] for s in after])
    rss = np.array([s[1] for s in after])
    slope = float(np.polyfit(t, rss, 1)[0]) * 60 if len(after) > 2 else 0.0
    statuses = Counter(status for (_, status) in tally.statuses.elements())
    return {
        "requests": total,
        "warmup_requests": warm,
        "rss_start_mb": samples[0][1],
        "rss_after_warmup_mb": base,
        "rss_final_mb": float(rss[-1]),
        "rss_max_mb": float(rss.max()),
        "rss_growth_after_warmup_mb": float(rss[-1] - base),
        "rss_max_growth_after_warmup_mb": float(rss.max() - base),
        "rss_slope_mb_per_minute_after_warmup": slope,
        "status_counts": {str(k): v for k, v in sorted(statuses.items())},
        "status_by_kind": {f"{k} {s}": v for (k, s), v in sorted(tally.statuses.items())},
        "server_errors_5xx": sum(v for s, v in statuses.items() if s >= 500),
        "transport_errors": dict(tally.errors),
        "unexpected_status": {f"{n} → {s}": v for (n, s), v in sorted(tally.unexpected.items())},
        "accuracy": {k: tally.correct[k] / tally.images[k] for k in tally.images},
        "latency_ms": {
            k: {"p50": float(np.percentile(v, 50)) * 1e3, "p99": float(np.percentile(v, 99)) * 1e3}
            for k, v in sorted(tally.latencies.items())
        },
    }


def plot(samples: list[tuple[float, float, int]], summary: dict[str, Any], path: Path) -> None:
    t = [s[0] for s in samples]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.plot(t, [s[1] for s in samples], color="tab:blue", label="server RSS")
    warm_t = next((s[0] for s in samples if s[2] >= summary["warmup_requests"]), t[-1])
    base = summary["rss_after_warmup_mb"]
    ax.axvline(warm_t, color="grey", ls=":", label="end of warm-up")
    ax.axhline(base + RSS_GROWTH_TARGET_MB, color="tab:red", ls="--", label=f"target: +{RSS_GROWTH_TARGET_MB:.0f} MB")
    ax.set_xlabel("seconds")
    ax.set_ylabel("RSS (MB)")
    ax.set_ylim(0, max(max(s[1] for s in samples), base + RSS_GROWTH_TARGET_MB) * 1.1)
    done = ax.twinx()
    done.plot(t, [s[2] / 1000 for s in samples], color="tab:green", alpha=0.4, label="requests done")
    done.set_ylabel("requests done (thousands)")
    ax.set_title(f"bnserve soak: {summary['requests']} mixed requests")
    lines = ax.get_legend_handles_labels()[0] + done.get_legend_handles_labels()[0]
    ax.legend(lines, [str(line.get_label()) for line in lines], loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(summary: dict[str, Any], meta: dict[str, Any]) -> str:
    s = summary
    lines = [
        f"Measured {meta['date']} on {meta['cpus']} CPUs: {s['requests']} requests, {meta['concurrency']} clients in "
        f"flight, {meta['seconds']:.0f} s ({s['requests'] / meta['seconds']:.0f} req/s; server CPU "
        f"{meta['server_cpu_seconds'] / s['requests'] * 1e3:.2f} ms per request; machine load average "
        f"{meta['load_average'][1]:.1f}), artifact {meta['artifact']}.",
        "",
        "| RSS (MB) | value |",
        "|---|---:|",
        f"| at start (model loaded) | {s['rss_start_mb']:.1f} |",
        f"| after warm-up ({s['warmup_requests']} requests) | {s['rss_after_warmup_mb']:.1f} |",
        f"| at the end | {s['rss_final_mb']:.1f} |",
        f"| growth after warm-up (target ≤ {RSS_GROWTH_TARGET_MB:.0f}) | {s['rss_growth_after_warmup_mb']:+.1f} |",
        f"| largest growth after warm-up | {s['rss_max_growth_after_warmup_mb']:+.1f} |",
        f"| trend after warm-up, MB/min | {s['rss_slope_mb_per_minute_after_warmup']:+.2f} |",
        "",
        "| kind | status | count |",
        "|---|---:|---:|",
    ]
    lines += [f"| {key.split()[0]} | {key.split()[1]} | {n} |" for key, n in s["status_by_kind"].items()]
    lines += [
        "",
        f"5xx: {s['server_errors_5xx']} (target 0); transport errors: {s['transport_errors'] or 0}; "
        f"answers other than the expected status: {s['unexpected_status'] or 0}; "
        f"server exit status after SIGTERM: {meta['exit_code']}. The server counted "
        f"{meta['server_counted_499']:.0f} requests as 499 (client closed), for {meta['clients_gone']} clients that "
        "went away (vanishing ones, and stalled ones it answered 408 and closed).",
        "",
        "| kind | p50 ms | p99 ms | top-1 accuracy |",
        "|---|---:|---:|---:|",
    ]
    for kind, lat in s["latency_ms"].items():
        acc = s["accuracy"].get(kind)
        lines.append(f"| {kind} | {lat['p50']:.1f} | {lat['p99']:.1f} | {'–' if acc is None else f'{acc:.3f}'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifact", type=Path, default=REPO / "artifacts" / "mnist-bn")
    p.add_argument("--requests", type=int, default=100_000)
    p.add_argument("--concurrency", type=int, default=32, help="requests in flight at once")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args(argv)
    if a.requests < 100 or a.concurrency < 1:
        p.error("--requests must be >= 100 and --concurrency >= 1")
    from training.data import default_cache_dir, load_mnist

    mnist = load_mnist(default_cache_dir())
    rng = np.random.default_rng(a.seed)
    pools = build_calls(mnist.test_x, mnist.test_y, rng)
    kinds = rng.choice(list(KINDS), size=a.requests, p=list(KINDS.values()))
    schedule = [pools[k][int(rng.integers(len(pools[k])))] for k in kinds]
    a.out.mkdir(parents=True, exist_ok=True)

    port = free_port()
    cmd, extra = server_commands(port)["bnserve"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("BNSERVE_")}
    env.update(
        extra, BNSERVE_ARTIFACT_DIR=str(a.artifact.resolve()), BNSERVE_READ_TIMEOUT=str(STALL_TIMEOUT),
        PYTHONPATH=str(REPO),
    )  # fmt: skip
    log_path = a.out / "soak_server.log"
    url = f"http://127.0.0.1:{port}"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        tally, stop = Tally(), threading.Event()
        samples: list[tuple[float, float, int]] = []
        sampler = threading.Thread(target=sample_rss, args=(proc.pid, tally, samples, stop), daemon=True)
        try:
            wait_ready(f"{url}/v1/predict", proc)
            print(f"soak: {a.requests} requests, {a.concurrency} in flight, server pid {proc.pid}", flush=True)
            sampler.start()
            started = time.monotonic()
            asyncio.run(drive(url, schedule, a.concurrency, tally))
            seconds = time.monotonic() - started
            time.sleep(1.5)  # one more sample at rest
            server_cpu = cpu_seconds(proc.pid)
            counted = httpx.get(f"{url}/metrics", timeout=30).text
            client_closed = sum(
                sample.value
                for family in text_string_to_metric_families(counted)
                for sample in family.samples
                if sample.name == "bnserve_http_requests_total" and sample.labels.get("status") == "499"
            )
        finally:
            stop.set()
            proc.send_signal(signal.SIGTERM)
            try:
                exit_code = proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                exit_code = proc.wait()
    summary = summarise(samples, a.requests, tally)
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "cpus": os.cpu_count(), "concurrency": a.concurrency,
        "seconds": seconds, "artifact": str(a.artifact), "seed": a.seed, "exit_code": exit_code,
        "server_cpu_seconds": server_cpu, "load_average": os.getloadavg(), "server_counted_499": client_closed,
        "clients_gone": tally.statuses["vanishing", 0] + tally.statuses["stalled", 408],
    }  # fmt: skip
    md = markdown(summary, meta)
    (a.out / "soak.md").write_text(md)
    (a.out / "soak.json").write_text(
        json.dumps({"meta": meta, "summary": summary, "rss_samples": samples}, indent=1) + "\n"
    )
    plot(samples, summary, a.out / "soak_rss.png")
    print("\n" + md)
    missed = [
        name
        for name, bad in [
            ("5xx answers", summary["server_errors_5xx"] > 0),
            ("transport errors", bool(summary["transport_errors"])),
            ("unexpected statuses", bool(summary["unexpected_status"])),
            (
                f"RSS growth > {RSS_GROWTH_TARGET_MB:.0f} MB",
                summary["rss_growth_after_warmup_mb"] > RSS_GROWTH_TARGET_MB,
            ),
            ("non-zero exit after SIGTERM", exit_code != 0),
            ("499s counted other than the clients that went away", client_closed != meta["clients_gone"]),
        ]
        if bad
    ]
    if missed:
        print(f"targets missed: {', '.join(missed)}; server log: {log_path}\n{log_path.read_text()[-3000:]}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
