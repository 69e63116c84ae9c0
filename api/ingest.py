"""`POST /api/ingest/{topic}` and `POST /api/ingest/siem/wazuh`: events from systems that cannot speak Kafka.

A producer token (`ioc token create --role producer --source NAME --topics T,..`) writes the topics
it names, and for sensors only its stations. Each record is checked by the worker's own parser
(`streams.door`), answered accepted, duplicate or rejected (with the reason), and reported accepted
only once the broker has it (acks=all). Limits: the body size, records per batch, a token bucket
per source (413, 429 with ``Retry-After``), and records in flight per process (429). docs/api.md
("Feeding it from other systems") is the reference.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Annotated, Any, Final, Protocol

import orjson
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials
from prometheus_client import CollectorRegistry, Counter

from api.auth import Principal, _bearer, verify_token
from ioc.errors import AuthError, InvalidEvent
from ioc.ingest import ACK_TIMEOUT_S, DoorProducer, Headers, Overloaded, ingest_counter
from ioc.registry import Registry
from ioc.settings import INPUT_TOPICS, TOPIC_CYBER, TOPIC_SENSOR, Settings
from streams import door, wazuh

log = logging.getLogger(__name__)

NDJSON_TYPES: Final = ("application/x-ndjson", "application/jsonl", "application/ndjson")
#: Seconds a caller is told to wait when this process has too many records in flight.
OVERLOAD_RETRY_AFTER_S: Final = 1


class Sink(Protocol):
    """Where accepted records go (`ioc.ingest.DoorProducer`; a fake in unit tests)."""

    recent: Any
    pending: dict[tuple[str, str], asyncio.Future[Any]]

    def reserve(self, n: int) -> None: ...
    def release(self, n: int) -> None: ...
    async def send(self, topic: str, key: bytes | None, value: bytes, headers: Headers | None = None) -> Any: ...


class TokenBucket:
    """``rate`` records a second on average, ``burst`` at once."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.at = time.monotonic()

    def take(self, n: int, now: float | None = None) -> float:
        """Take ``n`` tokens; 0.0 when done, else the seconds until there will be enough (nothing taken)."""
        now = time.monotonic() if now is None else now
        self.tokens = min(float(self.burst), self.tokens + (now - self.at) * self.rate)
        self.at = now
        if n <= self.tokens:
            self.tokens -= n
            return 0.0
        return (min(n, self.burst) - self.tokens) / self.rate


@dataclass
class Outcome:
    """The answer to one request: a result per record and the HTTP status."""

    results: list[dict[str, Any]] = field(default_factory=list)
    status: int = 200

    def body(self) -> dict[str, Any]:
        counts = {"accepted": 0, "duplicate": 0, "rejected": 0, "failed": 0}
        for r in self.results:
            counts[r["status"]] += 1
        if self.status == 200:
            return {**counts, "results": self.results}
        detail = (
            f"{counts['failed']} records not acknowledged by the broker: send them again"
            if self.status == 503
            else f"the event was rejected: {self.results[0].get('reason', '')}"
        )
        return {"detail": detail, **counts, "results": self.results}


