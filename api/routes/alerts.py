"""Alert and silence routes (CONTRACT §7): list, read with the audit trail, acknowledge, resolve, silence.

Rights, denying unless a rule allows:

- seeing an alert is `alerts.routing.visible_to` (operator and admin all; security the cyber domain
  and what is addressed to it; a commune its own); an alert the caller may not see is a 404, as if
  it did not exist;
- acting on one: operator and admin any, security only cyber-domain alerts (403 otherwise), a
  commune only its own;
- silences: operator and admin; security only with a ``domain`` matcher of exactly ``cyber``;
  commune users may list the silences restricted to their commune, not create or expire any.

Every action is recorded with who (the token subject) and when: acknowledgements and resolutions
in ``alert_event`` and on ``ioc.alerts``, silences in ``alert_silence``.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Annotated, Any, Final

import msgspec
import psycopg
from aiokafka.errors import KafkaError
from fastapi import APIRouter, Body, HTTPException, Path, Query, Response
from psycopg_pool import PoolTimeout

from alerts.engine import Silence, UnknownAlert, operator_event, silence_id
from alerts.model import Alert, AlertState, Severity, TransitionError
from alerts.routing import SEES_ALL, visible_to
from alerts.rules import matchers_from
from api import schemas
from api.alert_store import AlertQuery, AlertStore, silence_over
from api.auth import Caller, Principal
from ioc.durations import parse_duration
from streams.windows import TZ

if TYPE_CHECKING:
    from api.context import ApiContext

log = logging.getLogger(__name__)

MAX_SILENCE: Final = dt.timedelta(days=31)
#: How far back ``GET /api/silences`` shows silences that are over.
RECENT_SILENCES: Final = dt.timedelta(hours=24)
ACTIVE: Final = "active"
_STEPS: Final = {AlertState.ACKNOWLEDGED: "acknowledge", AlertState.RESOLVED: "resolve"}
_NO_ALERT: Final = ("No alert with this id that you may see.", {"detail": "no alert '9f2c4e1a7b3d5c60'"})
_NO_SILENCE: Final = ("No silence with this id that you may see.", {"detail": "no silence 'sil-3f9a2b7c1d0e'"})
_BAD_SILENCE: Final = (
    "The silence cannot be created as given; the message says why.",
    {"detail": "give either ends_at or duration, not both"},
)
_BAD_BODY: Final = (
    "The body could not be read (not JSON text in UTF-8).",
    {"detail": "There was an error parsing the body"},
)
_ACT_FORBIDDEN: Final = (
    "The alert is visible but your role may not act on it (security: cyber alerts only).",
    {"detail": "role security may only act on cyber alerts"},
)


# --- rights -----------------------------------------------------------------------------------------


def may_act(caller: Principal, alert: Alert, station_communes: Mapping[str, str]) -> bool:
    """Whether the caller may acknowledge or resolve ``alert`` (it must be visible too)."""
    if caller.role in SEES_ALL:
        return True
    if caller.role == "security":
        return alert.domain == "cyber"
    if caller.role == "commune":
        return visible_to(caller.role, caller.commune, alert, station_communes)
    return False


def _only(matchers: Mapping[str, Sequence[str]], label: str, value: str) -> bool:
    """Whether the matchers pin ``label`` to exactly ``value`` (no glob, no alternative)."""
    patterns = matchers.get(label)
    return bool(patterns) and all(p == value for p in patterns or ())


def may_create_silence(caller: Principal, matchers: Mapping[str, Sequence[str]]) -> bool:
    if caller.role in SEES_ALL:
        return True
    return caller.role == "security" and _only(matchers, "domain", "cyber")


def may_see_silence(caller: Principal, silence: Silence) -> bool:
    if caller.role in SEES_ALL:
        return True
    if caller.role == "security":
        return _only(silence.matchers, "domain", "cyber")
    if caller.role == "commune" and caller.commune is not None:
        return _only(silence.matchers, "commune_code", caller.commune) or _only(
            silence.matchers, "scope", f"commune:{caller.commune}"
        )
    return False


def may_expire_silence(caller: Principal, silence: Silence) -> bool:
    return caller.role in SEES_ALL or (caller.role == "security" and _only(silence.matchers, "domain", "cyber"))


# --- JSON -----------------------------------------------------------------------------------------


def _json(value: Any) -> Any:
    return msgspec.to_builtins(value)


def silence_status(silence: Silence, now: dt.datetime) -> str:
    if silence.expired_at is not None and silence.expired_at <= now:
        return "expired"
    if silence.ends_at <= now:
        return "ended"
    return "pending" if silence.starts_at > now else "active"


def silence_json(silence: Silence, now: dt.datetime) -> dict[str, Any]:
    out: dict[str, Any] = _json(silence)
    out["status"] = silence_status(silence, now)
    return out


def _split(value: str | None) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()] if value else []


def _local(t: dt.datetime) -> dt.datetime:
    """A time without an offset is local (Asia/Ho_Chi_Minh), as everywhere in the API."""
    return t.replace(tzinfo=TZ) if t.tzinfo is None or t.utcoffset() is None else t


def build_query(
    caller: Principal,
    station_communes: Mapping[str, str],
    state: str | None,
    severity: str | None,
    scope: str | None,
    domain: str | None,
) -> AlertQuery:
    """The filters of ``GET /api/alerts``: 400 for a value that does not exist, 403 for a scope outside
    a commune caller's commune (its ``commune:`` scope and its stations)."""
    states: set[AlertState] = set()
    for s in _split(state):
        if s == ACTIVE:
            states |= set(AlertState) - {AlertState.RESOLVED}
        elif s in AlertState.__members__.values():
            states.add(AlertState(s))
        else:
            raise HTTPException(400, f"unknown state {s!r}: use {', '.join([ACTIVE, *AlertState])}")
    severities: set[Severity] = set()
    for s in _split(severity):
        if s not in Severity.__members__.values():
            raise HTTPException(400, f"unknown severity {s!r}: use {', '.join(Severity)}")
        severities.add(Severity(s))
    scopes = _split(scope)
    if caller.role == "commune":
        own = {f"commune:{caller.commune}"} | {
            f"station:{st}" for st, c in station_communes.items() if c == caller.commune
        }
        refused = [s for s in scopes if s not in own]
        if refused:
            raise HTTPException(403, f"scope {refused[0]!r} is outside your rights")
    return AlertQuery(frozenset(states), frozenset(severities), frozenset(scopes), frozenset(_split(domain)))


