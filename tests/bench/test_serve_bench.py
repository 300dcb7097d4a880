"""The serving benchmark's arithmetic: ratios within one run, and the share of images the drift window saw."""

from bench.serve_bench import Run, markdown, monitored_share, ratios


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
    table = markdown(runs, rat, {"date": "d", "cpus": 2, "loader": "wrk", "duration": 10, "rounds": 2})
    assert "| bnserve | 32 | 2000 | 3.00 | 6.00 | 0 | 25 % | 500 → 501 |" in table
    assert "| naive | 1 | 300 |" in table and "| – |" in table  # no ratio where a server is missing


def test_monitored_share_is_taken_over_the_level() -> None:
    assert monitored_share((100, 0), (300, 600)) == 0.25
    assert monitored_share(None, (1, 1)) is None
    assert monitored_share((5, 5), (5, 5)) is None
