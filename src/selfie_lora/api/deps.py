"""What every route gets: the services, and the user the guard authenticated."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future
from contextlib import AbstractContextManager
from typing import Annotated, TypeVar

import anyio.to_thread
from anyio import CapacityLimiter
from fastapi import Depends, Request
from starlette.concurrency import run_in_threadpool

from selfie_lora.api.guard import bearer, user_of
from selfie_lora.api.paths import root_path
from selfie_lora.api.stopping import GENERATION_CHECK, UPLOAD_CHECK, track
from selfie_lora.domain.entities import User
from selfie_lora.errors import (
    AuthError,
    ClientGoneError,
    ServerStoppingError,
    UploadInProgressError,
)
from selfie_lora.services.common import PerUserSlots
from selfie_lora.wiring import Services

logger = logging.getLogger(__name__)

# Uploads' intakes one server process runs at once, per photo-analysis process
# (SELFIE_LORA_INTAKE_WORKERS): enough to keep those processes fed while another intake reads
# its photos or stores them.
INTAKES_PER_ANALYSIS_PROCESS = 2
# Uploads of one user that one server process takes in at once (read, then its intake); one
# more is refused before it is read into memory. (Not before it is received: FastAPI parses
# the multipart form before the route runs, and Starlette spools each part to a temporary file,
# in memory up to 1 MB, then on disk; the guard caps its size.) Why: every upload's body is
# read whole into memory before any other per-user limit (the training claim, which
# ``start=false`` skips), so one key sending 12 x 150 MB at once took the server from 0.78 to
# 2.34 GB, and more at once ran it out of memory for everyone. Two: a browser's page and a
# script at the same time.
UPLOADS_PER_USER = 2
UPLOAD_RETRY_AFTER_S = 10

# Both dependencies are ``async`` although they never wait: FastAPI runs a plain ``def``
# dependency in the thread pool, a round trip that cost more than the rest of a cheap read
# under load (bench/api_load.py).
async def current_user(request: Request) -> User:
    """The user the guard authenticated before the body was read (401 otherwise)."""
    user = user_of(request.scope.get("state", {}))
    if user is None:
        raise AuthError("an API key is required: send 'Authorization: Bearer <key>'")
    return user


async def current_api_key(request: Request) -> str | None:
    """The API key the guard authenticated the request with (None outside ``/api/*``)."""
    return bearer(request.scope) if user_of(request.scope.get("state", {})) else None


async def services(request: Request) -> Services:
    svc: Services = request.app.state.services
    return svc


async def url_base(request: Request) -> str:
    """What the URLs of an answer start with: SELFIE_LORA_PUBLIC_URL, else the root path the
    app is served under (``/sl``, or nothing), so that a path in an answer leads to this app
    behind a prefix as well (``/api/...`` alone led outside it)."""
    svc: Services = request.app.state.services
    return svc.settings.public_url_base or root_path(request.scope)


UserDep = Annotated[User, Depends(current_user)]
ServicesDep = Annotated[Services, Depends(services)]
ApiKeyDep = Annotated[str | None, Depends(current_api_key)]
UrlBaseDep = Annotated[str, Depends(url_base)]
T = TypeVar("T")


async def in_thread(fn: Callable[[], T]) -> T:
    """Run blocking service work (photos, images, torch) off the event loop."""
    return await run_in_threadpool(fn)


def intake_limiter(intake_workers: int) -> CapacityLimiter:
    """The threads of one app's intakes (``in_intake``)."""
    return CapacityLimiter(INTAKES_PER_ANALYSIS_PROCESS * intake_workers)


def upload_slots(per_user: int = UPLOADS_PER_USER) -> PerUserSlots:
    """How many uploads each user has being taken in by this process (``per_user`` at most); one
    more is ``UploadInProgressError`` (409 upload_in_progress, with Retry-After)."""

    def refused(held: int) -> UploadInProgressError:
        return UploadInProgressError(
            f"you already have {held} uploads being taken in by the server: send this one "
            f"when one of them is done", retry_after=UPLOAD_RETRY_AFTER_S)

    return PerUserSlots(per_user, refused=refused)


def upload_slot(request: Request, user: User) -> AbstractContextManager[None]:
    """One of ``user``'s upload slots in this app (``upload_slots``): taken by an upload
    route before it reads the spooled body into memory, held until its intake is done."""
    slots: PerUserSlots = request.app.state.upload_slots
    return slots.hold(user.id)


async def in_intake(request: Request, fn: Callable[[], T]) -> T:
    """Run an upload's intake off the event loop on the intakes' own threads (the app's
    ``intake_limiter``). An intake holds its thread while its photos wait for the analysis
    processes: on the shared pool (anyio's 40 threads), 40 uploads held every thread, and
    /readyz, /metrics, signing in and every synchronous route waited seconds behind them. The
    uploads beyond the limit wait for their turn holding no thread.

    A stopping server that cancels the request abandons the thread, which goes on: the intake
    is tracked (``api.stopping.Work``) so that the answer says whether it began."""
    limiter: CapacityLimiter = request.app.state.intake_limiter
    work = track(request.scope, check=UPLOAD_CHECK)

    def run() -> T:
        if not work.begin():  # the request was answered "send it again" as it got its thread
            raise ServerStoppingError("the server stopped before this upload's intake began")
        return fn()

    return await anyio.to_thread.run_sync(run, limiter=limiter)


async def finished(future: Future[T], request: Request, *,
                   client_gone: threading.Event | None = None) -> T:
    """The result of work a service runs on its own threads (generations), awaited without
    holding a thread of the shared pool. A client that goes away while the work is still queued
    cancels it (``ClientGoneError``): nobody would receive the pictures, and a generation queued
    for nobody held one of its user's slots, so the retry was refused. Work a thread has taken
    is told through ``client_gone`` (set then), the event the work was submitted with: a local
    generation waiting for the one pipeline, or between pictures, is dropped then, its slot
    freed (taken by one of the 8 threads, it had left the queue, and was made and stored for
    nobody while holding its slot; found in review). Work that ends anyway is stored (the user
    finds it in the generate page's gallery): so does work running when a stopping server
    cancels the request, whose answer says so (``api.stopping.Work``)."""
    work = track(request.scope, check=GENERATION_CHECK)
    result = asyncio.wrap_future(future)
    # uvicorn never cancels a request whose client disconnected: it only says so to the next
    # ``receive``. The body is read by now, so the next message is that disconnect.
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait((result, gone), return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        # The request itself cancelled (a server stopping). The future's own cancel decides,
        # under its lock, against the thread taking it up: False once it runs (or is done).
        if not future.cancel():
            work.begin()
        result.cancel()
        raise
    finally:
        gone.cancel()
    went_away = gone.done() and not gone.cancelled() and gone.exception() is None
    if went_away and client_gone is not None:
        client_gone.set()
    if went_away and future.cancel():  # False once it runs
        logger.info("%s %s: the client went away; its queued work was dropped", request.method,
                    request.url.path)
        raise ClientGoneError("the client went away before its work started")
    return await result


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