# --- routes ---------------------------------------------------------------------------------------


def router(ctx: ApiContext) -> APIRouter:
    """The ``/api/alerts`` and ``/api/silences`` routes of one app."""
    router = APIRouter(tags=["alerts"])
    stations = ctx.live.station_communes

    def store() -> AlertStore:
        if ctx.alerts is None:
            raise HTTPException(503, "the database is not connected")
        return ctx.alerts

    def sees(caller: Principal, alert: Alert) -> bool:
        return visible_to(caller.role, caller.commune, alert, stations)

    @router.get(
        "/api/alerts",
        response_model=None,
        responses={
            **schemas.ok(schemas.AlertList, schemas.ALERT_LIST_EXAMPLE),
            **schemas.errors(400, 401, 403, 422, 503),
        },
    )
    async def list_alerts(
        caller: Caller,
        state: Annotated[
            str | None,
            Query(pattern=schemas.NO_NUL, description="state(s), comma-separated; `active` = all but resolved"),
        ] = None,
        severity: Annotated[
            str | None, Query(pattern=schemas.NO_NUL, description="info, warning, high, critical; comma-separated")
        ] = None,
        scope: Annotated[
            str | None, Query(pattern=schemas.NO_NUL, description="scope(s), comma-separated, e.g. commune:17935")
        ] = None,
        domain: Annotated[
            str | None,
            Query(pattern=schemas.NO_NUL, description="cyber, env, water, dossier, platform; comma-separated"),
        ] = None,
        limit: Annotated[int, Query(ge=1, le=1000, description="at most this many")] = 100,
    ) -> dict[str, Any]:
        """Alerts the caller may see, newest first (by when they started), with their current state."""
        query = build_query(caller, stations, state, severity, scope, domain)
        found = await store().list_alerts(query, lambda a: sees(caller, a), limit)
        items = [_json(a) for a in found]
        return {"items": items, "count": len(items)}

    @router.get(
        "/api/alerts/{alert_id}",
        response_model=None,
        responses={
            **schemas.ok(schemas.AlertDetail, schemas.ALERT_DETAIL_EXAMPLE),
            **schemas.errors(401, 404, 422, 503, e404=_NO_ALERT),
        },
    )
    async def get_alert(
        caller: Caller, alert_id: Annotated[str, Path(max_length=64, pattern=schemas.NO_NUL)]
    ) -> dict[str, Any]:
        """One alert and its audit trail: every lifecycle event, who caused it (`by`), when and why."""
        alert = await store().get(alert_id)
        if alert is None or not sees(caller, alert):
            raise HTTPException(404, f"no alert {alert_id!r}")
        events = await store().events(alert_id)
        return {"alert": _json(alert), "events": [_json(e) for e in events]}

    async def act(caller: Principal, alert_id: str, state: AlertState, body: schemas.AlertAction | None) -> Any:
        step_name = _STEPS[state]
        reason = (body.reason.strip() or None) if body is not None and body.reason is not None else None
        try:
            alert = await store().get(alert_id)
            if alert is None or not sees(caller, alert):
                raise HTTPException(404, f"no alert {alert_id!r}")
            if not may_act(caller, alert, stations):
                raise HTTPException(403, f"role {caller.role} may only act on cyber alerts")
            at = ctx.clock()
            publisher = ctx.alert_publisher
            if publisher is None:
                raise HTTPException(503, "the broker is not connected")
            current, event = await store().record(
                alert_id, lambda a: operator_event(a, state, caller.subject, at, reason), publisher.publish
            )
        except UnknownAlert as exc:
            raise HTTPException(404, f"no alert {alert_id!r}") from exc
        except TransitionError as exc:
            raise HTTPException(409, f"cannot {step_name} alert {alert_id}: {exc}") from exc
        except (PoolTimeout, psycopg.OperationalError) as exc:
            raise HTTPException(503, "the database is unreachable; nothing was recorded") from exc
        except (KafkaError, TimeoutError, OSError) as exc:
            log.warning("could not publish the %s of alert %s: %s", step_name, alert_id, type(exc).__name__)
            raise HTTPException(503, "the broker did not take the event; nothing was recorded, retry") from exc
        log.info("alert %s: %s by %s", alert_id, state.value, caller.subject)
        return {"alert": _json(current), "event": _json(event)}

    action_responses = {
        **schemas.ok(schemas.AlertActionResult, schemas.ALERT_ACTION_EXAMPLE),
        **schemas.errors(400, 401, 403, 404, 409, 422, 503, e400=_BAD_BODY, e403=_ACT_FORBIDDEN, e404=_NO_ALERT),
    }

    @router.post("/api/alerts/{alert_id}/ack", response_model=None, responses=action_responses)
    async def acknowledge(
        caller: Caller,
        alert_id: Annotated[str, Path(max_length=64, pattern=schemas.NO_NUL)],
        body: Annotated[schemas.AlertAction | None, Body()] = None,
    ) -> Any:
        """Acknowledge an alert: someone has taken it on; escalation and reminders stop.

        Recorded in the audit trail with the token subject and published on `ioc.alerts`. 409 when
        the lifecycle does not allow it (already acknowledged, resolved).
        """
        return await act(caller, alert_id, AlertState.ACKNOWLEDGED, body)

    @router.post("/api/alerts/{alert_id}/resolve", response_model=None, responses=action_responses)
    async def resolve(
        caller: Caller,
        alert_id: Annotated[str, Path(max_length=64, pattern=schemas.NO_NUL)],
        body: Annotated[schemas.AlertAction | None, Body()] = None,
    ) -> Any:
        """Resolve an alert by hand. If its condition still holds, no new alert opens until it has
        cleared once. Audited and published like an acknowledgement; 409 when already resolved."""
        return await act(caller, alert_id, AlertState.RESOLVED, body)

    @router.post(
        "/api/silences",
        response_model=None,
        status_code=201,
        responses={
            201: {
                "model": schemas.SilenceModel,
                "description": "Created.",
                "content": {"application/json": {"example": schemas.SILENCE_EXAMPLE}},
            },
            **schemas.ok(schemas.SilenceModel, schemas.SILENCE_EXAMPLE, "The same silence already exists."),
            **schemas.errors(400, 401, 403, 422, 503, e400=_BAD_SILENCE),
        },
    )
    async def create_silence(caller: Caller, body: schemas.SilenceRequest, response: Response) -> dict[str, Any]:
        """Mute notifications of alerts matching every matcher, from `starts_at` (default now) until
        `ends_at` or for `duration`. Matching alerts move to `silenced` (they still resolve); their
        events are kept but do not notify. Security staff must pin `domain` to `cyber`."""
        if caller.role not in SEES_ALL and caller.role != "security":
            raise HTTPException(403, f"role {caller.role} may not create silences")
        try:
            parsed = {m.label: m.patterns for m in matchers_from(body.matchers)}
        except ValueError as exc:
            raise HTTPException(400, str(exc)) from exc
        if not may_create_silence(caller, parsed):
            raise HTTPException(403, 'role security may only silence cyber alerts: add the matcher "domain": "cyber"')
        reason = body.reason.strip()
        if not reason:
            raise HTTPException(400, "a silence needs a reason")
        now = ctx.clock()
        starts = _local(body.starts_at) if body.starts_at is not None else now
        if (body.ends_at is None) == (body.duration is None):
            raise HTTPException(400, "give either ends_at or duration, not both")
        if body.duration is not None:
            try:
                ends = starts + parse_duration(body.duration)
            except ValueError as exc:
                raise HTTPException(400, str(exc)) from exc
            except OverflowError as exc:
                raise HTTPException(400, f"a silence lasts at most {MAX_SILENCE.days} days") from exc
        else:
            assert body.ends_at is not None
            ends = _local(body.ends_at)
        if ends <= starts:
            raise HTTPException(400, "a silence must end after it starts")
        if ends <= now:
            raise HTTPException(400, "this silence would already be over")
        if ends - starts > MAX_SILENCE:
            raise HTTPException(400, f"a silence lasts at most {MAX_SILENCE.days} days")
        silence = Silence(
            id=silence_id(parsed, starts, ends, caller.subject, reason),
            matchers=parsed,
            starts_at=starts,
            ends_at=ends,
            created_by=caller.subject,
            reason=reason,
        )
        stored, created = await store().add_silence(silence)
        if created:
            log.info("silence %s created by %s until %s", stored.id, caller.subject, stored.ends_at.isoformat())
        else:
            response.status_code = 200
        return silence_json(stored, now)

    @router.get(
        "/api/silences",
        response_model=None,
        responses={**schemas.ok(schemas.SilenceList, schemas.SILENCE_LIST_EXAMPLE), **schemas.errors(401, 503)},
    )
    async def list_silences(caller: Caller) -> dict[str, Any]:
        """Silences that are active or yet to start, and those over in the last 24 hours (newest first).
        Security staff see the cyber ones, commune users those restricted to their commune."""
        now = ctx.clock()
        found = await store().silences(now - RECENT_SILENCES)
        items = [silence_json(s, now) for s in found if may_see_silence(caller, s)]
        return {"items": items, "count": len(items)}

    @router.delete(
        "/api/silences/{silence_id}",
        response_model=None,
        responses={
            **schemas.ok(schemas.SilenceModel, schemas.EXPIRED_SILENCE_EXAMPLE, "Expired (or already over)."),
            **schemas.errors(401, 403, 404, 422, 503, e404=_NO_SILENCE),
        },
    )
    async def expire_silence(
        caller: Caller, silence_id: Annotated[str, Path(max_length=64, pattern=schemas.NO_NUL)]
    ) -> dict[str, Any]:
        """Expire a silence now: alerts it held that still fire become `firing` again and notify.
        Who and when are kept (`expired_by`, `expired_at`); expiring it again changes nothing."""
        now = ctx.clock()
        silence = await store().get_silence(silence_id)
        if silence is None or not may_see_silence(caller, silence):
            raise HTTPException(404, f"no silence {silence_id!r}")
        if not may_expire_silence(caller, silence):
            raise HTTPException(403, f"role {caller.role} may not expire this silence")
        if not silence_over(silence, now):
            expired = await store().expire_silence(silence_id, caller.subject, now)
            if expired is None:
                raise HTTPException(404, f"no silence {silence_id!r}")
            silence = expired
            log.info("silence %s expired by %s", silence_id, caller.subject)
        return silence_json(silence, now)

    return router
