"""The third-party internals of `ioc.compat`: what each module assumes still holds for the installed versions.

An upgrade that breaks one fails here with the reason (the module's ``problems()``), not in a
fan-out or a consumer in production. The version ranges in pyproject.toml are the ones checked.
"""

from __future__ import annotations

import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from api.app import DIRECT_ROUTE_SKIPS, DIRECT_ROUTES, create_app
from ioc.compat import aiokafka, starlette, uvicorn
from ioc.compat.uvicorn import direct_routes
from ioc.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
RANGES = {
    "aiokafka": aiokafka.SUPPORTED,
    "starlette": starlette.SUPPORTED,
    "uvicorn": uvicorn.SUPPORTED["uvicorn"],
    "websockets": uvicorn.SUPPORTED["websockets"],
}


def declared() -> dict[str, SpecifierSet]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return {r.name: r.specifier for r in map(Requirement, deps)}


@pytest.mark.parametrize("package", sorted(RANGES))
def test_pyproject_pins_the_range_the_compat_module_was_checked_against(package: str) -> None:
    pinned = declared().get(package)
    assert pinned == SpecifierSet(",".join(RANGES[package])), (
        f"pyproject.toml pins {package}{pinned or ' (no range)'}, ioc.compat was checked against "
        f"{','.join(RANGES[package])}: check the module's assumptions, then change both"
    )


@pytest.mark.parametrize("package", sorted(RANGES))
def test_the_installed_version_is_in_the_checked_range(package: str) -> None:
    installed = version(package)
    assert SpecifierSet(",".join(RANGES[package])).contains(installed, prereleases=True), (
        f"{package} {installed} is outside {','.join(RANGES[package])}, the range ioc.compat was checked against"
    )


@pytest.mark.parametrize("module", [aiokafka, uvicorn, starlette], ids=lambda m: m.__name__)
def test_the_internals_each_compat_module_relies_on_are_there(module: object) -> None:
    found = module.problems()  # type: ignore[attr-defined]
    assert found == [], f"{module.__name__}: " + "; ".join(found)  # type: ignore[attr-defined]


def test_the_aiokafka_patch_installs() -> None:
    assert aiokafka.install(), "aiokafka's internals are not what ioc.compat.aiokafka expects (see its problems())"


def test_only_the_declared_routes_skip_the_middleware_and_each_middleware_says_why_they_may() -> None:
    app = create_app(Settings(), connect=False)
    assert tuple(direct_routes(app)) == DIRECT_ROUTES
    layer: object = app.build_middleware_stack()
    stack = []
    while layer is not None and layer is not app.router:
        stack.append(type(layer).__name__)
        layer = getattr(layer, "app", None)
    unexplained = [name for name in stack if name not in DIRECT_ROUTE_SKIPS]
    assert unexplained == [], (
        f"middleware {unexplained} is skipped on {DIRECT_ROUTES} under ioc.compat.uvicorn: "
        "say in api.app.DIRECT_ROUTE_SKIPS why /ws needs none of it, or do not serve /ws directly"
    )


def test_aiokafka_problems_judge_aiokafkas_own_class_even_after_install() -> None:
    """install() replaces PartitionRecords with a subclass; the check must still read aiokafka's."""
    from ioc.compat import aiokafka as compat

    assert compat.install()
    assert compat.problems() == []


def test_aiokafka_heartbeats_can_resume_inside_the_assignment_callback() -> None:
    """`heartbeat_while_assigning` starts the coordinator's own heartbeat task; it must still exist."""
    from types import SimpleNamespace

    from aiokafka.consumer.group_coordinator import GroupCoordinator

    from ioc.compat.aiokafka import heartbeat_while_assigning

    assert callable(getattr(GroupCoordinator, "_start_heartbeat_task", None))
    assert "_heartbeat_task" in GroupCoordinator.__init__.__code__.co_names
    started: list[int] = []
    coordinator = SimpleNamespace(_heartbeat_task=None, _start_heartbeat_task=lambda: started.append(1))
    assert heartbeat_while_assigning(SimpleNamespace(_coordinator=coordinator))
    assert started == [1]
    assert not heartbeat_while_assigning(SimpleNamespace(_coordinator=None))