class IngestDoor:
    """The HTTP door: limits, checks, rights, duplicates, then the broker's acknowledgement."""

    def __init__(self, settings: Settings, registry: Registry, sink: Sink | None, counter: Counter) -> None:
        self.settings = settings
        self.registry = registry
        self.sink = sink
        self.counter = counter
        self.buckets: dict[str, TokenBucket] = {}

    def max_body_bytes(self, source: str) -> int:
        own = self.settings.ingest_source_limits.get(source)
        return (own.max_body_bytes if own and own.max_body_bytes else None) or self.settings.ingest_max_body_bytes

    def bucket(self, source: str) -> TokenBucket:
        found = self.buckets.get(source)
        if found is None:
            own = self.settings.ingest_source_limits.get(source)
            rate = (own.rate if own else None) or self.settings.ingest_rate
            burst = (own.burst if own else None) or self.settings.ingest_burst
            found = self.buckets[source] = TokenBucket(rate, burst)
        return found

    def limit_rate(self, source: str, n: int) -> None:
        if n > self.bucket(source).burst:  # would never fit: waiting cannot help
            raise HTTPException(
                413, f"{n} records at once exceed source {source!r}'s burst of {self.bucket(source).burst}"
            )
        wait = self.bucket(source).take(n)
        if wait > 0:
            raise HTTPException(
                429,
                f"source {source!r} is over its rate ({self.bucket(source).rate:g} records/s); retry later",
                headers={"Retry-After": str(max(1, math.ceil(wait)))},
            )

    async def take(self, caller: Principal, topic: str, records: list[bytes], single: bool) -> Outcome:
        """Check every record, send the good ones, wait for the broker; the outcome per record."""
        source = caller.source or caller.subject
        if self.sink is None:
            raise HTTPException(503, "ingest is not connected to the broker")
        self.limit_rate(source, len(records))
        outcome = Outcome()
        now_us = time.time_ns() // 1000
        to_send: list[tuple[int, str, bytes, bytes]] = []
        waiting: list[tuple[int, str, asyncio.Future[Any]]] = []
        in_request: set[str] = set()
        for index, raw in enumerate(records):
            try:
                checked = door.check(topic, raw, self.registry, now_us)
                if topic == TOPIC_SENSOR and not caller.may_report_for(checked.key):
                    raise InvalidEvent(f"this token may not report for station {checked.key!r}", stage="rights")
            except InvalidEvent as exc:
                outcome.results.append(_rejected(index, exc))
                continue
            event_id = checked.event_id
            ident = (topic, event_id)
            if event_id in in_request or ident in self.sink.recent:
                outcome.results.append({"index": index, "event_id": event_id, "status": "duplicate"})
                continue
            in_request.add(event_id)
            pending = self.sink.pending.get(ident)
            if pending is not None:  # the same event_id is being sent for a concurrent request
                waiting.append((index, event_id, pending))
                continue
            to_send.append((index, event_id, checked.key.encode(), raw))
        if to_send:
            try:
                self.sink.reserve(len(to_send))
            except Overloaded as exc:
                raise HTTPException(429, str(exc), headers={"Retry-After": str(OVERLOAD_RETRY_AFTER_S)}) from exc
            try:
                outcome.results += await self._send(topic, to_send)
            finally:
                self.sink.release(len(to_send))
        for index, event_id, pending in waiting:
            outcome.results.append(await _settled(index, event_id, pending, "duplicate"))
        outcome.results.sort(key=lambda r: int(r["index"]))
        by_status = collections.Counter(str(r["status"]) for r in outcome.results)
        for result, n in by_status.items():
            self.counter.labels("http", source, result).inc(n)
        if by_status["failed"]:
            outcome.status = 503
        elif single and by_status["rejected"]:
            outcome.status = 422
        return outcome

    async def _send(self, topic: str, to_send: list[tuple[int, str, bytes, bytes]]) -> list[dict[str, Any]]:
        assert self.sink is not None
        futures: list[tuple[int, str, asyncio.Future[Any]]] = []
        results: list[dict[str, Any]] = []
        for index, event_id, key, raw in to_send:
            try:
                future = await self.sink.send(topic, key, raw)
            except Exception as exc:  # the producer refused the record outright (stopped, too large)
                results.append(_failed(index, event_id, exc))
                continue
            self.sink.pending[(topic, event_id)] = future
            futures.append((index, event_id, future))
        if futures:
            await asyncio.wait([f for _, _, f in futures], timeout=ACK_TIMEOUT_S)
        for index, event_id, future in futures:
            result = await _settled(index, event_id, future, "accepted", wait=False)
            if result["status"] == "accepted":
                self.sink.recent.add((topic, event_id))
            if self.sink.pending.get((topic, event_id)) is future:
                del self.sink.pending[(topic, event_id)]
            results.append(result)
        return results


