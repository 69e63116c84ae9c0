"""Security-operations incidents: the province's information systems and seeded lifecycles."""

from __future__ import annotations

import bisect
import datetime as dt
import heapq
import ipaddress
import itertools
import logging
import random
import unicodedata
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

from ioc.contract import INCIDENT_SEVERITIES
from ioc.registry import Unit
from ioc.settings import TOPIC_CYBER
from simulators.envelope import VN_TZ, Event, event_id, iso, lognormal_minutes, poisson_arrivals

logger = logging.getLogger(__name__)

SCHEMA = "ioc.incident.v1"


@dataclass(frozen=True, slots=True)
class InformationSystem:
    """A system watched by the provincial SOC, graded per Decree 85/2016 (levels 1–5)."""

    system: str
    level: int
    agency_code: str
    commune_code: str | None = None


#: Provincial systems and their owners (agency codes of ``ioc/data/agencies.csv``).
PROVINCIAL_SYSTEMS: tuple[InformationSystem, ...] = (
    InformationSystem("dichvucong.nghean.gov.vn", 3, "000.00.08.H40"),
    InformationSystem("motcua.nghean.gov.vn", 3, "000.00.08.H40"),
    InformationSystem("lgsp.nghean.gov.vn", 3, "000.00.08.H40"),
    InformationSystem("ioc.nghean.gov.vn", 3, "000.00.08.H40"),
    InformationSystem("datacenter.nghean.gov.vn", 4, "000.00.08.H40"),
    InformationSystem("mail.nghean.gov.vn", 3, "000.00.08.H40"),
    InformationSystem("nghean.gov.vn", 2, "000.00.01.H40"),
    InformationSystem("qlvb.nghean.gov.vn", 3, "000.00.01.H40"),
    InformationSystem("hopkhongiay.nghean.gov.vn", 2, "000.00.01.H40"),
    InformationSystem("baocao.nghean.gov.vn", 2, "000.00.01.H40"),
    InformationSystem("stp.nghean.gov.vn", 2, "000.00.03.H40"),
    InformationSystem("hotich.nghean.gov.vn", 3, "000.00.03.H40"),
    InformationSystem("stc.nghean.gov.vn", 2, "000.00.04.H40"),
    InformationSystem("sct.nghean.gov.vn", 1, "000.00.05.H40"),
    InformationSystem("snnmt.nghean.gov.vn", 2, "000.00.06.H40"),
    InformationSystem("dodac.nghean.gov.vn", 3, "000.00.06.H40"),
    InformationSystem("sxd.nghean.gov.vn", 2, "000.00.07.H40"),
    InformationSystem("skhcn.nghean.gov.vn", 2, "000.00.08.H40"),
    InformationSystem("nghean.edu.vn", 2, "000.00.09.H40"),
    InformationSystem("syt.nghean.gov.vn", 2, "000.00.10.H40"),
    InformationSystem("hssk.nghean.gov.vn", 4, "000.00.10.H40"),
    InformationSystem("svhttdl.nghean.gov.vn", 1, "000.00.11.H40"),
    InformationSystem("dulichnghean.vn", 1, "000.00.11.H40"),
    InformationSystem("thanhtra.nghean.gov.vn", 2, "000.00.13.H40"),
    InformationSystem("dsez.nghean.gov.vn", 2, "000.00.14.H40"),
)

#: (category, weight in normal operation).
CATEGORY_WEIGHTS: tuple[tuple[str, float], ...] = (
    ("phishing", 20),
    ("malware", 18),
    ("brute_force", 18),
    ("vulnerability", 15),
    ("intrusion", 7),
    ("ddos", 6),
    ("defacement", 5),
    ("data_leak", 3),
    ("other", 8),
)
#: Base severity weights (low, medium, high, critical) by category.
SEVERITY_WEIGHTS: Mapping[str, tuple[float, float, float, float]] = {
    "phishing": (40, 45, 13, 2),
    "malware": (25, 45, 25, 5),
    "brute_force": (45, 40, 13, 2),
    "vulnerability": (30, 40, 25, 5),
    "intrusion": (5, 30, 45, 20),
    "ddos": (10, 35, 40, 15),
    "defacement": (5, 25, 50, 20),
    "data_leak": (0, 20, 50, 30),
    "other": (50, 40, 9, 1),
}
TITLES: Mapping[str, str] = {
    "phishing": "Thư điện tử giả mạo (phishing) gửi tới người dùng {system}",
    "malware": "Phát hiện mã độc trên máy trạm kết nối {system}",
    "brute_force": "Dò quét mật khẩu (brute force) vào tài khoản quản trị {system}",
    "vulnerability": "Lỗ hổng bảo mật chưa vá trên {system}",
    "intrusion": "Dấu hiệu xâm nhập trái phép vào {system}",
    "ddos": "Tấn công từ chối dịch vụ (DDoS) vào {system}",
    "defacement": "Thay đổi giao diện trái phép (deface) trang {system}",
    "data_leak": "Nghi lộ lọt dữ liệu từ {system}",
    "other": "Sự kiện an toàn thông tin bất thường trên {system}",
}
#: Median minutes detected → acknowledged by severity (critical fastest).
MTTA_MEDIAN_MIN: Mapping[str, float] = {"critical": 3, "high": 12, "medium": 40, "low": 120}
#: Median minutes acknowledged → resolved by severity.
MTTR_MEDIAN_MIN: Mapping[str, float] = {"critical": 150, "high": 240, "medium": 360, "low": 600}
P_FALSE_POSITIVE = 0.12
P_ESCALATED = 0.05
#: Categories whose source is an outside address; others carry no address or an internal one.
EXTERNAL_SOURCE = frozenset({"ddos", "brute_force", "intrusion", "phishing", "defacement"})
EVENTS_PER_INCIDENT = 3.5  # detected, acknowledged, contained (about half), resolved or false_positive


