"""How the API reads a JSON body: the one place it is parsed, for every route of the API but
the webhooks' (their signed bytes are the training service's to check and read).

FastAPI parses a JSON body with ``Request.json()`` (Python's ``json.loads``) before any route or
dependency runs; its routers here use ``JsonBodyRoute``, whose requests parse it stricter:

- A **duplicate key** in any object is refused, naming the key: ``json.loads`` kept the last
  one, so ``{"lora_scale": 0.5, "lora_scale": 2.5}`` set 2.5 while a proxy or a log that reads
  the first saw 0.5.
- A body that is **not UTF-8** is refused (RFC 8259: JSON between systems is UTF-8):
  ``json.loads`` on bytes also read UTF-16 and UTF-32, so a UTF-16 body with its BOM was taken.
  A UTF-8 BOM is skipped (the RFC lets a parser ignore it, and Windows tools write one); a
  body of the BOM alone is an empty body, as FastAPI takes one on a route whose body is optional.

A refusal is FastAPI's 400 for a body it could not parse, which the app answers as every such
body: 422 ``invalid_request``, "the request's body could not be read: ...".
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import HTTPException, Request, Response
from fastapi.routing import APIRoute


class _DuplicateKeyError(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise _DuplicateKeyError(key)
        obj[key] = value
    return obj


def parse_json_body(body: bytes) -> Any:
    """``body`` as JSON, or an HTTPException 400 saying why not; a syntax error stays
    ``json.JSONDecodeError`` (FastAPI's 422 with its position)."""
    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise HTTPException(400, f"JSON must be UTF-8: byte {exc.start} is not (a UTF-16 or "
                                 "Latin-1 body is refused)") from None
    try:
        return json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except _DuplicateKeyError as exc:
        # json.dumps: a key with a lone surrogate or a control character, quoted as JSON does.
        raise HTTPException(400, f"the key {json.dumps(exc.key)} appears twice in a JSON "
                                 "object") from None


_UTF8_BOM = b"\xef\xbb\xbf"


class _JsonBodyRequest(Request):
    async def body(self) -> bytes:
        # FastAPI tells an empty body from one to parse on these bytes, before json() skips the
        # BOM: a lone BOM would be parsed, and refused as a syntax error.
        body = await super().body()
        return b"" if body == _UTF8_BOM else body

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = parse_json_body(await self.body())
        return self._json


class JsonBodyRoute(APIRoute):
    """An API route whose JSON body is parsed by ``parse_json_body``."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def parsing(request: Request) -> Response:
            return await handler(_JsonBodyRequest(request.scope, request.receive))

        return parsing
