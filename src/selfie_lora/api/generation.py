"""Routes of generation: pictures with a version of the user's LoRA."""

from __future__ import annotations

import threading
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from selfie_lora.api.answers import Generated, GenerationsPage, answers
from selfie_lora.api.deps import ServicesDep, UrlBaseDep, UserDep, finished
from selfie_lora.api.json_body import JsonBodyRoute
from selfie_lora.api.schemas import (
    NOT_FOUND,
    NOT_FOUND_OR_INVALID,
    E,
    GenerateBody,
    binary,
    errors,
    picture,
)
from selfie_lora.api.serializers import generation_json
from selfie_lora.services.generation import HISTORY_PAGE, GenerationRequest

router = APIRouter(prefix="/api", tags=["generation"], route_class=JsonBodyRoute)


@router.post("/generate", responses=errors({
    404: (E.NOT_FOUND,), 409: (E.WEIGHTS_MISSING, E.WEIGHTS_DAMAGED, E.BASE_MODEL_MISMATCH),
    422: (E.INVALID_REQUEST, E.NO_VERSION, E.NO_REMOTE_VERSION, E.VERSION_MISMATCH,
          E.INVALID_PROMPT, E.EMPTY_PROMPT, E.PROMPT_TOO_LONG, E.UNSTORABLE_TEXT, E.UNSUPPORTED_WEIGHTS),
    429: (E.TOO_MANY_GENERATIONS,), 502: (E.GENERATION_FAILED,)}, body=True) | answers(Generated))
async def generate(user: UserDep, svc: ServicesDep, base: UrlBaseDep, body: GenerateBody,
                   http: Request) -> dict[str, Any]:
    """429 ``too_many_generations`` (with Retry-After) when the user already has
    SELFIE_LORA_MAX_GENERATIONS_PER_USER generations in flight on this server process."""
    # A number (2) names the version as "2" does.
    version = None if body.version_id is None else str(body.version_id)
    request = GenerationRequest(prompt=body.prompt, num_outputs=body.num_outputs, seed=body.seed,
                                lora_scale=body.lora_scale, version_id=version)
    # On the generation service's own threads: other routes never wait behind a generation.
    gone = threading.Event()  # set by ``finished`` if the client goes away first
    generation = await finished(
        svc.generation.submit(user=user, request=request, client_gone=gone), http,
        client_gone=gone)
    return {"generation": generation_json(generation, base=base)}


@router.get("/generations", responses=errors({
    404: (E.NOT_FOUND,), 422: (E.INVALID_REQUEST, E.INVALID_INPUT)}) | answers(GenerationsPage))
def generations(user: UserDep, svc: ServicesDep, base: UrlBaseDep, limit: int = HISTORY_PAGE,
                before: str | None = None) -> dict[str, Any]:
    """The user's generations, newest first, a page at a time: ``older`` is the next page's
    ``before`` (a position, which holds when that generation is deleted between pages). The
    gallery was the only list and showed the 50 newest, whatever was stored."""
    # A ``before`` of any length: one naming no generation is the 404 it is on the Generate
    # page and in the CLI. Capped at 64 characters, a longer one was FastAPI's 422 ("the
    # request is not valid") where a shorter one naming nothing was the 404.
    page = svc.generation.page(user=user, limit=limit, before=before)
    return {"generations": [generation_json(g, base=base) for g in page.generations],
            "older": page.older}


@router.delete("/generations/{generation_id}", responses=errors(NOT_FOUND, body=True))
def delete_generation(user: UserDep, svc: ServicesDep, generation_id: str) -> dict[str, Any]:
    """Delete one of the user's generations and its pictures, for good."""
    generation = svc.generation.delete(user=user, generation_id=generation_id)
    return {"deleted": generation.id}


@router.get("/generations/{generation_id}/images/{index}",
            responses=errors(NOT_FOUND_OR_INVALID) | binary("image/png"),
            response_class=Response)
def generation_image(user: UserDep, svc: ServicesDep, generation_id: str, index: int) -> Response:
    data = svc.generation.image(user=user, generation_id=generation_id, index=index)
    return picture(data, media_type="image/png")
