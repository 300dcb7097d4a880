"""Serving benchmark: bnserve (drift on/off) against a naive FastAPI server and the HTTP ceiling, one run, ratios.

    python -m bench.serve_bench [--artifact artifacts/mnist-bn] [--duration 2] [--rounds 15] [--concurrency 1,8,32,128]

Every server is started here on its own free loopback port and warmed up; then, at each concurrency, each one is
loaded in turn with wrk (or bench/loadgen.py when wrk is missing), a real MNIST test image as the body, for
`--duration` seconds, in `--rounds` interleaved rounds: 15 × 2 s = 30 s of load per server and level. A ratio of
two servers is the median over rounds of the ratio of what they did in the same round, one right after the other
(see `paired`). Results go to bench/results/serve_bench.{json,md}.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
DRIFT_WINDOW = 256  # the servers' drift window (BNSERVE_DRIFT_WINDOW's default)


@dataclass
class Run:
    server: str
    concurrency: int
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    requests: int
    rss_before_mb: float
    rss_after_mb: float
    monitored: float | None = None  # share of the level's images the drift window saw (bnserve with drift on)
    rounds_rps: list[float] = field(default_factory=list)  # each round's req/s, in round order
    rounds_p50_ms: list[float] = field(default_factory=list)
    cpu_ms: float = 0.0  # CPU time of the server and its worker per request, ms (median over rounds)
    rounds_cpu_ms: list[float] = field(default_factory=list)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_commands(port: int) -> dict[str, tuple[list[str], dict[str, str]]]:
    py = sys.executable
    uv = [py, "-m", "uvicorn", "--host", "127.0.0.1", "--port", str(port), "--no-access-log", "--log-level", "warning"]
    bn = {
        "BNSERVE_PORT": str(port),
        "BNSERVE_HOST": "127.0.0.1",
        "BNSERVE_ACCESS_LOG": "false",
        "BNSERVE_LOG_LEVEL": "warning",
    }
    nodrift = ([py, "-m", "service"], {**bn, "BNSERVE_DRIFT_ENABLED": "false"})
    return {
        "bnserve": ([py, "-m", "service"], {**bn, "BNSERVE_DRIFT_ENABLED": "true"}),
        "bnserve-nodrift": nodrift,
        # the A/A control: a second, identical instance. Identical servers can differ by several per cent over a
        # whole run (measured: 1.00 / 1.07 / 1.05 at c=1 in 24 paired rounds); its ratio to bnserve-nodrift is the
        # noise floor of every on/off ratio here
        "bnserve-nodrift-2": nodrift,
        # every image monitored, whatever the load (drift sample 1)
        "bnserve-alldrift": (
            [py, "-m", "service"],
            {**bn, "BNSERVE_DRIFT_ENABLED": "true", "BNSERVE_DRIFT_SAMPLE": "1"},
        ),
        # the model on a thread of the event loop's process, as before the worker process: the GIL is shared
        "bnserve-thread": (
            [py, "-m", "service"],
            {**bn, "BNSERVE_DRIFT_ENABLED": "true", "BNSERVE_INFERENCE_PROCESS": "false"},
        ),
        # the forward pass in torch eager instead of onnxruntime (service/engine.py)
        "bnserve-torch": (
            [py, "-m", "service"],
            {**bn, "BNSERVE_DRIFT_ENABLED": "true", "BNSERVE_ENGINE": "torch"},
        ),
        "naive": ([*uv, "bench.naive_server:app"], {}),
        "ceiling": ([*uv, "--loop", "uvloop", "--http", "httptools", "bench.ceiling_server:app"], {}),
    }


def over_tree(pid: int, measure: Callable[[int], float]) -> float:
    """`measure` summed over a process and its live descendants (bnserve's inference worker is a child process)."""
    total = measure(pid)
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        for child in children.read_text().split():
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):  # exited meanwhile
                total += over_tree(int(child), measure)
    return total


def _own_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0  # a zombie has no VmRSS line


def rss_mb(pid: int) -> float:
    """Resident memory of a process and all its live descendants, in MB."""
    return over_tree(pid, _own_rss_mb)


def _own_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process and its live descendants (bnserve's inference worker) have used so far."""
    return over_tree(pid, _own_cpu_seconds)


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    body = json.dumps({"instances": [[0.0] * 784]})
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            r = httpx.post(url, content=body, headers={"Content-Type": "application/json"}, timeout=2)
            if r.status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} not ready in {timeout} s")


