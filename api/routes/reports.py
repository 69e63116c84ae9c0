"""Report routes (CONTRACT §7 ``GET /api/reports/...``): the stored list, and one report as a file.

Rights: operator and admin any scope; a commune user only ``commune:<own code>`` (403 otherwise,
and the list shows only its own); other roles none. A report of a period not stored yet is made
from the database on request, by the same code as ``ioc report``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Annotated, Any

import psycopg
from fastapi import APIRouter, HTTPException, Path, Query, Response

from api import schemas
from api.auth import Caller, Principal
from reports.document import ScopeError, check_scope
from reports.labels import LANGS
from reports.period import Period, PeriodError
from reports.render import FORMATS, MEDIA_TYPES, render
from reports.store import from_database, listing, stored

if TYPE_CHECKING:
    from api.context import ApiContext

log = logging.getLogger(__name__)

LIST_EXAMPLE = {
    "items": [{"period": "2026-10", "scope": "province", "made_at": "2026-11-01T00:30:04+07:00", "source": "database"}],
    "count": 1,
}
FILE_EXAMPLES = {
    "pdf": "%PDF-1.3 …",
    "xlsx": "PK… (an Office Open XML workbook)",
    "csv": "\ufeffreport,2026-10,province,Tỉnh Nghệ An,2026-10-31T23:59:59.999999+07:00\r\n…",
    "json": {"schema": "ioc.report.v1", "period": "2026-10", "scope": "province", "indicators": ["…"]},
}
_BAD_REPORT = (
    "The period, scope, format or language cannot be read.",
    {"detail": "'2026-13' is neither a month YYYY-MM nor a quarter YYYY-Qn"},
)
_SCOPE_FORBIDDEN = (
    "The scope is not the caller's (a commune user gets its own commune's report only).",
    {"detail": "scope commune:16690 is not yours"},
)
_ROLE_FORBIDDEN = (
    "The caller's role reads no reports (operator, admin and commune users do).",
    {"detail": "role security may not read reports"},
)


def _allowed(caller: Principal, scope: str) -> bool:
    if caller.sees_everything:
        return True
    return caller.role == "commune" and caller.commune is not None and scope == f"commune:{caller.commune}"


def router(ctx: ApiContext) -> APIRouter:
    """The ``/api/reports`` routes of one app."""
    router = APIRouter(tags=["reports"])
    url = ctx.settings.database_url

    def _list(commune: str | None) -> list[dict[str, Any]]:
        with psycopg.connect(url) as conn:
            return listing(conn, commune)

    def _document(period: Period, scope: str) -> dict[str, Any]:
        with psycopg.connect(url) as conn:
            doc = stored(conn, period.label, scope)
            return doc if doc is not None else from_database(conn, ctx.registry, period, [scope])[0]

    @router.get(
        "/api/reports",
        response_model=None,
        responses={
            200: {
                "description": "Stored reports.",
                "content": {"application/json": {"example": LIST_EXAMPLE}},
            },
            **schemas.errors(401, 403, e403=_ROLE_FORBIDDEN),
        },
    )
    async def list_reports(caller: Caller) -> dict[str, Any]:
        """Stored reports (the scheduled run's), newest period first; a commune user sees its own."""
        if not (caller.sees_everything or (caller.role == "commune" and caller.commune)):
            raise HTTPException(403, f"role {caller.role} may not read reports")
        items = await asyncio.to_thread(_list, None if caller.sees_everything else caller.commune)
        return {"items": items, "count": len(items)}

    @router.get(
        "/api/reports/{period}",
        response_model=None,
        responses={
            200: {
                "description": "The report as a file (Content-Disposition: attachment).",
                "content": {m: {"example": FILE_EXAMPLES[f]} for f, m in MEDIA_TYPES.items()},
            },
            **schemas.errors(400, 401, 403, 422, e400=_BAD_REPORT, e403=_SCOPE_FORBIDDEN),
        },
    )
    async def get_report(
        caller: Caller,
        period: Annotated[str, Path(description="YYYY-MM or YYYY-Qn", max_length=10)],
        scope: Annotated[str, Query(max_length=120)] = "province",
        format: Annotated[str, Query(description="pdf, xlsx, csv or json")] = "pdf",
        lang: Annotated[str, Query(description="vi or en")] = "vi",
    ) -> Response:
        """One report as a file (as ``ioc report``): stored when the scheduled run made it, else made now."""
        try:
            p = Period.parse(period)
            check_scope(scope, ctx.registry)
        except (PeriodError, ScopeError) as exc:
            raise HTTPException(400, str(exc)) from None
        if format not in FORMATS or lang not in LANGS:
            raise HTTPException(400, f"format must be one of {', '.join(FORMATS)} and lang one of {', '.join(LANGS)}")
        if not _allowed(caller, scope):
            raise HTTPException(403, f"scope {scope} is not yours")
        doc = await asyncio.to_thread(_document, p, scope)
        data = await asyncio.to_thread(render, doc, format, lang)
        name = f"bao-cao-{p.label}-{scope.replace(':', '-')}.{format}"
        return Response(
            data, media_type=MEDIA_TYPES[format], headers={"Content-Disposition": f'attachment; filename="{name}"'}
        )

    return router
