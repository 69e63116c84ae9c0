"""`ioc bench --only anomaly`: precision, recall and detection delay of the anomaly detectors on labelled simulated data.

Not timing-sensitive: the simulators' seeded data run through the worker's own `Engine` (the
detectors of `streams.anomaly`), minute by minute in event time (dossiers and incidents straight
into the detectors: see `detect_counts`). Four runs:

- sensor faults spread over three days after a clean first day (`simulators.faults.fault_plan`);
- three clean days of every station (another seed): false alarms per station-day;
- three weeks of dossiers with office hours, a surge in six communes in the third week;
- three days of incidents at the `ioc dev` rate, bursts on one system on the second and third;
- the `ioc dev` back-fill (30 days, `simulators.backfill`) through the whole engine, stepped hourly:
  the false alarms a fresh wall would learn from.

A finding is a true positive when a label on the same subject covers its time (label start to
end + `TOLERANCE`), whatever the label's kind (a jammed float found as "stuck" is a real fault);
a label counts as recalled when a finding of its own kind does. Delay: first such finding − label start.
"""

from __future__ import annotations

import datetime as dt
import heapq
import json
import random
import statistics
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from ioc.contract import US
from ioc.contract import UTC7 as VN
from ioc.registry import Registry, load_registry
from ioc.settings import TOPIC_CYBER, TOPIC_DOSSIER
from simulators.backfill import BackfillPlan, backfill_events
from simulators.dossiers import DossierSimulator, load_catalogue
from simulators.envelope import Event
from simulators.faults import DossierSurgeAnomaly, IncidentBurst, Label, SensorFaults, fault_plan
from simulators.incidents import PROVINCIAL_SYSTEMS, IncidentSimulator, commune_portals
from simulators.sensors import SensorSimulator
from simulators.stream import rate_split
from streams.anomaly import Detectors, Finding
from streams.anomaly_config import AnomalyConfig
from streams.engine import Engine

DAY = dt.timedelta(days=1)
#: A finding up to this long after a label's end still belongs to it (drift and surges are judged hourly).
TOLERANCE = dt.timedelta(hours=2)
SENSOR_KINDS = ("stuck", "spike", "drift", "unresponsive")
#: Goals: what an operator can live with (docs/anomaly.md).
GOALS = {"recall": 0.9, "precision": 0.8, "false_alarms_per_station_day": 0.05}
#: Province-wide dossiers per second: about 2 million a year (the province's order of magnitude).
DOSSIERS_PER_S = 0.07
#: Communes given a labelled surge: rural communes (Nam Đàn, Yên Thành, Hùng Chân, Vân Tụ), Vinh wards.
SURGE_COMMUNES = ("17935", "16681", "17506", "16801", "17611", "16690")
#: Incidents per second at the `ioc dev` rate (50 records/s).
DEV_RATE = 50.0


def detect(events: Iterable[Event], registry: Registry, start: dt.datetime, end: dt.datetime,
           config: AnomalyConfig | None = None, step_min: int = 1) -> list[Finding]:  # fmt: skip
    """Every finding of the engine's detectors over time-ordered events, the clock stepping each
    ``step_min`` minutes (the detectors judge every minute bucket either way; a coarser step only
    makes sliding the KPI windows cheaper)."""
    engine = Engine(registry, int(start.timestamp() * US), config)
    findings: list[Finding] = []
    minute = int(start.timestamp()) // 60
    for e in events:
        m = int(e.at.timestamp()) // 60
        if m >= minute + step_min:
            minute = m
            engine.advance(minute * 60 * US)
            findings += engine.anomaly.take()
        topic = e.topic
        key, parsed = engine.parse(topic, json.dumps(e.value).encode())
        engine.apply(topic, key, parsed, record=False)
    last = int(end.timestamp()) // 60
    for m in range(minute + 1, last + 1, 10):
        engine.advance(m * 60 * US)
        findings += engine.anomaly.take()
    engine.advance(last * 60 * US)
    return findings + engine.anomaly.take()


