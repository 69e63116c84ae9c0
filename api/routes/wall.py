"""The wall page (``/wall``) and the headers it is served with; its files are in ``api/static``."""

from __future__ import annotations

from pathlib import Path
from typing import Final

from fastapi import APIRouter
from fastapi.responses import FileResponse

STATIC_DIR: Final = Path(__file__).resolve().parents[1] / "static"
#: The wall page loads only its own script, style and socket; tokens never leave by referrer.
WALL_HEADERS: Final = {
    "Content-Security-Policy": (
        "default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data:; "
        "style-src 'self'; script-src 'self'; frame-ancestors 'none'"
    ),
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


def router() -> APIRouter:
    """``/wall`` (not in the OpenAPI document)."""
    router = APIRouter()

    @router.get("/wall", include_in_schema=False)
    async def wall() -> FileResponse:
        return FileResponse(STATIC_DIR / "wall.html", media_type="text/html", headers=WALL_HEADERS)

    return router
