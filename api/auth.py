"""Access tokens (HS256 JWT) and the deny-by-default rights of each role (CONTRACT §7)."""

from __future__ import annotations

import datetime as dt
import functools
import logging
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Final

import jwt
from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from alerts.routing import visible_to
from ioc.errors import AuthError, ConfigurationError
from ioc.registry import load_stations, load_units
from ioc.settings import Settings

log = logging.getLogger(__name__)

ALGORITHM: Final = "HS256"
ROLES: Final = frozenset({"operator", "security", "commune", "admin", "producer"})
#: Topics a producer token may name (CONTRACT §1); ``*`` as its only station = every registry station.
PRODUCER_TOPICS: Final = ("ioc.dossier.events", "ioc.cyber.incidents", "ioc.sensor.readings")
ANY_STATION: Final = "*"
#: Clock skew tolerated between the machine that issued a token and this one.
LEEWAY: Final = dt.timedelta(seconds=30)
ALERTS_CHANNEL: Final = "alerts"
KPI_CHANNEL_PREFIX: Final = "kpi:"


@functools.lru_cache(maxsize=8)
def _registry_communes(units_file: Path | None) -> frozenset[str]:
    return frozenset(load_units(units_file))


def known_communes(settings: Settings) -> frozenset[str]:
    """The commune codes of the configured unit registry (cached per file)."""
    return _registry_communes(settings.units_file)


@functools.lru_cache(maxsize=8)
def _registry_station_communes(stations_file: Path | None, units_file: Path | None) -> Mapping[str, str]:
    return {s.station_id: s.commune_code for s in load_stations(stations_file, load_units(units_file)).values()}


