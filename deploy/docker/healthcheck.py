#!/usr/bin/env python3
"""Container health probe of the ioc image (python:*-slim has neither curl nor procps).

    ioc-healthcheck http URL          exit 0 when GET URL answers 2xx within the timeout
    ioc-healthcheck process SUBCMD    exit 0 when an `ioc SUBCMD ...` process is alive
    ioc-healthcheck auto              `http` on /healthz for `ioc api`, `process` otherwise

Only the standard library is used, so the probe works whatever the virtualenv holds.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator

TIMEOUT_S = float(os.environ.get("IOC_HEALTHCHECK_TIMEOUT", "3"))
DEAD_STATES = {"Z", "X", "x", "T", "t"}  # zombie, dead, stopped, traced


def ioc_processes(proc: str = "/proc") -> Iterator[tuple[int, str, list[str]]]:
    """(pid, state, arguments after `ioc`) of every `ioc ...` process but this probe."""
    skip = {os.getpid(), os.getppid()}
    for entry in os.listdir(proc):
        if not entry.isdigit() or int(entry) in skip:
            continue
        try:
            with open(f"{proc}/{entry}/cmdline", "rb") as f:
                argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
            with open(f"{proc}/{entry}/stat") as f:
                state = f.read().rpartition(")")[2].split()[0]
        except (OSError, IndexError):
            continue  # the process went away meanwhile, or is a kernel thread
        # `ioc worker` runs as [python, /opt/ioc/bin/ioc, worker] (console-script shebang)
        for i, arg in enumerate(argv[:3]):
            if os.path.basename(arg) == "ioc":
                yield int(entry), state, argv[i + 1 :]
                break


def check_process(subcommand: str) -> tuple[bool, str]:
    words = subcommand.split()
    for pid, state, args in ioc_processes():
        if args[: len(words)] == words:
            if state in DEAD_STATES:
                return False, f"ioc {subcommand} (pid {pid}) is in state {state}"
            return True, f"ioc {subcommand} (pid {pid}) is alive"
    return False, f"no `ioc {subcommand}` process"


def check_http(url: str) -> tuple[bool, str]:
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            ok = 200 <= response.status < 300
            return ok, f"GET {url} -> {response.status}"
    except urllib.error.HTTPError as exc:
        return False, f"GET {url} -> {exc.code}"
    except (OSError, ValueError) as exc:
        return False, f"GET {url} failed: {exc}"


def api_url(path: str = "/healthz") -> str:
    host = os.environ.get("IOC_API_HOST", "127.0.0.1")
    if host in ("", "0.0.0.0", "::", "[::]"):
        host = "127.0.0.1"
    port = os.environ.get("IOC_API_PORT", "8000")
    return f"http://{host}:{port}{path}"


def check_auto() -> tuple[bool, str]:
    roles = [args for _, _, args in ioc_processes()]
    if any(args[:1] == ["api"] for args in roles):
        return check_http(api_url())
    if roles:
        return check_process(" ".join(roles[0][:1]))
    return False, "no `ioc` process"


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "http":
        ok, message = check_http(argv[1])
    elif len(argv) >= 2 and argv[0] == "process":
        ok, message = check_process(" ".join(argv[1:]))
    elif argv in ([], ["auto"]):
        ok, message = check_auto()
    else:
        print(__doc__, file=sys.stderr)
        return 2
    print(message, file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
