"""An embedded, throwaway PostgreSQL cluster in a temp dir, and database helpers for tests."""

from __future__ import annotations

import glob
import logging
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Self
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from entrypoints.embedded import die_with_parent, free_port, log_tail
from entrypoints.embedded.process import EmbeddedProcess
from ioc.errors import EmbeddedServiceError

log = logging.getLogger(__name__)

#: The role and database the embedded cluster serves.
ROLE = "ioc"
DATABASE = "ioc"
#: The unprivileged account that runs the server when we are root (initdb and postgres refuse root).
SYSTEM_USER = "postgres"


def find_bindir() -> Path:
    """The directory of the PostgreSQL server binaries (``initdb``, ``postgres``)."""
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=True, timeout=10)
            candidates.append(Path(out.stdout.strip()))
        except (OSError, subprocess.SubprocessError):
            pass
    # Debian/Ubuntu keep the server outside PATH, one directory per major version; newest first.
    versioned = glob.glob("/usr/lib/postgresql/*/bin")
    versioned.sort(key=lambda p: [int(n) for n in re.findall(r"\d+", p)], reverse=True)
    candidates += [Path(p) for p in versioned]
    for name in ("initdb", "postgres"):
        found = shutil.which(name)
        if found:
            candidates.append(Path(found).parent)
    for bindir in candidates:
        if all(os.access(bindir / exe, os.X_OK) for exe in ("initdb", "postgres")):
            return bindir
    raise EmbeddedServiceError(
        "no PostgreSQL server binaries (initdb, postgres) found; install the `postgresql` package "
        "(e.g. `apt-get install postgresql`) or set IOC_DATABASE_URL to an existing server"
    )


def timescaledb_library(bindir: Path) -> Path | None:
    """TimescaleDB's loader library for the server in ``bindir`` (``timescaledb.so`` in its
    ``pkglibdir``), or None when TimescaleDB is not installed for that server."""
    libdirs: list[Path] = []
    pg_config = bindir / "pg_config"
    if not pg_config.exists() and (found := shutil.which("pg_config")):
        pg_config = Path(found)
    if pg_config.exists():
        try:
            out = subprocess.run(
                [str(pg_config), "--bindir", "--pkglibdir"], capture_output=True, text=True, check=True, timeout=10
            )
            lines = out.stdout.split()
            # Only this server's pg_config: Debian's libpq-dev one may be another major version.
            if len(lines) == 2 and Path(lines[0]).resolve() == bindir.resolve():
                libdirs.append(Path(lines[1]))
        except (OSError, subprocess.SubprocessError):
            pass
    libdirs.append(bindir.parent / "lib")  # Debian: /usr/lib/postgresql/<major>/{bin,lib}
    for libdir in libdirs:
        library = libdir / "timescaledb.so"
        if library.exists():
            return library
    return None


def with_database(url: str, name: str) -> str:
    """The same connection string pointing at database ``name`` (URL or ``key=value`` form)."""
    if url.startswith(("postgresql://", "postgres://")):
        parts = urlsplit(url)
        return urlunsplit(parts._replace(path="/" + name))
    return make_conninfo(url, dbname=name)


def create_database(admin_url: str, name: str) -> str:
    """Create database ``name`` through ``admin_url`` and return its URL."""
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return with_database(admin_url, name)


def drop_database(admin_url: str, name: str) -> None:
    """Drop database ``name`` if it exists, disconnecting whoever is still in it."""
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