def ascii_slug(name: str) -> str:
    """``Phường Thành Vinh`` → ``thanhvinh`` (diacritics and the unit word dropped)."""
    for prefix in ("Phường ", "Xã "):
        name = name.removeprefix(prefix)
    plain = unicodedata.normalize("NFD", name.replace("Đ", "D").replace("đ", "d"))
    return "".join(c for c in plain if c.isascii() and c.isalnum()).lower()


def commune_portals(units: Mapping[str, Unit], agency_of: Mapping[str, str]) -> list[InformationSystem]:
    """Each commune's web portal (level 1), owned by its UBND."""
    return [
        InformationSystem(f"{ascii_slug(u.name)}.nghean.gov.vn", 1, agency_of[code], code)
        for code, u in sorted(units.items())
        if code in agency_of
    ]


@dataclass(frozen=True, slots=True)
class IncidentConditions:
    """How a scenario bends incident traffic at one moment."""

    rate_factor: float = 1.0
    #: Extra DDoS incidents per second, spread over ``ddos_targets`` (each hit once before repeats).
    ddos_rate_per_s: float = 0.0
    ddos_targets: tuple[str, ...] = field(default=())


NORMAL = IncidentConditions()


def random_public_ip(rng: random.Random) -> str:
    """A global unicast address (about 1 in 12 IPv6), never private, reserved or documentation."""
    if rng.random() < 0.08:
        return str(ipaddress.IPv6Address((0x2000 + rng.randrange(0x1000)) << 112 | rng.getrandbits(112)))
    while True:
        address = ipaddress.IPv4Address(rng.getrandbits(32))
        if address.is_global and not address.is_multicast:
            return str(address)


