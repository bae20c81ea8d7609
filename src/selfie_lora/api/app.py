"""The FastAPI application. Routes are thin: they authenticate, parse, call a service, serialize."""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from selfie_lora.api.guard import Guard, Limits, user_of
from selfie_lora.api.serializers import (
    comparison_json,
    dataset_json,
    generation_json,
    model_json,
    quality_json,
    training_json,
    version_json,
)
from selfie_lora.config import Settings
from selfie_lora.dataset.archive import read_uploaded_files, read_zip
from selfie_lora.domain.entities import Model, Training, User
from selfie_lora.domain.plan import LORA_SCALE_MAX, LORA_SCALE_MIN
from selfie_lora.errors import AuthError, ErrorCode, InvalidInputError, PayloadTooLargeError, SelfieLoraError
from selfie_lora.services.generation import MAX_OUTPUTS, MAX_PROMPT_CHARS, MAX_SEED, GenerationRequest
from selfie_lora.wiring import Services, build_services

logger = logging.getLogger(__name__)

# Ids are uuids; anything longer is not one of ours.
Id = Annotated[str, Field(min_length=1, max_length=64)]


class _Body(BaseModel):
    # An unknown field is a mistake worth a 422, not something to ignore silently.
    model_config = ConfigDict(extra="forbid")


class StartBody(_Body):
    dataset_id: Id | None = None


class CancelBody(_Body):
    training_id: Id


class ModelPatch(_Body):
    lora_scale: float | None = Field(default=None, ge=LORA_SCALE_MIN, le=LORA_SCALE_MAX,
                                     allow_inf_nan=False)
    trainer_version: str | None = Field(
        default=None, min_length=1, max_length=300,
        description="Re-pin the trainer version (explicit and logged; needs a reason).",
    )
    reason: str | None = Field(default=None, min_length=1, max_length=500)

    @model_validator(mode="after")
    def _reason_for_repin(self) -> ModelPatch:
        if self.trainer_version is not None and not (self.reason or "").strip():
            raise ValueError("re-pinning the trainer version needs a reason")
        return self


class GenerateBody(_Body):
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    num_outputs: int = Field(default=1, ge=1, le=MAX_OUTPUTS)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    lora_scale: float | None = Field(default=None, ge=LORA_SCALE_MIN, le=LORA_SCALE_MAX,
                                     allow_inf_nan=False)
    version_id: Id | None = None


def current_user(request: Request) -> User:
    """The user the guard authenticated before the body was read (401 otherwise)."""
    user = user_of(request.scope.get("state", {}))
    if user is None:
        raise AuthError("an API key is required: send 'Authorization: Bearer <key>'")
    return user


UserDep = Annotated[User, Depends(current_user)]


def _error(status: int, code: str, message: str, details: list[Any] | None = None) -> JSONResponse:
    return JSONResponse(
        status_code=status,
        content={"error": {"code": code, "message": message, "details": details or []}},
    )