def commune_stations(settings: Settings, commune: str) -> frozenset[str]:
    """The ids of the registered stations that stand in ``commune`` (cached per registry file)."""
    stations = _registry_station_communes(settings.stations_file, settings.units_file)
    return frozenset(sid for sid, code in stations.items() if code == commune)


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling, and what they may see. Every check denies unless a rule allows."""

    subject: str
    role: str
    commune: str | None = None
    expires_at: dt.datetime | None = None
    #: A commune user's own stations (those whose commune_code is theirs): their KPIs are visible too.
    own_stations: frozenset[str] = frozenset()
    #: A producer's source name, the topics it may write and, for sensors, the stations it reports for.
    source: str | None = None
    topics: tuple[str, ...] = ()
    stations: tuple[str, ...] = ()

    def may_write(self, topic: str) -> bool:
        """Whether this producer may write events to ``topic`` (a logical topic name)."""
        return self.role == "producer" and topic in self.topics

    def may_report_for(self, station_id: str) -> bool:
        """Whether this producer may send readings of ``station_id``."""
        return self.role == "producer" and (ANY_STATION in self.stations or station_id in self.stations)

    @property
    def sees_everything(self) -> bool:
        return self.role in ("operator", "admin")

    def can_see_scope(self, scope: str) -> bool:
        """Whether any KPI of ``scope`` is visible (security: province only, cyber KPIs only; a commune: its
        own commune and the stations in it)."""
        if self.sees_everything:
            return True
        if self.role == "security":
            return scope == "province"
        if self.role == "commune":
            if self.commune is None:
                return False
            if scope.startswith("station:"):
                return scope[8:] in self.own_stations
            return scope == f"commune:{self.commune}"
        return False

    def can_see_kpi(self, kpi: str, scope: str) -> bool:
        """Whether the snapshot of ``kpi`` at ``scope`` is visible."""
        if not self.can_see_scope(scope):
            return False
        if self.role == "security":
            return kpi.startswith("cyber.")
        return True

    def can_subscribe(self, channel: str) -> bool:
        """Whether ``channel`` may be subscribed (its items are then still filtered per item)."""
        if channel == ALERTS_CHANNEL:
            return (
                self.sees_everything or self.role == "security" or (self.role == "commune" and self.commune is not None)
            )
        if channel.startswith(KPI_CHANNEL_PREFIX):
            return self.can_see_scope(channel[len(KPI_CHANNEL_PREFIX) :])
        return False

    def can_see_alert(self, alert: Mapping[str, Any], station_communes: Mapping[str, str] | None = None) -> bool:
        """Whether an alert (event) is visible: `alerts.routing.visible_to`, and for security also the
        alerts of cyber KPIs."""
        try:
            if visible_to(self.role, self.commune, alert, station_communes):
                return True
        except ValueError:  # an item with an unknown state or audience: judged on the rest alone
            pass
        if self.role == "security":
            return str(alert.get("kpi") or alert.get("rule") or "").startswith("cyber.")
        return False


def _check_producer(source: object, topics: object, stations: object) -> None:
    if not isinstance(source, str) or not source or len(source) > 100:
        raise AuthError("role producer needs a source name of 1-100 characters")
    if not isinstance(topics, list | tuple) or not topics or not all(isinstance(t, str) for t in topics):
        raise AuthError("role producer needs the topics it may write")
    unknown = [t for t in topics if t not in PRODUCER_TOPICS]
    if unknown:
        raise AuthError(f"a producer may write only {', '.join(PRODUCER_TOPICS)}, not {unknown[0]!r}")
    if not isinstance(stations, list | tuple) or not all(isinstance(s, str) for s in stations):
        raise AuthError("a producer's stations must be a list of station ids")
    if "ioc.sensor.readings" in topics and not stations:
        raise AuthError("a producer of ioc.sensor.readings needs the stations it reports for (or '*')")


def _check_claims(role: str, commune: str | None, communes: Collection[str]) -> None:
    if role not in ROLES:
        raise AuthError(f"unknown role {role!r}")
    if role == "commune":
        if not commune:
            raise AuthError("role commune needs a commune code")
        if commune not in communes:
            raise AuthError(f"unknown commune {commune!r}")


def create_token(
    settings: Settings,
    role: str,
    commune: str | None = None,
    ttl: dt.timedelta = dt.timedelta(hours=8),
    subject: str | None = None,
    *,
    now: dt.datetime | None = None,
    communes: Collection[str] | None = None,
    source: str | None = None,
    topics: Collection[str] = (),
    stations: Collection[str] = (),
) -> str:
    """Issue a signed access token; raises ConfigurationError for a bad role or commune (or, for a
    producer, a missing source, topics outside CONTRACT §1, or a sensor producer without stations)."""
    try:
        _check_claims(role, commune, known_communes(settings) if communes is None else communes)
        if role == "producer":
            _check_producer(source, list(topics), list(stations))
    except AuthError as exc:
        raise ConfigurationError(str(exc)) from exc
    issued = now or dt.datetime.now(dt.UTC)
    claims: dict[str, Any] = {
        "sub": subject or (f"{role}:{commune}" if commune else role),
        "role": role,
        "iat": int(issued.timestamp()),
        "exp": int((issued + ttl).timestamp()),
    }
    if role == "commune":
        claims["commune"] = commune
    if role == "producer":
        claims["sub"] = subject or f"producer:{source}"
        claims.update(source=source, topics=list(topics), stations=list(stations))
    return jwt.encode(
        claims,
        settings.effective_signing_key(),
        algorithm=ALGORITHM,
        headers={"kid": settings.signing_key_id},
    )


def verification_key(settings: Settings, kid: str) -> str | None:
    """The key that verifies tokens of ``kid``: the current one, a retired one, or None (refused).

    Rotation: move the current key into ``IOC_SIGNING_KEYS_PREVIOUS`` under its kid, set a new
    ``IOC_SIGNING_KEY``/``IOC_SIGNING_KEY_ID``; tokens already issued keep working until they
    expire, then drop the retired entry.
    """
    if kid == settings.signing_key_id:
        return settings.effective_signing_key()
    retired = settings.signing_keys_previous.get(kid)
    return retired.get_secret_value() if retired is not None else None


def verify_token(settings: Settings, token: str | None, *, communes: Collection[str] | None = None) -> Principal:
    """The caller a token names; AuthError if it is missing, malformed, expired or not ours."""
    if not token:
        raise AuthError("missing token")
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError as exc:
        raise AuthError("malformed token") from exc
    kid = header.get("kid")
    key = verification_key(settings, kid) if isinstance(kid, str) else None
    if key is None:
        raise AuthError("token signed with an unknown key id")
    try:
        claims = jwt.decode(
            token,
            key,
            algorithms=[ALGORITHM],
            options={"require": ["sub", "role", "exp", "iat"]},
            leeway=LEEWAY,
        )
    except jwt.ExpiredSignatureError as exc:
        raise AuthError("token expired") from exc
    except jwt.InvalidSignatureError as exc:
        raise AuthError("bad token signature") from exc
    except jwt.PyJWTError as exc:
        raise AuthError(f"invalid token: {exc}") from exc
    role, commune, subject = claims.get("role"), claims.get("commune"), claims.get("sub")
    if not isinstance(role, str) or not isinstance(subject, str):
        raise AuthError("invalid token: role and sub must be strings")
    if commune is not None and not isinstance(commune, str):
        raise AuthError("invalid token: commune must be a string")
    _check_claims(role, commune, known_communes(settings) if communes is None else communes)
    source, topics, stations = claims.get("source"), claims.get("topics"), claims.get("stations", [])
    if role == "producer":
        _check_producer(source, topics, stations)
    return Principal(
        subject=subject,
        role=role,
        commune=commune if role == "commune" else None,
        expires_at=dt.datetime.fromtimestamp(int(claims["exp"]), dt.UTC),
        own_stations=commune_stations(settings, commune) if role == "commune" and commune else frozenset(),
        source=source if role == "producer" else None,
        topics=tuple(topics or ()) if role == "producer" else (),
        stations=tuple(stations or ()) if role == "producer" else (),
    )


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or None."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


_bearer = HTTPBearer(auto_error=False, description="An access token from `ioc token create`.")


async def current_principal(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> Principal:
    """The caller of an HTTP request; 401 when the bearer token is missing or not valid.

    A coroutine although it never awaits: FastAPI runs a plain function dependency in its thread pool,
    a thread hop per request (and a queue for a pool of 40 threads under load) for a few microseconds of work.
    """
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise HTTPException(401, "missing bearer token", headers={"WWW-Authenticate": "Bearer"})
    settings: Settings = request.app.state.ioc.settings
    try:
        principal = verify_token(settings, credentials.credentials)
    except AuthError as exc:
        raise HTTPException(401, str(exc), headers={"WWW-Authenticate": "Bearer"}) from exc
    if principal.role == "producer":  # CONTRACT §7: a producer writes events and reads nothing
        raise HTTPException(403, "a producer token writes events (POST /api/ingest/...) and reads nothing")
    return principal


#: The authenticated caller of a route (a FastAPI dependency).
Caller = Annotated[Principal, Depends(current_principal)]
