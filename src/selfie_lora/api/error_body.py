"""The contract's error answer, ``{"error": {"code", "message", "details"}}``: one builder for the
exception handlers (``app``) and the middleware that answers requests a stopping server cut off
(``stopping``), which ``app`` imports and so cannot import from it."""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse

from selfie_lora.errors import ErrorCode


def error_response(status: int, code: ErrorCode, message: str, details: list[Any] | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(
        status_code=status, headers=headers,
        content={"error": {"code": code, "message": message, "details": details or []}},
    )
