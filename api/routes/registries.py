"""Registry routes: the province's communes and its environmental stations."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from api import schemas
from api.auth import Caller
from api.context import ApiContext


def router(ctx: ApiContext) -> APIRouter:
    """``/api/units``, ``/api/stations``."""
    router = APIRouter()

    @router.get(
        "/api/units",
        tags=["registries"],
        response_model=None,
        responses={**schemas.ok(schemas.UnitList, schemas.UNITS_EXAMPLE), **schemas.errors(401)},
    )
    async def units(caller: Caller) -> dict[str, Any]:
        """The province's communes (xã, phường)."""
        return {"items": ctx.units_json, "count": len(ctx.units_json)}

    @router.get(
        "/api/stations",
        tags=["registries"],
        response_model=None,
        responses={**schemas.ok(schemas.StationList, schemas.STATIONS_EXAMPLE), **schemas.errors(401)},
    )
    async def stations(caller: Caller) -> dict[str, Any]:
        """Environmental stations, with flood alarm levels BĐ I–III for water gauges."""
        return {"items": ctx.stations_json, "count": len(ctx.stations_json)}

    return router