class IncidentSimulator:
    """Seeded SOC traffic: Poisson detections over the watched systems, lifecycles scheduled ahead.

    Pure: no clock, no I/O. A scenario adds DDoS waves through ``conditions``; they stop at
    ``ddos_ends`` (no waves when it is None).
    """

    def __init__(
        self,
        rng: random.Random,
        systems: list[InformationSystem],
        *,
        incidents_per_s: float,
        conditions: Callable[[dt.datetime], IncidentConditions] = lambda _t: NORMAL,
        peak_rate_factor: float = 1.0,
        peak_ddos_rate_per_s: float = 0.0,
        ddos_ends: dt.datetime | None = None,
    ) -> None:
        self.rng = rng
        self.systems = systems
        self.by_name = {s.system: s for s in systems}
        self.incidents_per_s = incidents_per_s
        self.conditions = conditions
        self.peak_rate_factor = max(1.0, peak_rate_factor)
        self.peak_ddos_rate_per_s = peak_ddos_rate_per_s
        self.ddos_ends = ddos_ends
        # Provincial systems are attacked more often than a commune's small portal.
        self._system_weights = list(itertools.accumulate(6.0 if s.commune_code is None else 0.5 for s in systems))
        self._categories = [c for c, _ in CATEGORY_WEIGHTS]
        self._category_cum = list(itertools.accumulate(w for _, w in CATEGORY_WEIGHTS))
        self._serial = 0
        self._ddos_queue: list[str] = []
        self._botnet = [random_public_ip(rng) for _ in range(12)]

    def events(
        self, start: dt.datetime, until: dt.datetime | None = None, *, follow_up: bool = False
    ) -> Iterator[Event]:
        """Contract events in event-time order: incidents detected until ``until``, their later steps
        dropped, or with ``follow_up`` going on past it (as `DossierSimulator.events`)."""
        normal = poisson_arrivals(
            self.rng,
            start,
            self.incidents_per_s * self.peak_rate_factor,
            lambda t: self.incidents_per_s * self.conditions(t).rate_factor,
            ends=until,
        )
        waves_end = min((t for t in (until, self.ddos_ends) if t is not None), default=start)
        waves = poisson_arrivals(
            self.rng,
            start,
            self.peak_ddos_rate_per_s,
            lambda t: self.conditions(t).ddos_rate_per_s,
            ends=waves_end,
        )
        sources: list[tuple[dt.datetime, int, Iterator[dt.datetime]]] = []
        for n, arrivals in enumerate((normal, waves)):
            first = next(arrivals, None)
            if first is not None:
                sources.append((first, n, arrivals))
        heapq.heapify(sources)
        pending: list[tuple[dt.datetime, int, list[tuple[dt.datetime, dict[str, object]]]]] = []
        tiebreak = itertools.count()
        while True:
            if sources and (not pending or sources[0][0] <= pending[0][0]):
                at, n, arrivals = heapq.heappop(sources)
                if until is not None and at > until:
                    continue
                steps = self._new_incident(at, None if follow_up else until, wave=n == 1)
                if steps:
                    heapq.heappush(pending, (steps[0][0], next(tiebreak), steps))
                following = next(arrivals, None)
                if following is not None:
                    heapq.heappush(sources, (following, n, arrivals))
                continue
            if not pending:
                return
            at, _, steps = heapq.heappop(pending)
            _, value = steps.pop(0)
            value = {"schema": SCHEMA, "event_id": event_id(self.rng), **value}
            yield Event(TOPIC_CYBER, str(value["incident_id"]), at, value)
            if steps:
                heapq.heappush(pending, (steps[0][0], next(tiebreak), steps))

    def _pick_system(self, at: dt.datetime, wave: bool) -> InformationSystem:
        if wave:
            if not self._ddos_queue:
                targets = [t for t in self.conditions(at).ddos_targets if t in self.by_name]
                self._ddos_queue = self.rng.sample(targets, len(targets))
            if self._ddos_queue:
                return self.by_name[self._ddos_queue.pop()]
        index = min(
            len(self.systems) - 1,
            bisect.bisect_right(self._system_weights, self.rng.random() * self._system_weights[-1]),
        )
        return self.systems[index]

    def _new_incident(
        self, detected: dt.datetime, until: dt.datetime | None, *, wave: bool
    ) -> list[tuple[dt.datetime, dict[str, object]]]:
        rng = self.rng
        system = self._pick_system(detected, wave)
        if wave:
            category = "ddos"
            severity = "critical" if rng.random() < 0.45 or system.level >= 3 else "high"
        else:
            category = self._categories[
                min(
                    len(self._categories) - 1,
                    bisect.bisect_right(self._category_cum, rng.random() * self._category_cum[-1]),
                )
            ]
            weights = list(SEVERITY_WEIGHTS[category])
            if system.level >= 3:  # the same attack matters more on a higher-level system
                weights = [weights[0] * 0.5, weights[1], weights[2] * 1.3, weights[3] * 1.6]
            severity = rng.choices(INCIDENT_SEVERITIES, weights=weights, k=1)[0]
        self._serial += 1
        incident_id = f"SOC-H40-{detected.astimezone(VN_TZ):%y%m%d}-{self._serial:05d}"
        if category in EXTERNAL_SOURCE:
            source_ip: str | None = rng.choice(self._botnet) if wave else random_public_ip(rng)
        elif category == "malware":
            source_ip = f"10.{rng.randrange(40, 60)}.{rng.randrange(256)}.{rng.randrange(1, 255)}"
        else:
            source_ip = None
        base: dict[str, object] = {
            "incident_id": incident_id,
            "severity": severity,
            "category": category,
            "system": system.system,
            "system_level": system.level,
            "agency_code": system.agency_code,
            "commune_code": system.commune_code,
            "source_ip": source_ip,
            "title": TITLES[category].format(system=system.system)[:500],
        }

        def step(at: dt.datetime, kind: str, **extra: object) -> tuple[dt.datetime, dict[str, object]]:
            return at, {
                "incident_id": incident_id,
                "type": kind,
                "occurred_at": iso(at),
                **base,
                **extra,
            }

        steps = [step(detected, "detected")]
        t = detected + lognormal_minutes(rng, MTTA_MEDIAN_MIN[severity], 0.7)
        if rng.random() < P_ESCALATED and severity != "critical":
            severity = INCIDENT_SEVERITIES[INCIDENT_SEVERITIES.index(severity) + 1]
            steps.append(step(t, "acknowledged", severity=severity))
        else:
            steps.append(step(t, "acknowledged"))
        if not wave and rng.random() < P_FALSE_POSITIVE:
            steps.append(step(t + lognormal_minutes(rng, 30, 0.8), "false_positive", severity=severity))
        else:
            repair = lognormal_minutes(rng, MTTR_MEDIAN_MIN[severity], 0.6)
            if category in {
                "ddos",
                "malware",
                "intrusion",
                "defacement",
                "data_leak",
                "brute_force",
            }:
                steps.append(step(t + repair * rng.uniform(0.1, 0.4), "contained", severity=severity))
            steps.append(step(t + repair, "resolved", severity=severity))
        if until is not None:
            steps = [s for s in steps if s[0] <= until]
        return steps
