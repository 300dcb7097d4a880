"""The serving benchmark's arithmetic: ratios within one run, and the share of images the drift window saw."""

from bench.serve_bench import Run, markdown, monitored_share, paired, ratios


def run(server: str, c: int, rps: float, p50: float = 1.0, monitored: float | None = None) -> Run:
    return Run(server, c, rps, p50, 2 * p50, 0, int(rps * 10), 500.0, 501.0, monitored)


def test_ratios_compare_servers_at_the_same_concurrency() -> None:
    runs = [
        run("bnserve", 32, 2000, p50=3.0, monitored=0.25), run("bnserve-nodrift", 32, 2100),
        run("bnserve-alldrift", 32, 1700), run("naive", 32, 250, p50=12.0), run("ceiling", 32, 2500),
        run("bnserve-thread", 32, 1000), run("bnserve-nodrift-2", 32, 2205), run("naive", 1, 300),
    ]  # fmt: skip
    rat = ratios(runs)
    assert rat["bnserve/naive rps"] == {32: 8.0}
    assert rat["bnserve/naive p50"] == {32: 0.25}
    assert rat["drift on/off rps"][32] == 2000 / 2100
    assert rat["every image monitored: drift on/off rps"][32] == 1700 / 2100
    assert rat["worker process/thread rps"] == {32: 2.0}
    assert rat["A/A control: two identical nodrift servers rps"] == {32: 2205 / 2100}
    assert "A/A control cpu/request" not in rat, "no CPU figures measured: no CPU ratio"
    table = markdown(runs, rat, {"date": "d", "cpus": 2, "loader": "wrk", "duration": 10, "rounds": 2})
    assert "| bnserve | 32 | 2000 | 3.00 | 6.00 | 0.000 | 0 | 25 % | 0.51 s | 500 → 501 |" in table
    assert "| naive | 1 | 300 |" in table and "| – |" in table  # no ratio where a server is missing


def test_cpu_per_request_is_compared_within_rounds_for_the_control_and_each_variant() -> None:
    base = Run("bnserve-nodrift", 8, 1000, 1.0, 2.0, 0, 0, 1.0, 1.0, None, [1000, 900], [1.0, 1.1], 0.5, [0.5, 0.6])
    twin = Run("bnserve-nodrift-2", 8, 1000, 1.0, 2.0, 0, 0, 1.0, 1.0, None, [1000, 900], [1.0, 1.1], 0.5, [0.55, 0.6])
    variant = Run(
        "bnserve-nodrift@x", 8, 1000, 1.0, 2.0, 0, 0, 1.0, 1.0, None, [1000, 900], [1.0, 1.1], 0.4, [0.4, 0.48]
    )
    rat = ratios([base, twin, variant])
    assert rat["A/A control cpu/request"] == {8: (1.1 + 1.0) / 2}
    assert rat["bnserve-nodrift@x / bnserve-nodrift cpu/request"] == {8: 0.8}


def test_monitored_share_is_taken_over_the_level() -> None:
    assert monitored_share((100, 0), (300, 600)) == 0.25
    assert monitored_share(None, (1, 1)) is None
    assert monitored_share((5, 5), (5, 5)) is None


def test_a_ratio_is_the_median_of_the_ratios_within_each_round() -> None:
    """The machine slows both down in round 2 and one of them in round 3: the ratios within rounds are 0.9, 0.9 and
    0.5, and their median is 0.9."""
    on = Run("bnserve", 1, 900, 2.0, 4.0, 0, 0, 500.0, 500.0, None, [900, 450, 475], [2.0, 4.0, 2.1])
    off = Run("bnserve-nodrift", 1, 1000, 1.8, 3.6, 0, 0, 500.0, 500.0, None, [1000, 500, 950], [1.9, 3.8, 2.0])
    assert paired(on, off) == 0.9
    assert paired(on, off, "p50_ms") == 2.0 / 1.9
    assert ratios([on, off])["drift on/off rps"] == {1: 0.9}
    assert paired(on, Run("bnserve-nodrift", 1, 1000, 1.0, 2.0, 0, 0, 1.0, 1.0)) == 0.9  # no rounds: the medians