class EmbeddedPostgres(EmbeddedProcess):
    """A PostgreSQL cluster in a temp dir on a free loopback port, trust auth, durability off.

    As root the server runs as the ``postgres`` system user; otherwise as the current user.

    >>> with EmbeddedPostgres() as pg:
    ...     migrate(pg.url)
    """

    name = "embedded PostgreSQL"
    stop_signal = signal.SIGINT  # PostgreSQL's "fast shutdown"
    stop_timeout = 10.0

    def __init__(self, *, host: str = "127.0.0.1", start_timeout: float = 60.0) -> None:
        super().__init__(host=host, start_timeout=start_timeout)
        self.bindir = find_bindir()
        self._account = _service_account()
        #: TimescaleDB's library when installed for this server: then preloaded, so migrations take
        #: the Timescale path (it cannot be enabled in a server that did not preload it).
        self.timescaledb = timescaledb_library(self.bindir)

    @property
    def url(self) -> str:
        """``postgresql://ioc@HOST:PORT/ioc``."""
        if self._port is None:
            raise EmbeddedServiceError("the embedded PostgreSQL is not started")
        return f"postgresql://{ROLE}@{self.host}:{self._port}/{DATABASE}"

    @property
    def port(self) -> int | None:
        return self._port

    @property
    def log_path(self) -> Path:
        """The server log (gone after ``stop()``)."""
        return self._dir() / "postgres.log"

    def start(self) -> Self:
        """initdb, start the server, wait until it accepts connections, create database ``ioc``."""
        if self.running:
            return self
        self._initdb()

        def launch() -> int:
            port = free_port(self.host)
            self._spawn(port)
            return port

        self._port = self._start_on_a_free_port(launch, self._wait_ready, fixed=False)
        admin = f"postgresql://{ROLE}@{self.host}:{self._port}/postgres"
        with psycopg.connect(admin, autocommit=True) as conn:
            if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,)).fetchone() is None:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(DATABASE)))
        log.info(
            "embedded PostgreSQL ready at %s (data %s)%s",
            self.url, self._dir(), f"; TimescaleDB preloaded ({self.timescaledb})" if self.timescaledb else "",
        )  # fmt: skip
        return self

    # --- internals ---------------------------------------------------------------------------

    def _dir(self) -> Path:
        if self._tmp is None:
            self._tmp = Path(tempfile.mkdtemp(prefix="ioc-pg-", dir=_shared_tempdir() if self._account else None))
            (self._tmp / "sock").mkdir()
            if self._account:
                uid, gid = self._account
                for path in (self._tmp, self._tmp / "sock"):
                    os.chown(path, uid, gid)
        return self._tmp

    def _popen_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"stdin": subprocess.DEVNULL, "cwd": self._dir()}
        if self._account:
            uid, gid = self._account
            # Popen switches credentials before preexec_fn, so the parent-death signal survives.
            kwargs.update(user=uid, group=gid, extra_groups=[], env={**os.environ, "HOME": str(self._dir())})
        return kwargs

    def _initdb(self) -> None:
        data = self._dir() / "data"
        if (data / "PG_VERSION").exists():
            return
        with (self._dir() / "initdb.log").open("ab") as out:
            for locale in ("C.UTF-8", "C"):
                cmd = [
                    str(self.bindir / "initdb"), "-D", str(data), "-U", ROLE, "--auth=trust",
                    "--encoding=UTF8", f"--locale={locale}", "--no-sync",
                ]  # fmt: skip
                result = subprocess.run(
                    cmd,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    timeout=self.start_timeout,
                    **self._popen_kwargs(),
                )
                if result.returncode == 0:
                    return
                shutil.rmtree(data, ignore_errors=True)
                log.debug("initdb with locale %s failed; trying the next", locale)
        tail = log_tail(self._dir() / "initdb.log")
        raise EmbeddedServiceError(f"initdb failed (status {result.returncode}):\n{tail}")

    def _spawn(self, port: int) -> None:
        cmd = [
            str(self.bindir / "postgres"),
            "-D", str(self._dir() / "data"),
            "-p", str(port),
            "-k", str(self._dir() / "sock"),
            "-c", f"listen_addresses={self.host}",
            "-c", "fsync=off",
            "-c", "synchronous_commit=off",
            "-c", "full_page_writes=off",
            "-c", "max_connections=200",
        ]  # fmt: skip
        if self.timescaledb is not None:
            # Telemetry off: a throwaway server has nobody to report and may have no network.
            cmd += ["-c", "shared_preload_libraries=timescaledb", "-c", "timescaledb.telemetry_level=off"]
        self._log_file = self.log_path.open("ab")
        log.debug("starting %s", " ".join(cmd))
        self._proc = subprocess.Popen(
            cmd,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            # The terminal's Ctrl-C is for the parent, which stops its children in order.
            start_new_session=True,
            preexec_fn=die_with_parent(signal.SIGINT),  # fast shutdown, like stop()
            **self._popen_kwargs(),
        )

    def _wait_ready(self, port: int) -> None:
        deadline = time.monotonic() + self.start_timeout
        conninfo = f"postgresql://{ROLE}@{self.host}:{port}/postgres"
        while True:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise self._error(f"PostgreSQL exited with status {self._proc.returncode}")
            try:
                with psycopg.connect(conninfo, connect_timeout=2):
                    return
            except psycopg.OperationalError as exc:
                if time.monotonic() > deadline:
                    raise self._error(
                        f"PostgreSQL did not accept connections within {self.start_timeout:.0f}s ({exc})"
                    ) from exc
            time.sleep(0.05)


def _service_account() -> tuple[int, int] | None:
    """(uid, gid) to run the server as when we are root, else None (run as ourselves)."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        raise EmbeddedServiceError(
            f"running as root, and PostgreSQL refuses root: create the `{SYSTEM_USER}` system user "
            "(the `postgresql` package does) or run as an ordinary user"
        ) from None
    return entry.pw_uid, entry.pw_gid


def _shared_tempdir() -> str:
    """A temp dir the service account can reach: $TMPDIR if world-searchable, else /tmp."""
    base = Path(tempfile.gettempdir()).resolve()
    if all(os.stat(p).st_mode & 0o001 for p in (base, *base.parents)):
        return str(base)
    return "/tmp"
