"""Routes of likeness tracking (their paths say "quality": they are the contract)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from selfie_lora.api.answers import Comparison, answers
from selfie_lora.api.deps import ServicesDep, UrlBaseDep, UserDep
from selfie_lora.api.downloads import chart_answer, grid_answer
from selfie_lora.api.json_body import JsonBodyRoute
from selfie_lora.api.schemas import NOT_FOUND, NOT_FOUND_OR_INVALID, E, binary, errors, picture
from selfie_lora.api.serializers import comparison_json, likeness_json

router = APIRouter(prefix="/api/model", tags=["likeness"], route_class=JsonBodyRoute)


@router.get("/versions/{version_id}/quality", responses=errors(NOT_FOUND))
def version_likeness(user: UserDep, svc: ServicesDep, base: UrlBaseDep, version_id: str) -> dict[str, Any]:
    report = svc.likeness.report(user=user, version_id=version_id)
    return likeness_json(report.version, report.record, report.baseline,
                         base=base)


@router.get("/versions/{version_id}/quality/probes/{index}",
            responses=errors(NOT_FOUND_OR_INVALID) | binary("image/png"),
            response_class=Response)
def probe_image(user: UserDep, svc: ServicesDep, version_id: str, index: int) -> Response:
    data = svc.likeness.probe_image(user=user, version_id=version_id, index=index)
    return picture(data, media_type="image/png")


@router.get("/compare", responses=errors(
    {**NOT_FOUND, 422: (E.NOTHING_TO_COMPARE, E.SAME_VERSION)}) | answers(Comparison))
def compare(user: UserDep, svc: ServicesDep, base: UrlBaseDep, a: str | None = None,
            b: str | None = None) -> dict[str, Any]:
    """Version ``a`` against ``b`` probe by probe (ids or numbers; defaults: the newest version
    against the one the gate compared it with)."""
    return comparison_json(svc.likeness.compare(user=user, a=a, b=b),
                           base=base)


@router.get("/compare/grid.png", responses=errors(
    {**NOT_FOUND, 422: (E.NOTHING_TO_COMPARE, E.SAME_VERSION, E.NOT_SCORED)}) | binary("image/png") | {
    304: {"description": "the grid an If-None-Match holds (its ETag) is unchanged; no body"}},
            response_class=Response)
async def compare_grid(user: UserDep, svc: ServicesDep, request: Request, a: str | None = None,
                       b: str | None = None) -> Response:
    """The side-by-side grid; ETag (weak), 304 to an If-None-Match that holds it."""
    return await grid_answer(request, svc.likeness, user, a=a, b=b)


@router.get("/quality/chart.png", responses=errors(NOT_FOUND) | binary("image/png") | {
    304: {"description": "the chart an If-None-Match holds (its ETag) is unchanged; no body"}},
            response_class=Response)
async def likeness_chart(user: UserDep, svc: ServicesDep, request: Request) -> Response:
    """The chart of scores across all versions; ETag (weak), 304 to an If-None-Match that
    holds it."""
    return await chart_answer(request, svc.likeness, user)
