"""Throwaway local services for `ioc dev` and the tests: a Kafka broker and a PostgreSQL.

Modules
    kafka       EmbeddedKafka (Apache Kafka 4.x, KRaft, one node; jars pinned by kafka-pom.xml)
    broker      embedded_broker (Kafka, or the `tansu` fallback: EmbeddedTansu), create_topics, ensure_topics
    postgres    EmbeddedPostgres (a temporary cluster from the server binaries, TimescaleDB preloaded
                where installed), create_database

This package holds the few process helpers both share: a free loopback port, a child that dies
with its parent, and the tail of a log file for error messages.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that is free now (the caller retries if it loses the race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_open(host: str, port: int, timeout: float = 0.25) -> bool:
    """Whether a TCP connection to ``host:port`` succeeds."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def die_with_parent(sig: signal.Signals = signal.SIGTERM) -> Callable[[], None] | None:
    """A ``preexec_fn``: Linux sends ``sig`` to the child when its parent dies (None elsewhere).

    It must run after any uid change (``Popen(user=...)`` does that before ``preexec_fn``):
    the kernel clears the parent-death signal when credentials change. Linux tracks the
    parent *thread*, so services must be started from a thread that lives as long as they do.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:  # pragma: no cover - no libc to load
        return None
    parent = os.getpid()

    def _preexec() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        # The parent may have died between fork() and prctl(): then nobody would signal us.
        if os.getppid() != parent:
            os._exit(1)

    return _preexec


def log_tail(path: Path, lines: int = 30) -> str:
    """The last ``lines`` lines of a log file (empty when it cannot be read)."""
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 64 * 1024))
            text = fh.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])