_WRK_LUA = """wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local f = io.open("{body}", "rb")
wrk.body = f:read("*all")
f:close()
"""


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if m is None:
        raise ValueError(f"unexpected wrk latency {text!r}")
    return float(m.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[m.group(2)]


def load(url: str, body_path: Path, connections: int, duration: float, workdir: Path) -> dict[str, float]:
    """Drive load from a separate process: wrk when installed, else the async fallback."""
    if shutil.which("wrk"):
        script = workdir / "post.lua"
        script.write_text(_WRK_LUA.format(body=body_path))
        out = subprocess.run(
            ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(duration))}s", "--timeout", "10s", "--latency", "-s", str(script), url],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
        non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
        sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
        errors = (int(non2xx.group(1)) if non2xx else 0) + (sum(map(int, sock.groups())) if sock else 0)
        return {
            "requests": total, "errors": errors,
            "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
            "p50_ms": _ms(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1)),  # type: ignore[union-attr]
            "p99_ms": _ms(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1)),  # type: ignore[union-attr]
        }  # fmt: skip
    out = subprocess.run(
        [sys.executable, "-m", "bench.loadgen", url, str(body_path), "--connections", str(connections), "--duration", str(duration)],
        capture_output=True, text=True, check=True, cwd=REPO,
    ).stdout  # fmt: skip
    return dict(json.loads(out))