def create_app(
    settings: Settings, *, services: Services | None = None, run_worker: bool = False,
    warm_up: bool = False, reconcile: bool = False,
) -> FastAPI:
    """The app for ``settings``. ``run_worker`` starts an in-process queue consumer with the app
    (``selfie-lora serve``); ``reconcile`` without it runs only the reconciler (``serve
    --no-worker``); the services are built here unless given (tests)."""
    svc = services or build_services(settings)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        worker = None
        if warm_up:
            # Start the photo-analysis processes now, off the event loop, so the first upload
            # does not wait ~1.5 s for them.
            threading.Thread(target=svc.intake.warm_up, name="intake-warm-up", daemon=True).start()
        if run_worker or reconcile:
            # The embedded worker: serve's own queue consumer and reconciler (or the reconciler
            # alone).
            from selfie_lora.worker import Identity, Worker, claim_identity

            identity = claim_identity(svc.settings.home) if run_worker else Identity(name="api")
            if run_worker:
                svc.training.owner = identity.name
            worker = Worker(training=svc.training, queue=svc.queue, identity=identity,
                            threads=svc.settings.worker_threads if run_worker else 0,
                            reconcile_seconds=svc.settings.reconcile_seconds)
            worker.start()
        try:
            yield
        finally:
            if worker is not None:
                # Hands running trainings back (in a thread: it joins the worker's threads).
                await _in_thread(worker.stop)
            if warm_up:
                await _in_thread(svc.intake.shut_down)

    app = FastAPI(title="selfie-lora", version="0.1.0", lifespan=lifespan)
    app.state.services = svc
    app.add_middleware(
        Guard,
        limits=Limits(max_upload_bytes=svc.settings.max_upload_bytes,
                      max_json_bytes=svc.settings.max_json_bytes,
                      body_timeout=svc.settings.body_timeout,
                      min_body_rate=svc.settings.min_body_rate),
        authenticate=lambda key: svc.users.authenticate(api_key=key),
    )

    @app.exception_handler(SelfieLoraError)
    async def _domain_error(_request: Request, exc: SelfieLoraError) -> JSONResponse:
        if exc.http_status >= 500:
            logger.error("%s: %s", exc.code, exc.message)
        return _error(exc.http_status, exc.code, exc.message, exc.details)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        details = [
            {"loc": list(e.get("loc", ())), "msg": str(e.get("msg", ""))} for e in exc.errors()
        ]
        return _error(422, ErrorCode.INVALID_REQUEST, "the request is not valid", details)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: ErrorCode.NOT_FOUND, 405: ErrorCode.METHOD_NOT_ALLOWED}.get(
            exc.status_code, ErrorCode.HTTP_ERROR)
        return _error(exc.status_code, code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unexpected error", exc_info=exc)
        return _error(500, ErrorCode.INTERNAL_ERROR,
                      "something went wrong on our side; please retry")

    def model_doc(model: Model) -> dict[str, Any]:
        active = svc.models.active_version(model=model)
        return model_json(model, active, svc.repo.get_likeness(active.id) if active else None)

    def model_body(user: User) -> dict[str, Any]:
        return model_doc(svc.models.get(user=user))

    def training_body(training: Training) -> dict[str, Any]:
        # With its version once stored: the answer carries the likeness gate's state and reason.
        version = svc.repo.get_version(training.version_id) if training.version_id else None
        return training_json(training, version)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/api/training/upload-zip", status_code=202)
    async def upload_zip(
        user: UserDep,
        file: Annotated[UploadFile, File()],
        start: Annotated[bool, Form()] = True,
    ) -> dict[str, Any]:
        limits = svc.intake.limits
        data = await _read_capped(file, limit=svc.settings.max_upload_bytes)
        result = await _in_thread(lambda: svc.training.upload(
            user=user, read=lambda: read_zip(data, limits=limits), start=start))
        return upload_body(result)

    @app.post("/api/training/upload", status_code=202)
    async def upload_files(
        user: UserDep,
        files: Annotated[list[UploadFile], File()],
        start: Annotated[bool, Form()] = True,
    ) -> dict[str, Any]:
        """The same as upload-zip, for photos sent as several multipart ``files``."""
        limit = svc.settings.max_upload_bytes
        named: list[tuple[str, bytes]] = []
        total = 0
        for upload in files:
            data = await _read_capped(upload, limit=limit - total)
            total += len(data)
            named.append((upload.filename or f"photo{len(named)}", data))
        limits = svc.intake.limits
        result = await _in_thread(lambda: svc.training.upload(
            user=user, read=lambda: read_uploaded_files(named, limits=limits), start=start))
        return upload_body(result)

    def upload_body(result: Any) -> dict[str, Any]:
        return {
            "dataset": dataset_json(result.dataset),
            "training": training_body(result.training) if result.training else None,
            "model": model_doc(result.model) if result.model else None,
        }

    @app.post("/api/training/start", status_code=202)
    def start_training(user: UserDep, body: StartBody | None = None) -> dict[str, Any]:
        result = svc.training.start(user=user, dataset_id=body.dataset_id if body else None)
        return {"training": training_body(result.training), "model": model_body(user)}

    @app.get("/api/training/progress")
    def progress(user: UserDep, training_id: str | None = None) -> dict[str, Any]:
        training, _model = svc.training.get(user=user, training_id=training_id)
        return {"training": training_body(training), "model": model_body(user)}

    @app.post("/api/training/cancel")
    def cancel(user: UserDep, body: CancelBody) -> dict[str, Any]:
        training = svc.training.cancel(user=user, training_id=body.training_id)
        return {"training": training_body(training), "model": model_body(user)}

    @app.get("/api/model")
    def get_model(user: UserDep) -> dict[str, Any]:
        return model_body(user)

    @app.patch("/api/model")
    def patch_model(user: UserDep, body: ModelPatch) -> dict[str, Any]:
        if body.lora_scale is None and body.trainer_version is None:
            raise InvalidInputError("nothing to change: send lora_scale or trainer_version",
                                    code=ErrorCode.EMPTY_PATCH)
        if body.trainer_version is not None:
            svc.models.change_trainer_version(
                user=user, trainer_version=body.trainer_version, reason=body.reason or "",
            )
        if body.lora_scale is not None:
            svc.models.set_lora_scale(user=user, lora_scale=body.lora_scale)
        return model_body(user)

    @app.get("/api/model/versions")
    def versions(user: UserDep) -> dict[str, Any]:
        model = svc.models.find(user=user)
        records = svc.likeness.summaries(model) if model else {}
        return {"versions": [version_json(v, records.get(v.id))
                             for v in svc.models.versions(user=user)]}

    @app.get("/api/model/versions/{version_id}/quality")
    def version_quality(user: UserDep, version_id: str) -> dict[str, Any]:
        report = svc.likeness.report(user=user, version_id=version_id)
        return quality_json(report.version, report.record, report.baseline)

    @app.get("/api/model/versions/{version_id}/quality/probes/{index}")
    def probe_image(user: UserDep, version_id: str, index: int) -> Response:
        data = svc.likeness.probe_image(user=user, version_id=version_id, index=index)
        return Response(content=data, media_type="image/png")

    @app.get("/api/model/compare")
    def compare(user: UserDep, a: str | None = None, b: str | None = None) -> dict[str, Any]:
        """Version ``a`` against ``b`` probe by probe (defaults: the newest version against
        the one the gate compared it with)."""
        return comparison_json(svc.likeness.compare(user=user, a=a, b=b))

    @app.get("/api/model/compare/grid.png")
    async def compare_grid(user: UserDep, a: str | None = None, b: str | None = None) -> Response:
        comparison = svc.likeness.compare(user=user, a=a, b=b)
        png = await _in_thread(lambda: svc.likeness.grid_png(comparison))
        return Response(content=png, media_type="image/png")

    @app.get("/api/model/quality/chart.png")
    async def quality_chart(user: UserDep) -> Response:
        png = await _in_thread(lambda: svc.likeness.chart_png(user=user))
        return Response(content=png, media_type="image/png")

    @app.post("/api/model/versions/{version_id}/activate")
    def activate(user: UserDep, version_id: str) -> dict[str, Any]:
        svc.models.activate(user=user, version_id=version_id)
        return model_body(user)

    @app.get("/api/model/versions/{version_id}/weights")
    def weights(user: UserDep, version_id: str) -> Response:
        version = svc.models.version(user=user, version_id=version_id)
        data = svc.models.weights(user=user, version_id=version_id)
        return Response(
            content=data, media_type="application/octet-stream",
            headers={
                "content-disposition": f'attachment; filename="lora-v{version.number}.safetensors"',
                "x-weights-sha256": version.weights_sha256,
            },
        )

    @app.get("/api/model/log")
    def model_log(user: UserDep) -> dict[str, Any]:
        """The audit events, and the retraining log: one entry per training with what it kept,
        the gate's decision and the likeness scores before and after."""
        return {"events": list(svc.models.log(user=user)),
                "trainings": svc.likeness.training_log(user=user)}

    @app.post("/api/generate")
    def generate(user: UserDep, body: GenerateBody) -> dict[str, Any]:
        generation = svc.generation.generate(user=user, request=GenerationRequest(
            prompt=body.prompt, num_outputs=body.num_outputs, seed=body.seed,
            lora_scale=body.lora_scale, version_id=body.version_id,
        ))
        return {"generation": generation_json(generation)}

    @app.get("/api/generations/{generation_id}/images/{index}")
    def generation_image(
        user: UserDep, generation_id: str, index: int
    ) -> Response:
        data = svc.generation.image(user=user, generation_id=generation_id, index=index)
        return Response(content=data, media_type="image/png")

    @app.post("/api/webhooks/replicate")
    async def replicate_webhook(request: Request) -> dict[str, Any]:
        from selfie_lora.adapters.trainers.replicate_webhooks import (
            parse_training_webhook,
            verify_webhook,
        )

        secret = svc.settings.webhook_secret
        if secret is None:
            raise AuthError("webhooks are not configured on this server")
        body = await request.body()  # capped by the guard before it is read
        verify_webhook(secret=secret.get_secret_value(), headers=dict(request.headers),
                       body=body)
        event = parse_training_webhook(body)
        # Only the signed body says which training this is about; the URL is not signed.
        training = await _in_thread(lambda: svc.training.apply_webhook(
            webhook_id=request.headers["webhook-id"], remote_id=str(event["id"]),
            status=str(event["status"]), step=event.get("step"), total=event.get("total")))
        return {"ok": True, "training_id": training.id if training else None}

    return app


async def _read_capped(file: UploadFile, *, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while chunk := await file.read(1024 * 1024):
        size += len(chunk)
        if size > limit or limit <= 0:
            raise PayloadTooLargeError(
                f"the upload is larger than {max(limit, 0) // (1024 * 1024)} MB")
        chunks.append(chunk)
    return b"".join(chunks)


async def _in_thread(fn: Any) -> Any:
    from starlette.concurrency import run_in_threadpool

    return await run_in_threadpool(fn)