def _rejected(index: int, exc: InvalidEvent) -> dict[str, Any]:
    result: dict[str, Any] = {"index": index, "status": "rejected", "stage": exc.stage, "reason": str(exc)[:1000]}
    if exc.field:
        result["field"] = exc.field
    return result


def _failed(index: int, event_id: str, exc: BaseException | None) -> dict[str, Any]:
    reason = f"the broker did not acknowledge it ({type(exc).__name__ if exc else 'timeout'}); send it again"
    return {"index": index, "event_id": event_id, "status": "failed", "reason": reason}


async def _settled(
    index: int, event_id: str, future: asyncio.Future[Any], ok: str, *, wait: bool = True
) -> dict[str, Any]:
    if wait and not future.done():
        with contextlib.suppress(TimeoutError, Exception):
            await asyncio.wait_for(asyncio.shield(future), ACK_TIMEOUT_S)
    if not future.done():
        return _failed(index, event_id, None)
    if future.cancelled() or future.exception() is not None:
        return _failed(index, event_id, None if future.cancelled() else future.exception())
    return {"index": index, "event_id": event_id, "status": ok}


async def _producer(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> Principal:
    """The caller of an ingest route: a valid producer token (401 without one, 403 for another role)."""
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise HTTPException(401, "missing bearer token", headers={"WWW-Authenticate": "Bearer"})
    try:
        principal = verify_token(request.app.state.ioc.settings, credentials.credentials)
    except AuthError as exc:
        raise HTTPException(401, str(exc), headers={"WWW-Authenticate": "Bearer"}) from exc
    if principal.role != "producer":
        raise HTTPException(403, "only producer tokens write events (ioc token create --role producer ...)")
    return principal


Producer = Annotated[Principal, Depends(_producer)]


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) one larger than ``limit`` without reading it all."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"body of {declared} bytes exceeds this source's limit of {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"body exceeds this source's limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


SENSOR_EXAMPLE: Final = {
    "schema": "ioc.sensor.v1",
    "event_id": "NA-W-001@2026-12-05T10:00:00+07:00",
    "station_id": "NA-W-001",
    "kind": "water",
    "observed_at": "2026-12-05T10:00:00+07:00",
    "values": {"water_level_m": 3.42},
}
DOSSIER_EXAMPLE: Final = {
    "schema": "ioc.dossier.v1",
    "event_id": "motcua-000.00.16.H40-261205-0001-received",
    "dossier_id": "000.00.16.H40-261205-0001",
    "type": "received",
    "occurred_at": "2026-12-05T08:15:00+07:00",
    "commune_code": "17935",
    "agency_code": "000.00.16.H40",
    "procedure_code": "1.004227",
    "channel": "online",
    "full_online": True,
    "due_at": "2026-12-10T17:00:00+07:00",
}
RESULT_EXAMPLE: Final = {
    "accepted": 1,
    "duplicate": 1,
    "rejected": 1,
    "failed": 0,
    "results": [
        {"index": 0, "event_id": "motcua-1", "status": "accepted"},
        {"index": 1, "event_id": "motcua-1", "status": "duplicate"},
        {
            "index": 2,
            "status": "rejected",
            "stage": "schema",
            "reason": "Object missing required field `occurred_at`",
        },
    ],
}
REJECTED_EXAMPLE: Final = {
    "detail": "the event was rejected: channel: required on a received event",
    "accepted": 0,
    "duplicate": 0,
    "rejected": 1,
    "failed": 0,
    "results": [
        {
            "index": 0,
            "status": "rejected",
            "stage": "validate",
            "field": "channel",
            "reason": "channel: required on a received event",
        }
    ],
}
FAILED_EXAMPLE: Final = {
    "detail": "1 records not acknowledged by the broker: send them again",
    "accepted": 0,
    "duplicate": 0,
    "rejected": 0,
    "failed": 1,
    "results": [
        {
            "index": 0,
            "event_id": "motcua-1",
            "status": "failed",
            "reason": "the broker did not acknowledge it (KafkaTimeoutError); send it again",
        }
    ],
}
WAZUH_EXAMPLE: Final = {
    "timestamp": "2026-12-05T03:04:05.123+0000",
    "rule": {
        "level": 10,
        "description": "sshd: brute force trying to get access to the system.",
        "id": "5712",
        "groups": ["syslog", "sshd", "authentication_failures"],
    },
    "agent": {"id": "003", "name": "dichvucong.nghean.gov.vn"},
    "manager": {"name": "wazuh-manager"},
    "id": "1764903845.1234567",
    "data": {"srcip": "203.0.113.9"},
}


