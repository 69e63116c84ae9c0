"""`ioc soak`: a short run reports memory samples of both processes and counts every produced event."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from bench.soak import growth, slope_per_hour
from entrypoints.cli import _parser

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("points", "expected"),
    [
        ([(0.0, 100.0), (1800.0, 100.0), (3600.0, 100.0)], 0.0),
        ([(0.0, 100.0), (1800.0, 105.0), (3600.0, 110.0)], 10.0),
        ([(0.0, 100.0), (60.0, 99.0)], -60.0),
        ([(30.0, 100.0)], None),
    ],
)
def test_slope_is_least_squares_per_hour(points: list[tuple[float, float]], expected: float | None) -> None:
    got = slope_per_hour(points)
    assert got == expected if expected is None else got == pytest.approx(expected)


def test_growth_judges_only_the_second_half() -> None:
    # A warm-up climb in the first half, flat afterwards: not growth.
    samples = [{"elapsed_s": t, "rss": rss} for t, rss in [(0, 80), (300, 200), (600, 300), (900, 300), (1200, 300)]]
    verdict = growth(samples, "rss", 1200.0)
    assert verdict["verdict"] == "flat" and verdict["slope_mib_per_h"] == 0.0
    assert (verdict["first_mib"], verdict["last_mib"], verdict["peak_mib"]) == (80.0, 300.0, 300.0)


@pytest.mark.parametrize(("text", "seconds"), [("90s", 90), ("30m", 1800), ("1h", 3600)])
def test_soak_duration_accepts_seconds_minutes_hours(text: str, seconds: int) -> None:
    args = _parser().parse_args(["soak", "--duration", text, "--sample-every", "5s"])
    assert args.duration.total_seconds() == seconds and args.sample_every.total_seconds() == 5


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_short_soak_samples_both_processes_and_counts_every_event(
    tmp_path: Path, kafka_bootstrap: str, database_url: str
) -> None:
    out = tmp_path / "soak.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("IOC_")}
    env.update(IOC_KAFKA_BOOTSTRAP=kafka_bootstrap, IOC_DATABASE_URL=database_url)
    args = ["--duration", "20s", "--sample-every", "5s", "--rate", "100", "--clients", "5", "--json", str(out)]
    done = subprocess.run(
        [sys.executable, "-m", "entrypoints.cli", "soak", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        timeout=110,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    assert str(out) in done.stdout.decode() and "memory (RSS)" in done.stdout.decode()
    results = orjson.loads(out.read_bytes())
    samples = results["samples"]
    assert len(samples) >= 3
    assert all(s["worker_rss_mib"] > 0 and s["api_rss_mib"] > 0 for s in samples)
    assert [s["elapsed_s"] for s in samples] == sorted(s["elapsed_s"] for s in samples)
    final = samples[-1]
    assert results["produced"]["events"] == final["produced"] == final["counted"] > 1000
    assert results["all_counted"] is True
    assert final["ws_connected"] == 5 and final["ws_received"] > 0
    assert final["rows"]["dossier_state"] > 0 and final["db_mib"] > 0
    for process in ("worker", "api"):
        assert isinstance(results["memory"][process]["slope_mib_per_h"], float)
