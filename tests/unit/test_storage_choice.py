"""The first migration's choice of storage flavour, with a fake probe: TimescaleDB only when installed,
preloaded and enabled; otherwise plain PostgreSQL, with one clear warning when it is installed."""

from __future__ import annotations

from pathlib import Path

import pytest

from entrypoints.embedded.postgres import timescaledb_library
from ioc.db.migrate import Storage, TimescaleFacts, choose_storage, preloaded


class Probe:
    """Stands in for ``CREATE EXTENSION`` on a connection of its own: counts calls, returns ``error``."""

    def __init__(self, error: str | None = None) -> None:
        self.error = error
        self.calls = 0

    def __call__(self) -> str | None:
        self.calls += 1
        return self.error


def test_not_installed_is_plain_postgresql_without_a_word_or_a_probe() -> None:
    probe = Probe()
    assert choose_storage(TimescaleFacts(installed=False, preload="", created=False), probe) == (
        Storage.POSTGRESQL,
        None,
    )
    assert probe.calls == 0


def test_installed_but_not_preloaded_falls_back_with_one_clear_warning_and_never_probes() -> None:
    # The usual state after installing the package: CREATE EXTENSION would fail with a FATAL error.
    probe = Probe()
    storage, warning = choose_storage(
        TimescaleFacts(installed=True, preload="pg_stat_statements", created=False), probe
    )
    assert storage is Storage.POSTGRESQL
    assert warning is not None
    assert "not preloaded" in warning and "shared_preload_libraries" in warning and "plain PostgreSQL" in warning
    assert "pg_stat_statements" in warning
    assert probe.calls == 0


def test_preloaded_and_enabled_by_the_probe_is_timescaledb() -> None:
    probe = Probe()
    facts = TimescaleFacts(installed=True, preload="pg_stat_statements, timescaledb", created=False)
    assert choose_storage(facts, probe) == (Storage.TIMESCALEDB, None)
    assert probe.calls == 1


def test_preloaded_but_refused_by_the_probe_falls_back_and_says_why() -> None:
    probe = Probe('permission denied to create extension "timescaledb"')
    storage, warning = choose_storage(TimescaleFacts(installed=True, preload="timescaledb", created=False), probe)
    assert storage is Storage.POSTGRESQL
    assert warning is not None and "permission denied" in warning and "plain PostgreSQL" in warning


def test_an_extension_already_there_needs_no_probe() -> None:
    probe = Probe("must not be called")
    assert choose_storage(TimescaleFacts(installed=True, preload="timescaledb", created=True), probe) == (
        Storage.TIMESCALEDB,
        None,
    )
    assert probe.calls == 0


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        ("timescaledb", True),
        ("pg_stat_statements,timescaledb", True),
        (' "timescaledb" ', True),
        ("$libdir/timescaledb", True),
        ("/usr/lib/postgresql/16/lib/timescaledb.so", True),
        ("", False),
        ("timescaledb_toolkit", False),
        ("pg_stat_statements", False),
    ],
)
def test_preloaded_reads_the_setting(setting: str, expected: bool) -> None:
    assert preloaded(setting) is expected


def _server(root: Path, major: int, *, timescale: bool, pg_config_bindir: Path | None = None) -> Path:
    """A fake Debian layout /usr/lib/postgresql/<major>/{bin,lib}; returns its bindir."""
    bindir, libdir = root / str(major) / "bin", root / str(major) / "lib"
    bindir.mkdir(parents=True)
    libdir.mkdir(parents=True)
    if timescale:
        (libdir / "timescaledb.so").write_bytes(b"")
        (libdir / "timescaledb-2.17.2.so").write_bytes(b"")
    if pg_config_bindir is not None:
        script = bindir / "pg_config"
        script.write_text(f"#!/bin/sh\necho {pg_config_bindir}\necho {libdir}\n")
        script.chmod(0o755)
    return bindir


def test_the_embedded_postgresql_finds_timescaledb_installed_for_its_own_server(tmp_path: Path) -> None:
    assert timescaledb_library(_server(tmp_path, 16, timescale=True)) == tmp_path / "16" / "lib" / "timescaledb.so"
    assert timescaledb_library(_server(tmp_path, 15, timescale=False)) is None


def test_a_pg_config_of_another_server_is_not_believed(tmp_path: Path) -> None:
    other = _server(tmp_path, 17, timescale=True)
    bindir = _server(tmp_path / "x", 15, timescale=False, pg_config_bindir=other)
    assert timescaledb_library(bindir) is None
