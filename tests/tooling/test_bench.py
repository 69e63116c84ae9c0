"""`ioc bench`: the figures it reports and the shape of its JSON (never how fast anything is)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from bench.harness import GOALS, SECTIONS, judge, table
from bench.stats import percentiles

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([5.0], {"p50": 5.0, "p95": 5.0, "p99": 5.0, "max": 5.0}),
        ([float(i) for i in range(1, 101)], {"p50": 50.0, "p95": 95.0, "p99": 99.0, "max": 100.0}),
        ([3.0, 1.0, 2.0, 4.0], {"p50": 2.0, "p95": 4.0, "p99": 4.0, "max": 4.0}),
    ],
)
def test_percentiles_are_nearest_rank(values: list[float], expected: dict[str, float]) -> None:
    assert percentiles(values) == expected


def test_percentiles_of_nothing_are_nan() -> None:
    assert all(math.isnan(v) for v in percentiles([]).values())


def test_a_skipped_section_leaves_its_goals_not_run() -> None:
    verdicts = {g["goal"]: g["verdict"] for g in judge({"sink": {"rows_per_s": 60_000.0}})}
    assert verdicts["database writes"] == "pass"
    assert {v for k, v in verdicts.items() if k != "database writes"} == {"not run"}


def test_a_figure_below_its_goal_is_a_miss() -> None:
    results = {"throughput": {"events_per_s": 20_000.0, "ratio_to_baseline": 0.5}}
    verdicts = {g["goal"]: g["verdict"] for g in judge(results)}
    assert verdicts["one worker, sustained"] == "miss"
    assert verdicts["one worker vs baseline"] == "pass"


def _numbers(node: Any) -> list[float]:
    if isinstance(node, bool):
        return []
    if isinstance(node, int | float):
        return [float(node)]
    if isinstance(node, dict):
        return [x for v in node.values() for x in _numbers(v)]
    if isinstance(node, list):
        return [x for v in node for x in _numbers(v)]
    return []


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_quick_bench_writes_every_section_with_figures(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("IOC_")}
    done = subprocess.run(
        [sys.executable, "-m", "entrypoints.cli", "bench", "--quick", "--json", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        timeout=220,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    assert str(out) in done.stdout.decode()
    results = orjson.loads(out.read_bytes())
    for section in SECTIONS:
        assert section in results, section
        figures = [x for x in _numbers(results[section]) if not math.isnan(x)]
        assert figures and all(x >= 0 for x in figures), section
    assert results["throughput"]["events_per_s"] > 0
    cpu = results["throughput"]["cpu_us_per_event"]
    assert cpu["worker"] > 0 and cpu["postgresql"] > 0 and cpu["broker"] > 0, cpu
    assert results["throughput"]["events_per_s_if_cores_full"] > 0
    assert "pipeline CPU per event" in table(results)
    assert results["baseline"]["events_per_s"] > 0
    assert results["sink"]["rows"] > 0
    latency = results["latency"]["emit_interval_s"]["0.1"]["1000"]
    assert latency["seen"] > 0 and latency["p99_ms"] >= latency["p50_ms"] > 0
    fanout = results["fanout"]["clients"]["50"]
    assert fanout["connected"] == 50 and fanout["deliveries"] > 0
    floor = results["fanout"]["floor"]["2"]
    assert floor["connected"] == 50 and floor["deliveries"] == 50 * floor["updates"]
    assert floor["delivery_p99_ms"] >= floor["delivery_p50_ms"] > 0
    assert floor["server_cpu_us_per_delivery"] > 0 and floor["clients_cpu_us_per_delivery"] > 0
    assert len(floor["delivery_p99_ms_per_update"]) == floor["updates"]
    assert floor["delivery_p99_ms"] <= max(floor["delivery_p99_ms_per_update"])  # no update's tail is lost
    assert fanout["api_cpu_us_per_delivery"] > 0 and fanout["clients_cpu_us_per_delivery"] > 0
    assert "fan-out floor, 50 clients" in table(results)
    assert [g["goal"] for g in results["goals"]] == [g.name for g in GOALS]
    assert "goals:" in table(results)


def test_service_cpu_counts_only_processes_alive_at_both_samples() -> None:
    from bench.pipeline import cpu_used

    before = {1: ("postgresql", 1.0), 2: ("postgresql", 2.0), 3: ("broker", 0.5), 9: ("broker", 7.0)}
    after = {1: ("postgresql", 1.5), 2: ("postgresql", 2.25), 3: ("broker", 0.75), 4: ("postgresql", 9.0)}
    assert cpu_used(before, after) == {"postgresql": 0.75, "broker": 0.25}
