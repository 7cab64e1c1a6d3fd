"""The benchmark's report says what the targets are measured against (bench/run.py).

No servers: the report is rendered from block results like those `bench.run` collects.
"""

from __future__ import annotations

from bench import alternated, run


def _measured(clients: int, rates: dict[str, list[float]]) -> alternated.Alternated:
    series = {name: alternated.Series(rates=values,
                                      ratios=[v / b for v, b in zip(values, rates["bare"],
                                                                    strict=True)])
              for name, values in rates.items()}
    return alternated.Alternated("bare", clients, blocks=len(rates["bare"]), series=series)


def _rows(report: str) -> dict[str, str]:
    return {cells[1].strip(): cells[2].strip() for line in report.splitlines()
            if (cells := line.split("|")) and len(cells) > 3}


def test_the_throughput_targets_show_the_floor_and_trackgates_share_of_the_gap() -> None:
    results = [_measured(1, {"bare": [100.0, 100.0, 100.0], "trackgate": [90.0, 92.0, 80.0],
                             "tls-proxy": [100.0, 96.0, 90.0]}),
               _measured(4, {"bare": [200.0, 200.0, 200.0], "trackgate": [190.0, 196.0, 194.0],
                             "tls-proxy": [200.0, 200.0, 196.0]})]

    rows = _rows(run.render(run.FULL, results, {}, {}, {}, throughput_only=True))

    assert rows["trackgate >= 0.95x bare, 1 client (3 blocks)"] == "0.900x"
    assert rows["trackgate >= 0.95x bare, 4 clients (3 blocks)"] == "0.970x"
    assert rows["(the floor: nginx TLS proxy, no auth, 1 client)"] == "0.960x"
    # Per block: 90/100, 92/96, 80/90; the median is trackgate's own share at one client.
    assert rows["(trackgate / the floor, 1 client, median of blocks)"] == "0.900x"
    assert rows["(trackgate / the floor, 4 clients, median of blocks)"] == "0.980x"


def test_the_verdicts_follow_the_targets() -> None:
    results = [_measured(1, {"bare": [100.0] * 3, "trackgate": [96.0] * 3}),
               _measured(4, {"bare": [100.0] * 3, "trackgate": [94.0] * 3})]

    report = run.render(run.FULL, results, {}, {}, {}, throughput_only=True)

    assert "| trackgate >= 0.95x bare, 1 client (3 blocks) | 0.960x | **met** |" in report
    assert "| trackgate >= 0.95x bare, 4 clients (3 blocks) | 0.940x | **MISSED** |" in report
    assert "the floor" not in report  # not measured in this run: nothing is made up
