"""Logging, configured once by each entrypoint: plain text for people, JSON lines for machines."""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
import time
from collections.abc import Callable

from ioc.settings import Settings

#: Record attributes copied into JSON logs when a call passes them through ``extra=``.
CONTEXT_FIELDS = ("event_id", "topic", "partition", "offset", "component")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in CONTEXT_FIELDS:
            if hasattr(record, name):
                doc[name] = getattr(record, name)
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False)


class RepeatFilter(logging.Filter):
    """Lets one record per (logger, message template) through every ``window_s``; the next one to
    pass says how many were held back. An unreachable broker makes aiokafka log the same line
    hundreds of times a second; an outage should cost a line every few seconds, not the disk."""

    def __init__(
        self,
        window_s: float = 10.0,
        prefixes: tuple[str, ...] = ("aiokafka", "kafka", "psycopg"),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.clock = clock
        self.window_s = window_s
        self.prefixes = prefixes
        self._seen: dict[tuple[str, object], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(self.prefixes):
            return True
        key = (record.name, record.msg)
        now = self.clock()
        seen = self._seen.get(key)
        since, held = seen if seen is not None else (now - self.window_s, 0)
        if now - since < self.window_s:
            self._seen[key] = (since, held + 1)
            return False
        if len(self._seen) > 1000:
            self._seen.clear()
        self._seen[key] = (now, 0)
        if held:
            record.msg = f"{record.msg} ({held} similar messages in the last {self.window_s:.0f} s not shown)"
        return True


def configure_logging(settings: Settings) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RepeatFilter())
    if settings.log_json:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level.upper())
    # Third-party chatter stays at WARNING unless asked for.
    for noisy in ("aiokafka", "faust", "mode", "kafka", "uvicorn.access", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