class Server:
    """One server process on a free loopback port. A name "bnserve@LABEL" runs the bnserve server from the checkout
    `trees[LABEL]` (another commit, or a variant of this one) with this venv, so code can be A/B'd in paired rounds."""

    def __init__(self, name: str, artifact: Path, trees: dict[str, Path] | None = None) -> None:
        self.name = name
        port = free_port()
        base_name, _, label = name.partition("@")
        tree = (trees or {})[label] if label else REPO
        cmd, extra = server_commands(port)[base_name]
        env = {k: v for k, v in os.environ.items() if not k.startswith("BNSERVE_")}
        env.update(extra, BNSERVE_ARTIFACT_DIR=str(artifact), PYTHONPATH=str(tree))
        self.base = f"http://127.0.0.1:{port}"
        self.url = f"{self.base}/v1/predict"
        self.proc = subprocess.Popen(cmd, cwd=tree, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def rss(self) -> float:
        return rss_mb(self.proc.pid)

    def cpu(self) -> float:
        return cpu_seconds(self.proc.pid)

    def drift_counts(self) -> tuple[int, int] | None:
        """bnserve with drift on: images its drift window saw, and images served unmonitored (the drift sampling rule)."""
        if not self.name.startswith("bnserve"):
            return None
        r = httpx.get(f"{self.base}/v1/drift", timeout=10)
        r.raise_for_status()
        report = r.json()
        if not report["enabled"]:
            return None
        return int(report["images_seen"]), int(report["images_unmonitored"])

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def bench_servers(
    names: list[str], artifact: Path, body: Path, levels: list[int], duration: float, rounds: int, work: Path,
    trees: dict[str, Path] | None = None,
) -> list[Run]:  # fmt: skip
    """All servers run at once, idle but one: at each level every server gets `duration` s of load in turn, for
    `rounds` rounds, and a figure is the median over its rounds.

    The machine's speed drifts (shared, virtual): one server's req/s at c=1 varied 341-709 over three 10 s runs
    of one level, and two identical servers differed by 0.77 and 1.37 in medians of such runs. Many short rounds
    in serpentine order (forward, then backward) keep neighbours in the list back to back in every round, each of a
    pair first in half of them; `paired` takes the ratio within each round."""
    servers = [Server(name, artifact, trees) for name in names]
    runs = []
    try:
        for srv in servers:
            wait_ready(srv.url, srv.proc)
            load(srv.url, body, 8, 2.0, work)  # warm-up: lazy init, allocator pools, caches
        rss_start = {srv.name: srv.rss() for srv in servers}
        for c in levels:
            rss_before = {srv.name: srv.rss() for srv in servers}
            counts_before = {srv.name: srv.drift_counts() for srv in servers}
            results: dict[str, list[dict[str, float]]] = {srv.name: [] for srv in servers}
            for k in range(rounds):
                for srv in servers if k % 2 == 0 else servers[::-1]:
                    # CPU per request: what the server spent, whatever else the (shared) machine was doing
                    cpu_before = srv.cpu()
                    result = load(srv.url, body, c, duration, work)
                    result["cpu_ms"] = 1e3 * (srv.cpu() - cpu_before) / max(result["requests"], 1)
                    results[srv.name].append(result)
            for srv in servers:
                rs = results[srv.name]
                med = {key: float(np.median([r[key] for r in rs])) for key in ("rps", "p50_ms", "p99_ms", "cpu_ms")}
                errors, requests = sum(int(r["errors"]) for r in rs), sum(int(r["requests"]) for r in rs)
                runs.append(
                    Run(srv.name, c, med["rps"], med["p50_ms"], med["p99_ms"], errors, requests,
                        rss_before[srv.name], srv.rss(), monitored_share(counts_before[srv.name], srv.drift_counts()),
                        [r["rps"] for r in rs], [r["p50_ms"] for r in rs], med["cpu_ms"], [r["cpu_ms"] for r in rs])
                )  # fmt: skip
                spread = " / ".join(f"{r['rps']:.0f}" for r in rs)
                saw = runs[-1].monitored
                print(
                    f"  {srv.name:16s} c={c:<4d} {med['rps']:8.0f} req/s ({spread})  p50 {med['p50_ms']:6.2f} ms  "
                    f"p99 {med['p99_ms']:7.2f} ms  cpu {med['cpu_ms']:.3f} ms/req  errors {errors}"
                    + ("" if saw is None else f"  monitored {saw:.0%}"),
                    flush=True,
                )
        for srv in servers:
            print(f"  {srv.name}: RSS {rss_start[srv.name]:.0f} MB after warm-up → {srv.rss():.0f} MB", flush=True)
    finally:
        for srv in servers:
            srv.stop()
    return runs


def monitored_share(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float | None:
    if before is None or after is None:
        return None
    seen, unmonitored = after[0] - before[0], after[1] - before[1]
    return seen / (seen + unmonitored) if seen + unmonitored else None


def paired(a: Run, b: Run, key: str = "rps") -> float:
    """a's figure over b's: the median over rounds of the two's ratio within one round, seconds apart (back to back
    for neighbours in the server list), so the machine's drift mostly cancels. Measured at c=1 over thirty 1 s
    rounds, two identical servers: 0.998 (IQR of the rounds' ratios 0.90-1.12). Without rounds in common, the ratio
    of the two's medians."""
    xs, ys = getattr(a, f"rounds_{key}"), getattr(b, f"rounds_{key}")
    if xs and len(xs) == len(ys):
        return float(np.median([x / y for x, y in zip(xs, ys, strict=True)]))
    return float(getattr(a, key) / getattr(b, key))


def ratios(runs: list[Run]) -> dict[str, dict[int, float]]:
    by = {(r.server, r.concurrency): r for r in runs}
    out: dict[str, dict[int, float]] = {
        "bnserve/naive rps": {},
        "bnserve/ceiling rps": {},
        "drift on/off rps": {},
        "every image monitored: drift on/off rps": {},
        "A/A control: two identical nodrift servers rps": {},
        "worker process/thread rps": {},
        "onnxruntime/torch engine rps": {},
        "bnserve/naive p50": {},
    }
    for c in sorted({r.concurrency for r in runs}):
        bn, naive, ceil, off = (by.get((s, c)) for s in ("bnserve", "naive", "ceiling", "bnserve-nodrift"))
        every, twin, thread, eager = (
            by.get((s, c)) for s in ("bnserve-alldrift", "bnserve-nodrift-2", "bnserve-thread", "bnserve-torch")
        )
        pairs = [
            ("bnserve/naive rps", bn, naive), ("bnserve/ceiling rps", bn, ceil), ("drift on/off rps", bn, off),
            ("every image monitored: drift on/off rps", every, off),
            ("A/A control: two identical nodrift servers rps", twin, off), ("worker process/thread rps", bn, thread),
            ("onnxruntime/torch engine rps", bn, eager),
        ]  # fmt: skip
        # servers run from other checkouts (--tree): each against this checkout's server of the same kind
        variants = sorted({r.server for r in runs if "@" in r.server})
        for server in variants:
            pairs.append(
                (
                    f"{server} / {server.partition('@')[0]} rps",
                    by.get((server, c)),
                    by.get((server.partition("@")[0], c)),
                )
            )
        for name, a, b in pairs:
            if a and b:
                out.setdefault(name, {})[c] = paired(a, b)
        # CPU per request, the steadier measure on a busy machine, for the A/A control and each variant
        cpu_pairs = [("A/A control cpu/request", twin, off)] + [
            (f"{v} / {v.partition('@')[0]} cpu/request", by.get((v, c)), by.get((v.partition("@")[0], c)))
            for v in variants
        ]
        for name, a, b in cpu_pairs:
            if a and b and a.cpu_ms > 0 and b.cpu_ms > 0:
                out.setdefault(name, {})[c] = paired(a, b, "cpu_ms")
        if bn and naive:
            out["bnserve/naive p50"][c] = paired(bn, naive, "p50_ms")
    return out


def markdown(runs: list[Run], rat: dict[str, dict[int, float]], meta: dict[str, object]) -> str:
    lines = [
        f"Measured {meta['date']} on {meta['cpus']} CPUs, load from {meta['loader']}, {meta['duration']} s per level "
        f"and server in each of {meta['rounds']} interleaved rounds (figures: medians over rounds; ratios: medians "
        "over rounds of the ratio within a round), "
        "body: one real MNIST test image (784 floats).",
        "",
        "| server | conc. | req/s | p50 ms | p99 ms | CPU ms/req | errors | drift window saw | window new every | RSS before → after (MB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in runs:
        saw = "–" if r.monitored is None else f"{100 * r.monitored:.0f} %"
        # one image per request: the window of DRIFT_WINDOW images is replaced every W / (share × req/s) seconds
        refresh = "–" if not r.monitored else f"{DRIFT_WINDOW / (r.monitored * r.rps):.2f} s"
        lines.append(
            f"| {r.server} | {r.concurrency} | {r.rps:.0f} | {r.p50_ms:.2f} | {r.p99_ms:.2f} | {r.cpu_ms:.3f} | {r.errors} | {saw} | {refresh} | {r.rss_before_mb:.0f} → {r.rss_after_mb:.0f} |"
        )
    levels = sorted({r.concurrency for r in runs})
    lines += ["", "| ratio | " + " | ".join(f"c={c}" for c in levels) + " |", "|---|" + "---:|" * len(levels)]
    for name, row in rat.items():
        lines.append(f"| {name} | " + " | ".join(f"{row[c]:.2f}" if c in row else "–" for c in levels) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifact", type=Path, default=REPO / "artifacts" / "mnist-bn")
    p.add_argument("--duration", type=float, default=2.0, help="seconds of load per server, level and round")
    p.add_argument("--concurrency", default="1,8,32,128")
    p.add_argument(
        "--servers",
        default="bnserve,bnserve-nodrift,bnserve-nodrift-2,bnserve-alldrift,bnserve-thread,bnserve-torch,naive,ceiling",
    )
    p.add_argument("--rounds", type=int, default=15, help="interleaved rounds per level; figures are medians")
    p.add_argument(
        "--tree", action="append", default=[], metavar="LABEL=PATH",
        help="another checkout to A/B: adds server 'bnserve@LABEL' (or list 'bnserve-nodrift@LABEL' in --servers), "
        "run from PATH with this venv; its ratio to this checkout's server of the same kind is reported",
    )  # fmt: skip
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args(argv)
    levels = [int(c) for c in a.concurrency.split(",")]
    from training.data import default_cache_dir, load_mnist

    image = load_mnist(default_cache_dir()).test_x[0].astype(np.float32) / 255.0
    a.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        body = work / "body.json"
        body.write_text(json.dumps({"instances": [[round(float(v), 6) for v in image.reshape(-1)]]}))
        trees = {label: Path(path).resolve() for label, _, path in (t.partition("=") for t in a.tree)}
        names = a.servers.split(",")
        names += [f"bnserve@{label}" for label in trees if not any(n.endswith(f"@{label}") for n in names)]
        runs = bench_servers(names, a.artifact.resolve(), body, levels, a.duration, a.rounds, work, trees)
    rat = ratios(runs)
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "cpus": os.cpu_count(), "duration": a.duration, "rounds": a.rounds,
        "loader": "wrk -t1" if shutil.which("wrk") else "bench/loadgen.py (httpx)",
    }  # fmt: skip
    md = markdown(runs, rat, meta)
    (a.out / "serve_bench.md").write_text(md)
    (a.out / "serve_bench.json").write_text(
        json.dumps({"meta": meta, "runs": [asdict(r) for r in runs], "ratios": rat}, indent=2)
    )
    print("\n" + md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
