"""The WebSocket fan-out: serialise once, coalescing bounded queues, slow clients, resume."""

from __future__ import annotations

import json
from typing import Any

import pytest

from api.auth import Principal
from api.broadcaster import Broadcaster, Subscriber
from api.live import LiveState, item_filter
from tests.factories import snap


def frames(sub: Subscriber) -> list[dict[str, Any]]:
    return [json.loads(f) for f in sub.drain()]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_message_is_serialised_once_for_every_subscriber() -> None:
    b = Broadcaster(seq_origin=0)
    subs = [b.connect() for _ in range(3)]
    for s in subs:
        b.subscribe(s, "kpi:province", list)
        s.drain()
    b.publish("kpi:province", {"v": 1}, key="k")
    texts = [s.drain()[0] for s in subs]
    assert texts[0] is texts[1] is texts[2]
    assert json.loads(texts[0]) == {
        "type": "update",
        "channel": "kpi:province",
        "item": {"v": 1},
        "seq": 1,
    }


def test_subscribe_answers_with_snapshot_then_updates_in_seq_order() -> None:
    b = Broadcaster(seq_origin=100)
    b.publish("kpi:province", {"v": 0}, key="a")
    sub = b.connect()
    b.subscribe(sub, "kpi:province", lambda: [{"v": 0}])
    b.publish("kpi:province", {"v": 1}, key="a")
    got = frames(sub)
    assert got[0] == {
        "type": "snapshot",
        "channel": "kpi:province",
        "items": [{"v": 0}],
        "seq": 101,
    }
    assert got[1]["type"] == "update" and got[1]["seq"] == 102


def test_seq_is_per_channel() -> None:
    b = Broadcaster(seq_origin=0)
    assert b.publish("kpi:province", 1) == 1
    assert b.publish("kpi:province", 2) == 2
    assert b.publish("kpi:commune:16681", 3) == 1


def test_pending_updates_of_one_kpi_are_coalesced_newest_wins() -> None:
    b = Broadcaster(seq_origin=0)
    sub = b.connect()
    b.subscribe(sub, "kpi:province", list)
    sub.drain()
    b.publish("kpi:province", {"v": 1}, key="a")
    b.publish("kpi:province", {"v": 1}, key="b")
    b.publish("kpi:province", {"v": 2}, key="a")
    got = frames(sub)
    assert [(m["item"]["v"], m["seq"]) for m in got] == [(1, 2), (2, 3)]
    assert sub.coalesced == 1


def test_messages_without_a_key_are_never_coalesced() -> None:
    b = Broadcaster(seq_origin=0)
    sub = b.connect()
    b.subscribe(sub, "alerts", list)
    sub.drain()
    for i in range(3):
        b.publish("alerts", {"i": i}, kind="alert")
    assert [m["item"]["i"] for m in frames(sub)] == [0, 1, 2]


def test_queue_is_bounded_and_an_overflowing_client_is_disconnected() -> None:
    b = Broadcaster(seq_origin=0, max_queue=5)
    slow, fast = b.connect(), b.connect()
    for s in (slow, fast):
        b.subscribe(s, "kpi:province", list)
        s.drain()
    for i in range(10):
        b.publish("kpi:province", {"i": i}, key=f"k{i}")
        fast.drain()
        assert len(slow) <= 5
    assert slow.closed is not None
    assert fast.closed is None
    assert b.subscriber_count == 1
    assert b.disconnected_slow == 1


def test_coalescing_keeps_a_slow_client_within_bounds() -> None:
    b = Broadcaster(seq_origin=0, max_queue=5)
    sub = b.connect()
    b.subscribe(sub, "kpi:province", list)
    sub.drain()
    for i in range(1000):
        b.publish("kpi:province", {"i": i}, key=f"k{i % 3}")
    assert sub.closed is None
    assert [m["item"]["i"] for m in frames(sub)] == [997, 998, 999]


def test_client_that_makes_no_progress_for_too_long_is_disconnected() -> None:
    clock = Clock()
    b = Broadcaster(seq_origin=0, max_lag_s=30, clock=clock)
    stuck, healthy = b.connect(), b.connect()
    for s in (stuck, healthy):
        b.subscribe(s, "kpi:province", list)
        s.drain()
    for second in range(0, 40, 5):
        clock.now = float(second)
        b.publish("kpi:province", {"t": second}, key="a")
        healthy.drain()
    assert stuck.closed is not None and "progress" in stuck.closed
    assert healthy.closed is None


def test_publish_never_waits_for_a_closed_client() -> None:
    b = Broadcaster(seq_origin=0)
    sub = b.connect()
    b.subscribe(sub, "kpi:province", list)
    sub.close("gone")
    b.publish("kpi:province", {"v": 1}, key="a")
    assert b.subscriber_count == 0


