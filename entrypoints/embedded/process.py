"""What the embedded broker and PostgreSQL share: a child process with a log file in a temp dir."""

from __future__ import annotations

import logging
import shutil
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import IO, Self

from entrypoints.embedded import log_tail
from ioc.errors import EmbeddedServiceError

log = logging.getLogger(__name__)


class EmbeddedProcess:
    """A service run as a child process; ``stop()`` ends it and removes its temp dir.

    Subclasses implement ``start()`` and set ``name``, ``stop_signal`` (how the service wants to be
    asked to stop) and ``stop_timeout`` (after which it is killed).
    """

    name = "embedded service"
    stop_signal = signal.SIGTERM
    stop_timeout = 5.0

    def __init__(self, *, host: str, start_timeout: float) -> None:
        self.host = host
        self.start_timeout = start_timeout
        self._port: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None
        self._tmp: Path | None = None

    @property
    def log_path(self) -> Path:
        raise NotImplementedError

    @property
    def pid(self) -> int | None:
        """The service's process id while it runs."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self, timeout: float | None = None) -> None:
        """Ask the service to stop (killing it after the timeout) and remove its temp dir."""
        self._end_process(self.stop_timeout if timeout is None else timeout)
        self._port = None
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _end_process(self, timeout: float) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(self.stop_signal)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    log.warning("%s did not stop within %.0fs; killing it", self.name, timeout)
                    proc.kill()
                    proc.wait()
            log.info("%s stopped", self.name)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def _start_on_a_free_port(
        self, launch: Callable[[], int], wait_ready: Callable[[int], None], fixed: bool, attempts: int = 3
    ) -> int:
        """``launch()`` the process on a port it picks and returns, then ``wait_ready(port)``; if it
        exited meanwhile (the port may have been taken between choosing and binding it), try again on
        another, up to ``attempts`` times (once with a ``fixed`` port). The port it serves on."""
        for attempt in range(1, attempts + 1):
            port = launch()
            try:
                wait_ready(port)
            except EmbeddedServiceError:
                exited = self._proc is not None and self._proc.poll() is not None
                self._end_process(self.stop_timeout)
                if exited and attempt < attempts and not fixed:
                    log.warning("%s exited on port %d; retrying on another port", self.name, port)
                    continue
                raise
            return port
        raise AssertionError("unreachable")  # pragma: no cover

    def _error(self, message: str) -> EmbeddedServiceError:
        tail = log_tail(self.log_path)
        return EmbeddedServiceError(f"{message}; log {self.log_path}:\n{tail}" if tail else message)
