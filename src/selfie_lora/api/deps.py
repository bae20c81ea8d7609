"""What every route gets: the services, and the user the guard authenticated."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Future
from typing import Annotated, TypeVar

from fastapi import Depends, Request
from starlette.concurrency import run_in_threadpool

from selfie_lora.api.guard import user_of
from selfie_lora.domain.entities import User
from selfie_lora.errors import AuthError
from selfie_lora.wiring import Services


# Both dependencies are ``async`` although they never wait: FastAPI runs a plain ``def``
# dependency in the thread pool, a round trip that cost more than the rest of a cheap read
# under load (bench/api_load.py).
async def current_user(request: Request) -> User:
    """The user the guard authenticated before the body was read (401 otherwise)."""
    user = user_of(request.scope.get("state", {}))
    if user is None:
        raise AuthError("an API key is required: send 'Authorization: Bearer <key>'")
    return user


async def services(request: Request) -> Services:
    svc: Services = request.app.state.services
    return svc


UserDep = Annotated[User, Depends(current_user)]
ServicesDep = Annotated[Services, Depends(services)]
T = TypeVar("T")


async def in_thread(fn: Callable[[], T]) -> T:
    """Run blocking service work (photos, images, torch) off the event loop."""
    return await run_in_threadpool(fn)


async def finished(future: Future[T]) -> T:
    """The result of work a service runs on its own threads (generations), awaited without
    holding a thread of the shared pool; a request that goes away cancels it if still queued."""
    return await asyncio.wrap_future(future)
