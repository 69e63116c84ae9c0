"""An embedded MQTT broker: Debian's `mosquitto` on a free loopback port, with passwords and ACLs, for `ioc dev` and the tests.

The generated configuration is the production one in small (docs/api.md, "MQTT"): no anonymous
clients; the bridge user may only read ``ioc/sensors/+``; a station's user (its station_id) may only
write its own topic (``pattern write ioc/sensors/%u``); the development user may read and write
``ioc/#`` (it publishes for any station, as the simulators and a developer do).
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Self
from urllib.parse import quote

from entrypoints.embedded import die_with_parent, free_port, port_open
from entrypoints.embedded.process import EmbeddedProcess
from ioc.errors import EmbeddedServiceError

log = logging.getLogger(__name__)

#: Debian installs the broker in /usr/sbin, which is not on a non-root user's PATH.
SEARCH_PATH = "/usr/sbin:/usr/local/sbin:/usr/bin:/usr/local/bin"
DEV_USER = "ioc-dev"
BRIDGE_USER = "ioc-bridge"
#: Largest MQTT packet the broker takes (a client sending more is disconnected by it); the bridge
#: dead-letters readings over 64 KiB, so this only keeps absurd payloads out of the dead-letter topic.
MAX_PACKET_BYTES = 256 * 1024


def mosquitto_binary(name: str = "mosquitto") -> str | None:
    """The path of ``mosquitto`` (or ``mosquitto_passwd``, ...), also where Debian puts it off the PATH."""
    return shutil.which(name) or shutil.which(name, path=SEARCH_PATH)


def broker_config(port: int, host: str, directory: Path) -> str:
    """mosquitto.conf for a broker listening on ``host:port`` with its files in ``directory``."""
    return "\n".join(
        [
            f"listener {port} {host}",
            "allow_anonymous false",
            f"password_file {directory / 'passwd'}",
            f"acl_file {directory / 'acl'}",
            "persistence true",
            f"persistence_location {directory}/",
            # The bridge acknowledges a reading only once Kafka has it: let many be in flight to it,
            # and hold a backlog for it while it restarts (its session is persistent).
            "max_inflight_messages 1000",
            "max_queued_messages 200000",
            f"max_packet_size {MAX_PACKET_BYTES}",
            f"log_dest file {directory / 'mosquitto.log'}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type subscribe",  # the tests wait for the bridge's subscription in the log
            # As root mosquitto would switch to the user `mosquitto`, who cannot read this directory.
            *(["user root"] if os.geteuid() == 0 else []),
            "",
        ]
    )


ACL = f"""\
# The bridge reads every station's readings.
user {BRIDGE_USER}
topic read ioc/sensors/+

# Development: the simulators and a developer publish for any station.
user {DEV_USER}
topic readwrite ioc/#

# Production pattern: a station's user name is its station_id; it may write its own topic only.
pattern write ioc/sensors/%u
"""


class EmbeddedMosquitto(EmbeddedProcess):
    """A `mosquitto` broker with a development user, a bridge user and per-station ACLs."""

    name = "embedded MQTT broker"
    stop_signal = signal.SIGTERM
    stop_timeout = 5.0

    def __init__(self, *, host: str = "127.0.0.1", start_timeout: float = 15.0) -> None:
        super().__init__(host=host, start_timeout=start_timeout)
        self.passwords = {DEV_USER: secrets.token_urlsafe(12), BRIDGE_USER: secrets.token_urlsafe(12)}

    @property
    def directory(self) -> Path:
        if self._tmp is None:
            self._tmp = Path(tempfile.mkdtemp(prefix="ioc-mqtt-"))
        return self._tmp

    @property
    def log_path(self) -> Path:
        return self.directory / "mosquitto.log"

    @property
    def port(self) -> int:
        if self._port is None:
            raise EmbeddedServiceError("the embedded MQTT broker is not started")
        return self._port

    def url(self, user: str = DEV_USER) -> str:
        """``mqtt://USER:PASSWORD@HOST:PORT`` for ``user``."""
        return f"mqtt://{quote(user, safe='')}:{quote(self.passwords[user], safe='')}@{self.host}:{self.port}"

    def add_user(self, user: str, password: str) -> None:
        """Add a user (a station: its station_id); the broker reads the file again on SIGHUP."""
        self.passwords[user] = password
        self._write_passwords()
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGHUP)

    def _write_passwords(self) -> None:
        tool = mosquitto_binary("mosquitto_passwd")
        if tool is None:
            raise EmbeddedServiceError("mosquitto_passwd not found: install the Debian package mosquitto")
        path = self.directory / "passwd"
        path.unlink(missing_ok=True)
        path.touch(mode=0o600)
        for user, password in self.passwords.items():
            subprocess.run([tool, "-b", str(path), user, password], check=True, capture_output=True, timeout=30)

    def start(self) -> Self:
        if self.running:
            return self
        binary = mosquitto_binary()
        if binary is None:
            raise EmbeddedServiceError("mosquitto not found: install the Debian package mosquitto (scripts/setup)")
        self._write_passwords()
        (self.directory / "acl").write_text(ACL)

        def launch() -> int:
            port = free_port(self.host)
            conf = self.directory / "mosquitto.conf"
            conf.write_text(broker_config(port, self.host, self.directory))
            self._log_file = (self.directory / "mosquitto.out").open("ab")
            self._proc = subprocess.Popen(
                [binary, "-c", str(conf)],
                stdin=subprocess.DEVNULL,
                stdout=self._log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent(signal.SIGKILL),
            )
            return port

        def wait_ready(port: int) -> None:
            deadline = time.monotonic() + self.start_timeout
            while not port_open(self.host, port):
                assert self._proc is not None
                if self._proc.poll() is not None:
                    raise self._error(f"mosquitto exited with status {self._proc.returncode}")
                if time.monotonic() > deadline:
                    raise self._error(
                        f"mosquitto did not listen on {self.host}:{port} within {self.start_timeout:.0f}s"
                    )
                time.sleep(0.05)

        self._port = self._start_on_a_free_port(launch, wait_ready, fixed=False)
        log.info("embedded MQTT broker (mosquitto) ready on %s:%d", self.host, self._port)
        return self