def test_resume_replays_what_was_missed() -> None:
    b = Broadcaster(seq_origin=0)
    for i in range(1, 6):
        b.publish("kpi:province", {"i": i}, key=f"k{i}")
    sub = b.connect()
    assert b.subscribe(sub, "kpi:province", list, resume_from=3) == "replayed"
    got = frames(sub)
    assert got[0]["type"] == "resumed" and got[0]["recovered"] is True and got[0]["replayed"] == 2
    assert [m["seq"] for m in got[1:]] == [4, 5]


def test_resume_at_the_current_seq_replays_nothing() -> None:
    b = Broadcaster(seq_origin=0)
    b.publish("kpi:province", {"i": 1}, key="a")
    sub = b.connect()
    assert b.subscribe(sub, "kpi:province", list, resume_from=1) == "replayed"
    got = frames(sub)
    assert len(got) == 1 and got[0]["replayed"] == 0


@pytest.mark.parametrize("position", [1, 2, 50, -7])
def test_resume_beyond_history_sends_a_fresh_snapshot_not_recovered(position: int) -> None:
    b = Broadcaster(seq_origin=0, history_size=3)
    for i in range(1, 11):
        b.publish("kpi:province", {"i": i}, key="a")
    sub = b.connect()
    assert b.subscribe(sub, "kpi:province", lambda: [{"i": 10}], resume_from=position) == "not_recovered"
    (got,) = frames(sub)
    assert got == {
        "type": "snapshot",
        "channel": "kpi:province",
        "items": [{"i": 10}],
        "seq": 10,
        "recovered": False,
    }


def test_seq_of_a_new_process_starts_far_from_zero() -> None:
    assert Broadcaster().seq("kpi:province") > 1_000_000_000_000


def test_security_sees_only_cyber_updates_on_the_province_channel() -> None:
    b = Broadcaster(seq_origin=0)
    live = LiveState(b)
    security = Principal("sec", "security")
    sub = b.connect()
    b.subscribe(
        sub,
        "kpi:province",
        live.snapshot_items("kpi:province", security),
        accept=item_filter("kpi:province", security),
    )
    sub.drain()
    live.apply_snapshot(snap("dossier.received"))
    live.apply_snapshot(snap("cyber.open", window="now"))
    assert [m["item"]["kpi"] for m in frames(sub)] == ["cyber.open"]
    later = b.connect()
    b.subscribe(
        later,
        "kpi:province",
        live.snapshot_items("kpi:province", security),
        accept=item_filter("kpi:province", security),
        resume_from=0,
    )
    got = frames(later)
    assert [m["item"]["kpi"] for m in got[1:]] == ["cyber.open"]
    fresh = b.connect()
    b.subscribe(fresh, "kpi:province", live.snapshot_items("kpi:province", security))
    assert [i["kpi"] for i in frames(fresh)[0]["items"]] == ["cyber.open"]


def test_live_state_ignores_an_older_seq_of_the_same_kpi() -> None:
    b = Broadcaster(seq_origin=0)
    live = LiveState(b)
    assert live.apply_snapshot(snap(value=5, seq=10))
    assert not live.apply_snapshot(snap(value=4, seq=9))
    assert not live.apply_snapshot(snap(value=5, seq=10))
    assert [s.value for s in live.table.in_scope("province")] == [5]
    assert b.seq("kpi:province") == 1


def test_snapshot_goes_to_the_channel_of_its_scope() -> None:
    b = Broadcaster(seq_origin=0)
    live = LiveState(b)
    live.apply_snapshot(snap(scope="commune:16681"))
    (message,) = b.history("kpi:commune:16681")
    item = json.loads(message.text)["item"]
    assert item["scope"] == "commune:16681" and item["as_of"] == "2026-11-22T08:15:00+07:00"
    assert b.history("kpi:province") == []


def test_alert_snapshot_and_stream_are_filtered_for_a_commune() -> None:
    b = Broadcaster(seq_origin=0)
    live = LiveState(b)
    commune = Principal("c", "commune", "16681")
    live.apply_alert({"kpi": "water.alarm_level", "scope": "commune:16690", "state": "fired"})
    live.apply_alert({"kpi": "water.alarm_level", "scope": "commune:16681", "state": "fired"})
    sub = b.connect()
    b.subscribe(sub, "alerts", live.snapshot_items("alerts", commune), accept=item_filter("alerts", commune))
    live.apply_alert({"kpi": "water.alarm_level", "scope": "commune:16690", "state": "resolved"})
    live.apply_alert({"kpi": "water.alarm_level", "scope": "commune:16681", "state": "resolved"})
    got = frames(sub)
    assert [a["scope"] for a in got[0]["items"]] == ["commune:16681"]
    assert [(m["type"], m["item"]["state"]) for m in got[1:]] == [("alert", "resolved")]