def _error(*codes: int) -> dict[int | str, dict[str, Any]]:
    text = {
        400: "The body holds no record.",
        401: "No valid bearer token.",
        403: "Not a producer token, or a topic this token may not write.",
        404: "Not one of the three input topics.",
        413: "Body or batch over the limits (`IOC_INGEST_MAX_BODY_BYTES`, `IOC_INGEST_MAX_RECORDS`).",
        415: "Content-Type is neither application/json nor application/x-ndjson.",
        429: "Over the source's rate, or this process has too many records in flight: retry after `Retry-After` s.",
    }
    return {c: {"description": text[c], "content": {"application/json": {"example": {"detail": "..."}}}} for c in codes}


def ingest_router(door_: IngestDoor, producer: DoorProducer | None) -> APIRouter:
    """The ingest routes; the router's lifespan starts and stops ``producer`` (None: not connected)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if producer is not None:
            await producer.start(in_background=True)
            door_.sink = producer
        try:
            yield
        finally:
            if producer is not None:
                await producer.stop()

    router = APIRouter(lifespan=lifespan, tags=["ingest"])
    outcome_responses: dict[int | str, dict[str, Any]] = {
        200: {
            "description": "Every record answered: accepted (the broker has it), duplicate, or rejected with the reason.",
            "content": {"application/json": {"example": RESULT_EXAMPLE}},
        },
        422: {
            "description": "The single JSON event was rejected (the reason is in `results`).",
            "content": {"application/json": {"example": REJECTED_EXAMPLE}},
        },
        503: {
            "description": "The broker did not acknowledge some records (`failed`): send them again.",
            "content": {"application/json": {"example": FAILED_EXAMPLE}},
        },
    }

    @router.post(
        "/api/ingest/siem/wazuh",
        response_model=None,
        responses={**outcome_responses, **_error(401, 403, 413, 415, 429)},
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": {"type": "object"}, "example": WAZUH_EXAMPLE}},
            }
        },
    )
    async def wazuh_alert(
        request: Request,
        caller: Producer,
        agency_code: Annotated[str | None, Query(max_length=100, description="owner of the systems")] = None,
        commune_code: Annotated[str | None, Query(max_length=5)] = None,
        system_level: Annotated[int | None, Query(ge=1, le=5, description="Decree 85/2016 level")] = None,
    ) -> JSONResponse:
        """One Wazuh alert (the integrator's JSON alert, raw or wrapped as Shuffle's `all_fields`) as an
        `ioc.incident.v1` `detected` event; needs a token that may write `ioc.cyber.incidents`.

        Mapping (docs/api.md): `rule.level` 0-6 low, 7-11 medium, 12-14 high, 15+ critical; `rule.groups`
        to the category; `agent.name` the system; `data.srcip` the source IP; the incident id is
        `wazuh:<manager.name>:<id>`."""
        if not caller.may_write(TOPIC_CYBER):
            raise HTTPException(403, f"this token may not write {TOPIC_CYBER}")
        if _media_type(request) != "application/json":
            raise HTTPException(415, "a Wazuh alert is application/json")
        source = caller.source or caller.subject
        body = await _read_body(request, door_.max_body_bytes(source))
        try:
            alert = orjson.loads(body)
            record = wazuh.incident_from_alert(
                alert, agency_code=agency_code, commune_code=commune_code, system_level=system_level
            )
        except orjson.JSONDecodeError as exc:
            return _single_rejected(door_, source, InvalidEvent(f"not valid JSON: {exc}", stage="decode"))
        except InvalidEvent as exc:
            return _single_rejected(door_, source, exc)
        outcome = await door_.take(caller, TOPIC_CYBER, [record], single=True)
        return JSONResponse(outcome.body(), status_code=outcome.status, headers=_retry(outcome))

    @router.post(
        "/api/ingest/{topic}",
        response_model=None,
        responses={**outcome_responses, **_error(400, 401, 403, 404, 413, 415, 429)},
        openapi_extra={
            "requestBody": {
                "required": True,
                "description": "One event (application/json) or an NDJSON batch (application/x-ndjson), one event a line.",
                "content": {
                    "application/json": {
                        "schema": {"type": "object"},
                        "examples": {
                            "dossier": {"summary": "a dossier received", "value": DOSSIER_EXAMPLE},
                            "sensor": {"summary": "a water level reading", "value": SENSOR_EXAMPLE},
                        },
                    },
                    "application/x-ndjson": {
                        "schema": {"type": "string"},
                        "example": orjson.dumps(DOSSIER_EXAMPLE).decode()
                        + "\n"
                        + orjson.dumps({**DOSSIER_EXAMPLE, "event_id": "motcua-2", "type": "processing"}).decode()
                        + "\n",
                    },
                },
            }
        },
    )
    async def ingest(request: Request, topic: str, caller: Producer) -> JSONResponse:
        """Events for one input topic (`ioc.dossier.events`, `ioc.cyber.incidents`, `ioc.sensor.readings`).

        Each record is checked as the stream worker checks it and answered `accepted` (the broker has
        it, acks=all), `duplicate` (its event_id was accepted recently, or earlier in this batch) or
        `rejected` (with `reason`, `stage`, `field`); rejected records never reach the topic. Limits:
        the body (`IOC_INGEST_MAX_BODY_BYTES`, 413), records per batch (`IOC_INGEST_MAX_RECORDS`, 413),
        64 KiB per record (rejected), a token bucket per source (429 with `Retry-After`)."""
        if topic not in INPUT_TOPICS:
            raise HTTPException(404, f"no input topic {topic[:100]!r}; one of {', '.join(INPUT_TOPICS)}")
        if not caller.may_write(topic):
            raise HTTPException(403, f"this token may not write {topic}")
        media = _media_type(request)
        if media != "application/json" and media not in NDJSON_TYPES:
            raise HTTPException(415, "send application/json (one event) or application/x-ndjson (a batch)")
        source = caller.source or caller.subject
        body = await _read_body(request, door_.max_body_bytes(source))
        single = media == "application/json"
        records = [body.strip()] if single else door.split_ndjson(body)
        if not records or records == [b""]:
            raise HTTPException(400, "no records in the body")
        limit = door_.settings.ingest_max_records
        if len(records) > limit:
            raise HTTPException(413, f"{len(records)} records in one batch; at most {limit}")
        outcome = await door_.take(caller, topic, records, single=single)
        return JSONResponse(outcome.body(), status_code=outcome.status, headers=_retry(outcome))

    return router


def _single_rejected(door_: IngestDoor, source: str, exc: InvalidEvent) -> JSONResponse:
    door_.counter.labels("http", source, "rejected").inc()
    return JSONResponse(Outcome([_rejected(0, exc)], status=422).body(), status_code=422)


def _retry(outcome: Outcome) -> dict[str, str] | None:
    return {"Retry-After": "1"} if outcome.status == 503 else None


def install(
    app: FastAPI, settings: Settings, registry: Registry, metrics_registry: CollectorRegistry, *, connect: bool
) -> IngestDoor:
    """Add the ingest routes to ``app`` (the hook `api.app.create_app` calls); with ``connect`` a producer
    is started with the app."""
    door_ = IngestDoor(settings, registry, None, ingest_counter(metrics_registry))
    producer = DoorProducer(settings, "ioc-api-ingest") if connect else None
    app.include_router(ingest_router(door_, producer))
    return door_
