"""One report document (JSON-ready dict) per scope: indicators, Decision 766 scores, ranking, cyber, environment."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from typing import Any

from ioc.registry import Registry
from reports import build
from reports.period import Period
from streams import dossier
from streams.engine import Engine
from streams.kpi import status_of
from streams.windows import TZ


class ScopeError(ValueError):
    """A report scope that is not ``province``, ``commune:CODE`` of a known commune or ``agency:CODE``."""


def check_scope(scope: str, registry: Registry) -> str:
    if scope == "province":
        return scope
    kind, _, code = scope.partition(":")
    if kind == "commune" and code in registry.units:
        return scope
    if kind == "agency" and code and len(code) <= 100:
        return scope
    raise ScopeError(f"{scope!r} is not province, commune:CODE (a known commune) or agency:CODE")


def scope_name(scope: str, registry: Registry) -> str:
    if scope == "province":
        return "Tỉnh Nghệ An"
    kind, _, code = scope.partition(":")
    if kind == "commune":
        unit = registry.units.get(code)
        return unit.name if unit else code
    return build.agency_names().get(code, code)


def _change(now: float | None, before: float | None) -> float | None:
    return None if now is None or before is None else round(now - before, 2)


def make_documents(
    engine: Engine, registry: Registry, period: Period, scopes: Sequence[str], source: str
) -> list[dict[str, Any]]:
    """The report of each scope in ``scopes`` for ``period`` (the engine's clock ends at the period's end)."""
    prev = build.read(engine, period.previous())
    prev_values = {s: build.indicator_values(prev, s) for s in scopes}
    prev_eligible = build.full_online_of_eligible(prev)
    prev_score = {s: build.score_766(prev, s, prev_eligible)["total"] for s in scopes}
    prev_cyber = {s: prev.incident_reader("detected", s, "mtd") for s in scopes}

    cur = build.read(engine, period)
    eligible = build.full_online_of_eligible(cur)
    ranking = _rankings(cur, engine, registry, eligible)
    made_for = dt.datetime.fromtimestamp((period.as_of_us + 1) / 1_000_000, TZ).isoformat()
    docs = []
    for scope in scopes:
        values = build.indicator_values(cur, scope)
        indicators = []
        for spec in dossier.KPIS:
            if spec.name not in build.INDICATOR_NAMES:
                continue
            v, num, den = values[spec.name]
            target = registry.targets.get(spec.name)
            before = prev_values[scope][spec.name][0]
            vi, en = build.INDICATOR_NAMES[spec.name]
            indicators.append(
                {
                    "kpi": spec.name,
                    "window": build.indicator_window(spec),
                    "name_vi": vi,
                    "name_en": en,
                    "unit": spec.unit,
                    "value": v,
                    "numerator": num,
                    "denominator": den,
                    "target": target.value if target else None,
                    "direction": target.direction if target else None,
                    "plan_no": target.plan_no if target else None,
                    "status": status_of(v, target, registry.warn_band),
                    "previous": before,
                    "change": _change(v, before),
                }
            )
        score = build.score_766(cur, scope, eligible)
        score["previous_total"] = prev_score[scope]
        score["change"] = _change(score["total"], prev_score[scope])
        cyber = build.cyber_section(cur, scope)
        cyber["previous_detected"] = prev_cyber[scope]
        kind, _, code = scope.partition(":")
        communes: Iterable[str] | None = None if kind == "province" else ([code] if kind == "commune" else [])
        docs.append(
            {
                "schema": build.SCHEMA,
                "period": period.label,
                "period_kind": period.kind,
                "start": period.start.isoformat(),
                "end": period.end.isoformat(),
                "as_of": dt.datetime.fromtimestamp(period.as_of_us / 1_000_000, TZ).isoformat(),
                "previous_period": period.previous().label,
                "scope": scope,
                "scope_name": scope_name(scope, registry),
                "source": source,
                "targets_source": registry.targets_source,
                "made_for": made_for,
                "indicators": indicators,
                "score_766": score,
                "ranking": _ranking_for(ranking, scope),
                "cyber": cyber,
                "environment": build.environment_section(engine, registry, period, communes),
            }
        )
    return docs


def _rankings(
    f: build.Figures, engine: Engine, registry: Registry, eligible: dict[str, tuple[int, int]]
) -> dict[str, list[dict[str, Any]]]:
    """Communes (all of the registry) and agencies (those with dossiers, but not a commune's own UBND,
    ranked as its commune) by their Decision 766 share of the scorable points, then by on-time rate;
    rows without any scorable group last."""
    out: dict[str, list[dict[str, Any]]] = {}
    names = build.agency_names()
    own = build.commune_agencies()
    agencies = sorted(s for s in engine.dossiers.scopes if s.startswith("agency:") and s[7:] not in own)
    for kind, scopes in (("communes", [f"commune:{c}" for c in sorted(registry.units)]), ("agencies", agencies)):
        rows = []
        for scope in scopes:
            score = build.score_766(f, scope, eligible)
            values = build.indicator_values(f, scope)
            code = scope.partition(":")[2]
            name = registry.units[code].name if kind == "communes" else names.get(code, code)
            rows.append(
                {
                    "scope": scope,
                    "name": name,
                    "percent": score["percent_of_scorable"],
                    "score": score["total"],
                    "of": score["points_scored_of"],
                    "received": values["dossier.received"][0],
                    "on_time_rate": values["dossier.on_time_rate"][0],
                    "progress_index": values["dossier.progress_index"][0],
                }
            )
        rows.sort(key=lambda r: (r["percent"] is None, -(r["percent"] or 0), -(r["on_time_rate"] or 0), r["scope"]))
        for i, row in enumerate(rows, 1):
            row["rank"] = i if row["percent"] is not None else None
        out[kind] = rows
    return out


def _ranking_for(ranking: dict[str, list[dict[str, Any]]], scope: str) -> dict[str, Any]:
    kind = scope.partition(":")[0]
    own = None
    for rows in ranking.values():
        for row in rows:
            if row["scope"] == scope:
                own = row
    return {"communes": ranking["communes"], "agencies": ranking["agencies"], "own": own, "scope_kind": kind}