def detect_counts(events: Iterable[Event], registry: Registry, start: dt.datetime, end: dt.datetime,
                  config: AnomalyConfig | None = None) -> list[Finding]:  # fmt: skip
    """Dossier and incident events straight into the detectors (receipts pushed per minute by
    `Detectors.on_dossier`, the same per-minute counts the engine's dossier counters give them).

    The engine's own per-minute slide of every dossier KPI window costs about 100 s per simulated day
    at the province's rate, so weeks of baseline would take hours; the detectors see the same counts."""
    detectors = Detectors(registry, config)
    findings: list[Finding] = []
    minute = int(start.timestamp()) // 60
    for e in events:
        m = int(e.at.timestamp()) // 60
        if m > minute:
            minute = m
            detectors.advance(minute * 60 * US, {})
            findings += detectors.take()
        v = e.value
        t = int(e.at.timestamp() * US)
        if e.topic == TOPIC_DOSSIER and v.get("type") == "received":
            detectors.on_dossier(t, v.get("commune_code"))
        elif e.topic == TOPIC_CYBER and v.get("type") == "detected":
            detectors.on_incident(t, v.get("category"), v.get("system"))
    detectors.advance(int(end.timestamp()) // 60 * 60 * US, {})
    return findings + detectors.take()


def score(findings: Sequence[Finding], labels: Sequence[Label], kinds: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per kind: labels, recalled, precision over its findings, delays (minutes)."""
    opened = [f for f in findings if f.active]
    out: dict[str, dict[str, Any]] = {}
    for kind in kinds:
        mine = [f for f in opened if f.detector == kind]
        true = [f for f in mine if any(f.scope in lab.subjects and lab.start <= f.at <= lab.end + TOLERANCE
                                       for lab in labels)]  # fmt: skip
        delays = []
        kind_labels = [lab for lab in labels if lab.kind == kind]
        for lab in kind_labels:
            hits = [f.at for f in mine if f.scope in lab.subjects and lab.start <= f.at <= lab.end + TOLERANCE]
            if hits:
                delays.append((min(hits) - lab.start).total_seconds() / 60)
        false = [f for f in mine if f not in true]
        out[kind] = {
            "false_positives": [f"{f.scope} {f.at.isoformat()}" for f in false[:20]],
            "labels": len(kind_labels),
            "recalled": len(delays),
            "recall": round(len(delays) / len(kind_labels), 3) if kind_labels else None,
            "findings": len(mine),
            "precision": round(len(true) / len(mine), 3) if mine else None,
            "delay_median_min": round(statistics.median(delays), 1) if delays else None,
            "delay_p90_min": round(_p90(delays), 1) if delays else None,
        }
    return out


def _p90(xs: list[float]) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(0.9 * (len(s) - 1)))]


def false_alarms(findings: Sequence[Finding], kinds: Sequence[str], since: dt.datetime, subjects: int,
                 days: float) -> dict[str, Any]:  # fmt: skip
    """Findings opened on clean data after the warm-up, per subject-day, by kind and in all."""
    opened = [f for f in findings if f.active and f.at >= since and f.detector in kinds]
    by_kind = {k: sum(1 for f in opened if f.detector == k) for k in kinds}
    rate = len(opened) / (subjects * days) if subjects and days else 0.0
    return {"findings": len(opened), "by_kind": by_kind, "subject_days": round(subjects * days, 1),
            "per_subject_day": round(rate, 4),
            "examples": [f"{f.detector} {f.scope} {f.at.isoformat()}" for f in opened[:20]]}  # fmt: skip


def _sensor_events(registry: Registry, seed: str, start: dt.datetime, end: dt.datetime,
                   scenario: SensorFaults | None) -> Iterator[Event]:  # fmt: skip
    if scenario is None:
        return SensorSimulator(random.Random(seed), registry.stations, registry.units).events(start, end)
    sim = SensorSimulator(random.Random(seed), registry.stations, registry.units, conditions=scenario.sensors)
    return scenario.bend_sensors(sim.events(start, end))


def run(*, quick: bool = False, progress: Any = None) -> dict[str, Any]:
    registry = load_registry()
    say = progress or (lambda _msg: None)
    start = dt.datetime(2026, 10, 5, 0, 0, tzinfo=VN)  # a Monday in the wet season
    results: dict[str, Any] = {"goals": GOALS, "tolerance_min": TOLERANCE.total_seconds() / 60}
    n_stations = sum(1 for s in registry.stations.values() if s.kind in ("air", "water", "weather"))

    # 1. Sensor faults over three days after a clean day.
    days = 2 if quick else 4
    end = start + days * DAY
    plan, bands = fault_plan(registry.stations, start, compressed=False)
    plan = tuple(f for f in plan if f.end <= end)
    bands = tuple(b for b in bands if b.end <= end)
    faulty = SensorFaults("sensor-faults", start, end - start, faults=plan, bands=bands, seed="bench")
    say(f"anomaly: sensor faults, {days} days, {len(plan)} faults")
    found = detect(_sensor_events(registry, "bench/faults", start, end, faulty), registry, start, end)
    results["sensor_faults"] = score(found, faulty.labels, SENSOR_KINDS)

    # 2. Clean days: false alarms per station-day (the first day is warm-up).
    clean_days = 2 if quick else 4
    clean_end = start + clean_days * DAY
    say(f"anomaly: clean sensors, {clean_days} days")
    clean = detect(_sensor_events(registry, "bench/clean", start, clean_end, None), registry, start, clean_end)
    results["clean_sensors"] = false_alarms(clean, SENSOR_KINDS, start + DAY, n_stations, clean_days - 1)

    # 3. Dossier surges: two weeks of baseline, then a week with six communes surging fourfold for 3 hours
    # (rural communes, a town ward, Vinh wards), on weekdays from 8:00 or 14:00 (office hours).
    weeks = 3
    d_end = start + weeks * 7 * DAY
    catalogue = load_catalogue(registry.units)
    surges: list[DossierSurgeAnomaly] = []
    for i, commune in enumerate(SURGE_COMMUNES):
        a = start + 14 * DAY + (1 + i // 2) * DAY + dt.timedelta(hours=(8, 14)[i % 2])
        surges.append(DossierSurgeAnomaly("dossier-surge-anomaly", a, 3 * dt.timedelta(hours=1), commune=commune,
                                          extra=((a, a + dt.timedelta(hours=3)),)))  # fmt: skip
    rate = DOSSIERS_PER_S * (0.3 if quick else 1.0)
    sim = DossierSimulator(
        random.Random("bench/dossiers"), catalogue, registry.units, dossiers_per_s=rate, diurnal=True
    )
    dossiers: Iterator[Event] = sim.events(start, d_end)
    for s in surges:
        dossiers = s.bend_dossiers(dossiers)
    say(f"anomaly: dossiers, {weeks} weeks at {rate:g}/s")
    d_found = detect_counts(dossiers, registry, start, d_end)
    d_labels = [lab for s in surges for lab in s.labels]
    results["dossier_surge"] = score(d_found, d_labels, ("dossier_surge",))["dossier_surge"]
    surge_week = start + 14 * DAY
    clean_d = [f for f in d_found if not any(f.scope in lab.subjects and lab.start <= f.at <= lab.end + TOLERANCE
                                             for lab in d_labels)]  # fmt: skip
    results["clean_dossiers"] = false_alarms(clean_d, ("dossier_surge",), surge_week, len(registry.units), 7)

    # 4. Incident bursts at the dev rate.
    i_days = 3
    i_end = start + i_days * DAY
    systems = [*PROVINCIAL_SYSTEMS, *commune_portals(registry.units, catalogue.commune_agency)]
    per_s = rate_split(DEV_RATE, registry.stations).incidents_per_s
    portal = next(s.system for s in systems if s.commune_code == "17935")
    bursts = IncidentBurst("incident-burst", start, DAY, system=portal, extra=tuple(
        (start + DAY + dt.timedelta(hours=h), start + DAY + dt.timedelta(hours=h, minutes=40)) for h in (10, 22, 34, 40)
    ))  # fmt: skip
    isim = IncidentSimulator(random.Random("bench/incidents"), systems, incidents_per_s=per_s)
    incidents = heapq.merge(isim.events(start, i_end), bursts.extra_incidents(random.Random("bench/burst")),
                            key=lambda e: e.at)  # fmt: skip
    say(f"anomaly: incidents, {i_days} days at {per_s:.3f}/s")
    i_found = detect_counts(incidents, registry, start, i_end)
    results["incident_burst"] = score(i_found, bursts.labels, ("incident_burst",))["incident_burst"]
    clean_i = [f for f in i_found if not any(f.scope in lab.subjects and lab.start <= f.at <= lab.end + TOLERANCE
                                             for lab in bursts.labels)]  # fmt: skip
    keys = len(systems) + 9  # systems and categories
    results["clean_incidents"] = false_alarms(clean_i, ("incident_burst",), start + DAY, keys, i_days - 1)

    # 5. The back-fill `ioc dev` starts with: every detector through the whole engine. Sensors and
    # incidents after a day of warm-up, surges after the two weeks theirs takes.
    b_days = 4 if quick else 30
    b_now = start + 40 * DAY
    b_start = b_now - b_days * DAY
    say(f"anomaly: the ioc dev back-fill, {b_days} days")
    plan_b = BackfillPlan(days=b_days)
    b_found = detect(backfill_events("bench/backfill", b_now, plan_b, registry), registry, b_start, b_now, step_min=60)
    results["backfill_sensors"] = false_alarms(b_found, SENSOR_KINDS, b_start + DAY, n_stations, b_days - 1)
    results["backfill_dossiers"] = false_alarms(
        b_found, ("dossier_surge",), b_start + 14 * DAY, len(registry.units), max(0, b_days - 14)
    )
    results["backfill_incidents"] = false_alarms(b_found, ("incident_burst",), b_start + DAY, keys, b_days - 1)
    return results


def table(r: dict[str, Any]) -> str:
    g = r["goals"]
    rows = [("kind", "labels", "recall", "findings", "precision", "delay median", "delay p90", "verdict")]
    kinds = [(k, r["sensor_faults"][k]) for k in SENSOR_KINDS]
    kinds += [("dossier_surge", r["dossier_surge"]), ("incident_burst", r["incident_burst"])]
    for k, s in kinds:
        missed = []
        if s["recall"] is not None and s["recall"] < g["recall"]:
            missed.append("recall")
        if s["precision"] is not None and s["precision"] < g["precision"]:
            missed.append("precision")
        rows.append((
            k, str(s["labels"]), _f(s["recall"]), str(s["findings"]), _f(s["precision"]),
            _m(s["delay_median_min"]), _m(s["delay_p90_min"]), "MISSED: " + ", ".join(missed) if missed else "ok",
        ))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    lines.append("")
    lines.append(f"false alarms on clean data (goal ≤ {g['false_alarms_per_station_day']} per subject-day):")
    for name, subject in (
        ("clean_sensors", "station"),
        ("clean_dossiers", "commune"),
        ("clean_incidents", "system/category"),
        ("backfill_sensors", "station"),
        ("backfill_dossiers", "commune"),
        ("backfill_incidents", "system/category"),
    ):
        if name not in r:
            continue  # a result file from before the back-fill run
        c = r[name]
        verdict = "ok" if c["per_subject_day"] <= g["false_alarms_per_station_day"] else "MISSED"
        lines.append(f"  {name}: {c['findings']} findings over {c['subject_days']} {subject}-days = "
                     f"{c['per_subject_day']} per {subject}-day {c['by_kind']}  {verdict}")  # fmt: skip
    lines.append(f"goals: recall ≥ {g['recall']}, precision ≥ {g['precision']}; a finding within "
                 f"{r['tolerance_min']:.0f} min after a label's end still counts")  # fmt: skip
    return "\n".join(lines)


def _f(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}"


def _m(x: float | None) -> str:
    return "—" if x is None else f"{x:.0f} min"
