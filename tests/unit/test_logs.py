"""Repeated third-party log lines (a broker outage) are collapsed, with a count of what was held back."""

from __future__ import annotations

import logging

from ioc.logs import RepeatFilter


def _record(name: str, msg: str, *args: object) -> logging.LogRecord:
    return logging.LogRecord(name, logging.ERROR, __file__, 1, msg, args, None)


def test_one_line_per_template_per_window_then_the_count_of_held_back_ones() -> None:
    now = [0.0]
    f = RepeatFilter(window_s=10.0, clock=lambda: now[0])
    passed = []
    for i in range(500):
        now[0] = i * 0.05  # 25 s of a line every 50 ms, with changing arguments
        rec = _record("aiokafka.conn", "Unable connect to node with id %s: %s", 111, i)
        if f.filter(rec):
            passed.append((now[0], rec.getMessage()))
    assert [t for t, _ in passed] == [0.0, 10.0, 20.0]
    assert passed[0][1] == "Unable connect to node with id 111: 0"
    assert passed[1][1].endswith("(199 similar messages in the last 10 s not shown)")


def test_our_own_loggers_and_other_templates_are_never_held_back() -> None:
    f = RepeatFilter(window_s=10.0, clock=lambda: 1.0)
    assert all(f.filter(_record("streams.worker", "writing state failed")) for _ in range(5))
    assert f.filter(_record("aiokafka", "first template"))
    assert f.filter(_record("aiokafka", "second template"))
    assert not f.filter(_record("aiokafka", "first template"))
