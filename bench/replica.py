"""What one replica costs: resident memory per process (server, inference worker, helpers) and time to ready.

    python -m bench.replica [--artifact artifacts/mnist-bn] [--starts 3] [--requests 2000] [--tree LABEL=PATH]

Each start runs `python -m service` with its default settings on a free loopback port, times it from the process
start to the first `/readyz` 200, reads each process's RSS idle, then after `--requests` predictions (one real MNIST
test image each, 8 clients), and stops it. Figures are medians over `--starts`. `--tree LABEL=PATH` measures
another checkout (another commit) the same way, interleaved with this one, start by start. Results go to
bench/results/replica.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

from bench.serve_bench import REPO, RESULTS, free_port


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _children(pid: int) -> list[int]:
    return [int(c) for path in Path(f"/proc/{pid}/task").glob("*/children") for c in path.read_text().split()]


def process_rss(pid: int) -> dict[str, float]:
    """RSS in MB of the server and each descendant, named by role: worker (the inference worker), tracker
    (multiprocessing's resource tracker) or the child's pid."""
    out = {"server": _rss_mb(pid)}
    for child in _children(pid):
        cmdline = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        role = "tracker" if "resource_tracker" in cmdline else "worker" if "spawn_main" in cmdline else str(child)
        out[role] = out.get(role, 0.0) + _rss_mb(child)
    out["total"] = sum(out.values())
    return out


def one_start(tree: Path, artifact: Path, body: bytes, requests: int) -> dict[str, object]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BNSERVE_")}
    env.update(
        BNSERVE_ARTIFACT_DIR=str(artifact), BNSERVE_PORT=str(port), BNSERVE_ACCESS_LOG="false",
        BNSERVE_LOG_LEVEL="warning", PYTHONPATH=str(tree),
    )  # fmt: skip
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "service"], cwd=tree, env=env, stdout=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}")
            try:
                if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.02)
        ready_s = time.perf_counter() - started
        time.sleep(2.0)  # let the worker's warm-up garbage settle
        idle = process_rss(proc.pid)
        with httpx.Client(base_url=base, timeout=30) as client, ThreadPoolExecutor(8) as pool:

            def post(_: int) -> int:
                headers = {"Content-Type": "application/json"}
                return client.post("/v1/predict", content=body, headers=headers).status_code

            statuses = list(pool.map(post, range(requests)))
        loaded = process_rss(proc.pid)
        if set(statuses) != {200}:
            raise RuntimeError(f"non-200 answers: {sorted(set(statuses))}")
        return {"ready_s": ready_s, "idle": idle, "loaded": loaded}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def summary(starts: list[dict[str, object]]) -> dict[str, object]:
    def med(key: str, role: str) -> float:
        return float(np.median([s[key].get(role, 0.0) for s in starts]))  # type: ignore[attr-defined]

    roles = sorted({r for s in starts for r in s["idle"]}, key=lambda r: (r == "total", r))  # type: ignore[attr-defined]
    return {
        "ready_s": float(np.median([s["ready_s"] for s in starts])),  # type: ignore[misc]
        "idle_mb": {r: med("idle", r) for r in roles},
        "loaded_mb": {r: med("loaded", r) for r in roles},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifact", type=Path, default=REPO / "artifacts" / "mnist-bn")
    p.add_argument("--starts", type=int, default=3)
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--tree", action="append", default=[], metavar="LABEL=PATH", help="another checkout to measure")
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args(argv)
    from training.data import default_cache_dir, load_mnist

    image = load_mnist(default_cache_dir()).test_x[0].astype(np.float32) / 255.0
    body = json.dumps({"instances": [[round(float(v), 6) for v in image.reshape(-1)]]}).encode()
    trees = {"this": REPO, **{label: Path(path).resolve() for label, _, path in (t.partition("=") for t in a.tree)}}
    starts: dict[str, list[dict[str, object]]] = {label: [] for label in trees}
    for k in range(a.starts):
        for label, tree in trees.items():
            starts[label].append(one_start(tree, a.artifact.resolve(), body, a.requests))
            print(f"  {label} start {k + 1}: ready in {starts[label][-1]['ready_s']:.2f} s", flush=True)
    results = {label: summary(s) for label, s in starts.items()}
    lines = [
        f"Measured {time.strftime('%Y-%m-%d %H:%M')} on {os.cpu_count()} CPUs; medians of {a.starts} starts; "
        f"loaded = after {a.requests} one-image predictions from 8 clients.",
        "",
        "| checkout | ready (s) | idle RSS MB: server / worker / tracker / total | loaded RSS MB: total |",
        "|---|---:|---|---:|",
    ]
    for label, r in results.items():
        idle, loaded = r["idle_mb"], r["loaded_mb"]
        parts = " / ".join(f"{idle.get(k, 0.0):.0f}" for k in ("server", "worker", "tracker", "total"))  # type: ignore[attr-defined]
        lines.append(f"| {label} | {r['ready_s']:.2f} | {parts} | {loaded['total']:.0f} |")  # type: ignore[index]
    md = "\n".join(lines) + "\n"
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "replica.md").write_text(md)
    (a.out / "replica.json").write_text(json.dumps({"results": results, "starts": starts}, indent=2))
    print("\n" + md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
