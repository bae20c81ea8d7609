"""The pages. Each one finds the signed-in user (or sends them to sign in), checks the CSRF token
of a form, calls one service method and renders a template; the templates only lay out what
they are given."""

from __future__ import annotations

import dataclasses
import logging
import re
import secrets
import threading
from collections.abc import Mapping, Sequence
from typing import Annotated, Any
from urllib.parse import quote, urlsplit

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from fastapi.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse

from selfie_lora.api.deps import finished, in_intake, in_thread, upload_slot
from selfie_lora.api.downloads import chart_answer, grid_answer, reads_a_part, weights_response
from selfie_lora.api.head import ran_for_head
from selfie_lora.api.paths import root_path, without_root
from selfie_lora.api.server_errors import report_server_error
from selfie_lora.dataset.archive import archive_kind
from selfie_lora.dataset.limits import SentFile
from selfie_lora.domain.entities import GateStatus, TrainingStatus, Version
from selfie_lora.domain.likeness import (
    DEFAULT_GATE_TOLERANCE,
    UNDECIDED_AGAINST,
    UNDECIDED_BOX,
    UNDECIDED_NOTES,
    UNDECIDED_WORDS,
    GateMeasure,
    LikenessFacts,
    Undecided,
    decided_on_baseline_photos,
    gate_cell,
    gate_measure,
    gate_reason_now,
    headline_score,
    likeness_cell,
    shown_change,
)
from selfie_lora.domain.plan import (
    LORA_SCALE_MAX,
    LORA_SCALE_MIN,
    lora_scale_from_text,
    lora_scale_text,
)
from selfie_lora.domain.progress import time_left
from selfie_lora.domain.versions import find_version
from selfie_lora.errors import (
    AuthError,
    ConflictError,
    DatasetRejectedError,
    DeploymentMismatchError,
    ErrorCode,
    ForbiddenError,
    InvalidInputError,
    NotFoundError,
    PayloadTooLargeError,
    RateLimitedError,
    SelfieLoraError,
    UploadInProgressError,
)
from selfie_lora.likeness.chart import SERIES as CHART_SERIES
from selfie_lora.services.common import ModelHistory, utcnow
from selfie_lora.services.erasure import ErasureBlockedError
from selfie_lora.services.generation import (
    GenerationRequest,
    field_at_fault,
    num_outputs_from_text,
    seed_from_text,
    stored_pictures,
    withheld_pictures,
)
from selfie_lora.services.likeness import grid_text
from selfie_lora.services.models import before_version_number, version_number_below
from selfie_lora.services.ports import MAX_SEED
from selfie_lora.services.training import TrainingService, UploadResult
from selfie_lora.web.app import (
    FORM_NOT_DONE,
    POLL_SESSION_ENDED,
    SIGNED_OUT,
    SignInRequired,
    Viewer,
    Web,
    page_message,
)
from selfie_lora.web.cookies import (
    FORM_COOKIE,
    SESSION_COOKIE,
)

logger = logging.getLogger(__name__)
router = APIRouter(include_in_schema=False)

# Portrait styles for the generate page: the trigger word is added by the service.
PRESETS = (
    ("Studio portrait", "a studio portrait photo, soft light, neutral background"),
    ("Outdoors", "a candid photo outdoors in golden hour light"),
    ("Business headshot", "a professional headshot in a suit, office background"),
    ("Film still", "a cinematic film still, 35mm, dramatic lighting"),
    ("Oil painting", "an oil painting portrait in the style of the old masters"),
)
FormStr = Annotated[str, Form()]
OptionalFormStr = Annotated[str | None, Form()]


def _web(request: Request) -> Web:
    web: Web = request.app.state.web
    return web


def _page_viewer(request: Request) -> Viewer:
    """The signed-in user (signed out: a redirect to the sign-in page, and back after)."""
    return _web(request).viewer(request)


def _form_viewer(request: Request, csrf_token: OptionalFormStr = None) -> Viewer:
    """The signed-in user of a form, which must carry its session's CSRF token (403)."""
    web = _web(request)
    viewer = web.viewer(request)
    web.check_csrf(request, viewer, csrf_token)
    return viewer


PageViewer = Annotated[Viewer, Depends(_page_viewer)]
FormViewer = Annotated[Viewer, Depends(_form_viewer)]


def _local_target(next_path: str | None, *, root: str = "") -> str:
    """Where to go after signing in: a path on this site only (never another host), inside the
    app (``root``, the root path it is served under, taken off: a bookmark of an address the
    browser showed, ``?next=/sl/photos``, led to /sl/sl/photos)."""
    if not next_path:
        return "/photos"
    # A browser reads "\" as "/" ("/\evil.com" is "//evil.com", another host) and drops tabs
    # and newlines: refused here rather than left to how the response quotes its Location.
    if any(c == "\\" or ord(c) < 0x20 or ord(c) == 0x7F for c in next_path):
        return "/photos"
    parts = urlsplit(next_path)
    if parts.scheme or parts.netloc or not next_path.startswith("/") or next_path.startswith("//"):
        return "/photos"
    return without_root(next_path, root)


def _client(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def _see(request: Request, path: str) -> RedirectResponse:
    """A 303 to ``path`` of the app, after the root path it is served under (api.paths)."""
    return RedirectResponse(root_path(request.scope) + path, status_code=303)


def _done(request: Request, path: str, sentence: str) -> RedirectResponse:
    """To ``path`` after a form that succeeded, which says ``sentence`` there (focused, once:
    ``Web.say_done``), as a Delete says "Generation deleted"."""
    response = _see(request, path)
    _web(request).say_done(response, request, sentence)
    return response


def _pictures(count: int) -> str:
    return f"{count} picture{'s' if count != 1 else ''}"


# ---------------------------------------------------------------------------- signing in


@router.get("/")
def home(request: Request) -> Response:
    web = _web(request)
    web.viewer(request)  # signed out: the sign-in page
    return _see(request, "/photos")


def _signin_form(request: Request, template: str, *, status_code: int = 200,
                 **context: Any) -> HTMLResponse:
    web = _web(request)
    token, cookie = web.signer.form_tokens(request.cookies.get(FORM_COOKIE))
    response = web.render(request, template, form_token=token, status_code=status_code,
                          **context)
    if not ran_for_head(request.scope):
        # A HEAD (a link checker, curl -I) shows no form: no cookie for one, as a HEAD clears
        # none of the one-time cookies either (api.head).
        web.set_form_cookie(response, request, cookie)
    return response


# A form whose token no longer holds: shown again (the name and where to go kept), to be sent
# once more, rather than an error page that loses both.
FORM_EXPIRED = ("this page was open too long (or the browser's cookies were cleared): "
                "{what} again")


def _signed_in(request: Request) -> Viewer | None:
    """The browser's user, where it is signed in (None otherwise)."""
    try:
        return _web(request).viewer(request)
    except SignInRequired:
        return None


async def _replace_session(web: Web, request: Request, response: Response, token: str) -> None:
    """The new session's cookie on ``response``, and this browser's old session (if any) ended:
    it would stay valid in the database, unseen, until it expired. Sessions of other browsers
    stay valid."""
    old = web.signer.session_token(request.cookies.get(SESSION_COOKIE))
    await in_thread(lambda: web.services.users.sign_out(token=old))
    web.set_session_cookie(response, request, token)


ACCOUNT_DELETED = "account-deleted"


@router.get("/signin")
def signin_page(request: Request, next: str | None = None) -> Response:
    if _signed_in(request) is not None:
        # Signed in already (Back after signing in, a bookmark): where the form would lead.
        return _see(request, _local_target(next, root=root_path(request.scope)))
    web = _web(request)
    # Deleting one's account leads here (settings_delete_account): without a word a deletion
    # looks like a session that merely expired. Said only to the browser that deleted it, by
    # its signed, short-lived notice cookie, once: ?deleted=1 said it to anyone sent the link.
    notice = web.take_notice(request)
    return _signin_form(request, "signin.html",
                        next=_local_target(next, root=root_path(request.scope)),
                        deleted=notice == ACCOUNT_DELETED, not_done=notice == FORM_NOT_DONE,
                        poll_ended=notice == POLL_SESSION_ENDED,
                        signed_out=notice == SIGNED_OUT)


@router.post("/signin")
async def signin(request: Request, name: FormStr, password: FormStr, form_token: FormStr,
                 next: OptionalFormStr = None) -> Response:
    web = _web(request)
    target = _local_target(next, root=root_path(request.scope))
    if not web.form_token_valid(request, form_token):
        return _signin_form(request, "signin.html", status_code=403, next=target, name=name,
                            message=FORM_EXPIRED.format(what="sign in"))
    try:
        signed = await in_thread(lambda: web.services.users.sign_in(
            name=name, password=password, client=_client(request)))
    except (AuthError, ForbiddenError, RateLimitedError) as exc:  # Forbidden: disabled
        # A wrong name or password: the password field, emptied, is the one to type again.
        failed = _signin_form(request, "signin.html", status_code=exc.http_status, next=target,
                              name=name, message=exc.message,
                              field=("password",) if isinstance(exc, AuthError) else None)
        if exc.retry_after is not None:  # as every error answer does (api.app, web.app)
            failed.headers["Retry-After"] = str(exc.retry_after)
        return failed
    response = _see(request, target)
    await _replace_session(web, request, response, signed.token)
    return response


@router.get("/signup")
def signup_page(request: Request) -> Response:
    if _signed_in(request) is not None:
        # Back after signing up showed the empty form, which made a second account.
        return _see(request, "/photos")
    return _signin_form(request, "signup.html")


@router.post("/signup")
async def signup(request: Request, name: FormStr, password: FormStr, password_again: FormStr,
                 form_token: FormStr) -> Response:
    web = _web(request)
    if not web.form_token_valid(request, form_token):
        return _signin_form(request, "signup.html", status_code=403, name=name,
                            message=FORM_EXPIRED.format(what="create the account"))
    if password != password_again:
        return _signin_form(request, "signup.html", status_code=422, name=name,
                            message="the two passwords differ",
                            field=("password", "password_again"))
    try:
        signed = await in_thread(lambda: web.services.users.sign_up(
            name=name, password=password, client=_client(request)))
    except (InvalidInputError, ConflictError, RateLimitedError) as exc:
        failed = _signin_form(request, "signup.html", status_code=exc.http_status, name=name,
                              message=page_message(exc), field=_signup_field(exc))
        if exc.retry_after is not None:  # as every error answer does (api.app, web.app)
            failed.headers["Retry-After"] = str(exc.retry_after)
        return failed
    response = _see(request, "/photos")
    await _replace_session(web, request, response, signed.token)
    # Said on the page it leads to, as every other form's success is (it said nothing).
    web.say_done(response, request,
                 f"Your account {signed.user.name} was created and you are signed in.",
                 new_session_token=signed.token)
    return response


def _signup_field(exc: SelfieLoraError) -> tuple[str, ...] | None:
    """The sign-up fields a refusal is about (None: no field's, a rate limit or a write that
    clashed with another: the name was not at fault, and marking it sent the reader to change
    a good name)."""
    if exc.code == ErrorCode.INVALID_PASSWORD:
        return ("password", "password_again")
    if isinstance(exc, InvalidInputError) or exc.code == ErrorCode.USER_EXISTS:
        return ("name",)  # an unusable or taken name
    return None


@router.post("/signout")
def signout(request: Request, _viewer: FormViewer) -> Response:
    web = _web(request)
    web.services.users.sign_out(
        token=web.signer.session_token(request.cookies.get(SESSION_COOKIE)))
    response = _see(request, "/signin")
    web.clear_session_cookie(response, request)
    web.set_notice_cookie(response, request, SIGNED_OUT)
    return response


# ---------------------------------------------------------------------------- photos


@router.get("/photos")
def photos_page(request: Request, viewer: PageViewer) -> HTMLResponse:
    web = _web(request)
    page = _photos_context(web, viewer)
    # Where an upload sent without scripts led (``_upload_report``): that upload's report,
    # once, while its set is still the current one.
    uploaded = web.take_uploaded(request, viewer)
    dataset = page["dataset"]
    if uploaded is not None and dataset is not None and dataset.id == uploaded:
        # The report says what the checks found: the stored advice would say it twice.
        page |= _report_context(dataset, page["photos"], originals={})
        page.update(advice=None, upload_report=True)
    return web.render(request, "photos.html", viewer=viewer, **page)


def _photos_context(web: Web, viewer: Viewer) -> dict[str, Any]:
    """What the photos page shows besides an upload's report: the current set and its advice."""
    svc = web.services
    dataset = svc.intake.latest(user=viewer.user)
    photos = svc.intake.photos(user=viewer.user, dataset_id=dataset.id) if dataset else []
    training = _latest_training(web, viewer)
    return {"dataset": dataset, "photos": photos,
            "busy": training is not None and not training.training.status.is_terminal,
            "advice": _stored_advice(dataset, photos) if dataset else None}


def _upload_answer(web: Web, request: Request, viewer: Viewer, template: str, *,
                   status_code: int = 200, **context: Any) -> HTMLResponse:
    """An upload's report: the fragment ``template`` for the page's script (which sends the
    X-CSRF-Token header and puts it in #report), or, for the form sent without scripts, the
    whole photos page with the report in #report: the fragment alone was an untitled,
    unstyled page with no way back and empty picture boxes (app.js fills them). (An upload
    that kept a set is sent there by a redirect instead: ``_upload_report``.)"""
    if "x-csrf-token" in request.headers:
        return web.render(request, template, viewer=viewer, status_code=status_code, **context)
    page = _photos_context(web, viewer)
    # The report says what the checks found: the stored advice would say it twice.
    page["advice"] = None
    return web.render(request, "photos.html", viewer=viewer, status_code=status_code,
                      **(page | context), upload_report=True)


def _stored_advice(dataset: Any, photos: Sequence[Any]) -> dict[str, Any]:
    """The advice stored with the set (what its upload's report said): the set's findings and,
    per photo named in one, whether it was kept and its findings. The page shows it after the
    upload's report is gone (a reload, coming back after "Go to training")."""
    findings = [f.as_dict() for f in dataset.findings]
    kept = {p.name for p in photos}
    rows = [row for row in _report_rows([], findings, {}, kept=kept, originals={})
            if row["findings"]]
    return {"set_findings": [f for f in findings if not f.get("photo")], "photos": rows}


@router.post("/photos/upload")
async def photos_upload(request: Request, viewer: PageViewer,
                        files: Annotated[list[UploadFile], File()],
                        csrf_token: OptionalFormStr = None,
                        names: Annotated[list[str] | None, Form()] = None) -> Response:
    """The upload form's photos (several files, or one zip), sent by the page's script with
    the CSRF token in a header, or without scripts by the form itself with its hidden
    ``csrf_token`` field, as every other form sends it; answers the report as an HTML
    fragment for the page's script, or without scripts a redirect to the photos page that
    shows it (a refusal: that page, with the refusal's status)."""
    web = _web(request)
    try:
        web.check_csrf(request, viewer, csrf_token)
    except ForbiddenError as exc:
        # The page puts the answer in its report: a report saying why (a tab's token gone
        # stale), not the whole error page nested in this one.
        return await _upload_refused(web, request, viewer, exc)
    try:
        # The user's upload slot (as the API's uploads take) before the spooled bodies are read
        # into memory, held until the intake is done.
        with upload_slot(request, viewer.user):
            return await _take_in(web, request, viewer, files, names or [])
    except UploadInProgressError as exc:
        return await _upload_refused(web, request, viewer, exc)


async def _take_in(web: Web, request: Request, viewer: Viewer,
                   files: list[UploadFile], names: list[str]) -> Response:
    """The upload's photos read, taken in, and its report (or why it was refused)."""
    svc = web.services
    # The page's script sends each file's own name beside it, as a field (sent as it is): a
    # filename carries a '"' as %22 but a '%' as it is, so '100%22off.jpg' was read back as
    # '100"off.jpg' (and its row found no picture on the device). Taken where each is what
    # its filename says; else (the form without scripts) the filenames are read back. A part
    # with no filename is named by the intake, as the API's are ("photo1").
    raw_names, escaped = svc.intake.upload_names([f.filename or "" for f in files], names)
    # The spooled files themselves: the intake reads each once, and not at all one larger than
    # a photo may be (its finding, file_too_large): a 60 MB camera raw file was read whole.
    named: list[SentFile] = [(name, f.file) for name, f in zip(raw_names, files, strict=True)]
    # By content, as everything sent is judged: a zip whose name lost its ".zip" (a phone's
    # share sheet, a renamed download) was refused as an archive among the photos. Its first
    # bytes tell (archive_kind reads a leading archive from the first 512).
    is_zip = False
    if len(files) == 1:
        is_zip = archive_kind(await files[0].read(512)) == "zip archive"
        await files[0].seek(0)
    zip_data = await files[0].read() if is_zip else b""
    # The intake keeps each photo under a cleaned name (NFC, bounded, no control characters):
    # rows are keyed by it, and carry the name the browser sent so that the page finds the
    # file on the device for its thumbnail. A zip's own name is no photo: none of it here.
    originals = {} if is_zip else dict(zip(
        svc.intake.stored_names(raw_names, form_escaped=escaped),
        svc.intake.sent_names(raw_names, form_escaped=escaped), strict=True))

    def intake() -> UploadResult:
        if is_zip:
            return svc.training.upload_zip(user=viewer.user, data=zip_data, start=False)
        return svc.training.upload_files(user=viewer.user, files=named, start=False,
                                         form_escaped=escaped)

    try:
        # The report in the same trip off the event loop: it reads the stored photos (the
        # database, the storage's manifest).
        return await in_intake(request, lambda: _upload_report(web, request, viewer, intake(),
                                                               originals=originals))
    except DatasetRejectedError as exc:
        rejected = exc
    except (InvalidInputError, ConflictError, PayloadTooLargeError) as exc:
        return await _upload_refused(web, request, viewer, exc)
    # Off the event loop as the kept set's report: the page without scripts reads the current
    # set (the database, the storage's manifest).
    return await in_thread(lambda: _upload_answer(
        web, request, viewer, "_report.html", status_code=422, trainable=False,
        message=rejected.message,
        # A zip's photos are those the findings name (nothing says which others it held).
        report=_report_rows(list(originals), rejected.details, rejected.boxes, kept=None,
                            originals=originals),
        set_refused=True, set_findings=[d for d in rejected.details if not d.get("photo")]))


def _upload_report(web: Web, request: Request, viewer: Viewer, result: UploadResult, *,
                   originals: Mapping[str, str]) -> Response:
    """The report of the photos an upload kept (blocking: reads them back) for the page's
    script; the form sent without scripts is sent on to the photos page, which shows it
    (POST-redirect-GET: the page as the POST's answer sent the photos again on a reload)."""
    dataset = result.dataset
    if "x-csrf-token" not in request.headers:
        response = _see(request, "/photos")
        web.say_uploaded(response, request, dataset.id)
        return response
    photos = web.services.intake.photos(user=viewer.user, dataset_id=dataset.id)
    # With the set now current, which the page puts in place of the one it showed.
    return _upload_answer(web, request, viewer, "_uploaded.html", dataset=dataset,
                          photos=photos, **_report_context(dataset, photos, originals=originals))


def _report_context(dataset: Any, photos: Sequence[Any], *,
                    originals: Mapping[str, str]) -> dict[str, Any]:
    """What the report of an upload that kept ``dataset`` (its ``photos``) shows."""
    findings = [f.as_dict() for f in dataset.findings]
    boxes = {p.name: list(p.face_box) for p in photos if p.face_box}
    # The photos the intake read, by the names it stored them under: the multipart names
    # would list a zip as a photo and miss the photos inside it.
    rows = _report_rows([p.name for p in photos], findings, boxes,
                        kept={p.name for p in photos}, originals=originals)
    # The stored photo (the training crop) for each kept one: the only picture of a photo that
    # came inside a zip (the page shows the file from the device when it has it).
    stored = {p.name: f"/photos/{dataset.id}/{p.index}.jpg" for p in photos}
    for row in rows:
        row["stored"] = stored.get(row["name"])
    return {"trainable": True, "report": rows,
            "set_findings": [d for d in findings if not d.get("photo")]}


async def _upload_refused(web: Web, request: Request, viewer: Viewer,
                          exc: SelfieLoraError) -> HTMLResponse:
    """An upload refused as a whole: the report, with the error's status. Off the event loop:
    the page without scripts reads the current set (the database, the storage's manifest: an
    S3 GET), which on the loop stalled every request of the server."""
    response = await in_thread(lambda: _upload_answer(
        web, request, viewer, "_report.html", status_code=exc.http_status, trainable=False,
        message=page_message(exc), report=[], set_findings=[]))
    if exc.retry_after is not None:
        response.headers["Retry-After"] = str(exc.retry_after)
    return response


def _report_rows(names: list[str], findings: list[dict[str, Any]],
                 boxes: dict[str, list[float]], *, kept: set[str] | None,
                 originals: Mapping[str, str]) -> list[dict[str, Any]]:
    """One row per photo in ``names`` (the photos read) or named in a finding: its state, its
    findings, its face box (fractions of the photo as sent) and the file's name as sent
    (``originals``, by stored name; a zip's photos have none). The state is "kept",
    "left-out" (a finding rejected it, or it is not among ``kept``) or, where the set as a
    whole was refused (``kept`` None), "not-stored" for a photo that could have been kept: it
    is not one to change, and is not shown as one. A file the intake skipped as no photo at
    all (its only findings ``ignored_file`` notes: a Takeout .json, an iPhone .AAE) is
    "skipped", after the photos: it was never a photo, so neither "left out" (with an empty,
    red-outlined picture box) nor "usable, but not stored"."""
    order: list[str] = []
    for name in [*names, *(str(f["photo"]) for f in findings if f.get("photo"))]:
        if name not in order:
            order.append(name)
    rows = []
    for name in order:
        mine = [f for f in findings if f.get("photo") == name]
        rejected = any(f.get("severity") == "reject" for f in mine)
        box = boxes.get(name)
        skipped = bool(mine) and all(f.get("code") == "ignored_file" for f in mine)
        state = ("skipped" if skipped else "left-out" if rejected
                 else "not-stored" if kept is None
                 else "kept" if name in kept else "left-out")
        rows.append({
            "name": name, "original": originals.get(name), "state": state, "findings": mine,
            "box": [round(v * 100, 2) for v in box] if box else None,
        })
    # Stable: the photos in their order, then the skipped files in theirs.
    return sorted(rows, key=lambda row: row["state"] == "skipped")


@router.get("/photos/{dataset_id}/{index}.jpg")
@router.head("/photos/{dataset_id}/{index}.jpg")
def photo_file(request: Request, viewer: PageViewer, dataset_id: str, index: int) -> Response:
    web = _web(request)
    photo = web.services.intake.photo(user=viewer.user, dataset_id=dataset_id, index=index)
    # no-store as the Photos page that shows it: a face kept in the browser's disk cache
    # outlived the sign-out on a shared computer. A small crop, fetched again at each view.
    headers = {"Cache-Control": "private, no-store", "Content-Length": str(photo.size)}
    if request.method == "HEAD":
        # Its own HEAD, as the weights': run as the GET (api.head.HeadAsGet), it read the whole
        # photo from the storage and dropped it. The headers alone; the stream closed unread.
        photo.close()
        return Response(status_code=200, media_type="image/jpeg", headers=headers)
    return StreamingResponse(photo.chunks, media_type="image/jpeg", headers=headers)


# ---------------------------------------------------------------------------- training


def _latest_training(web: Web, viewer: Viewer) -> Any:
    try:
        return web.services.training.progress(user=viewer.user)
    except NotFoundError:
        return None


def _status_context(web: Web, viewer: Viewer, view: Any) -> dict[str, Any]:
    """The figures the training status shows: progress, elapsed time, time left, how it
    ended and what is active now."""
    if view is None:
        return {"view": None}
    training = view.training
    overview = web.services.models.overview(user=viewer.user)
    now = utcnow()
    end = training.completed_at or now
    elapsed = (end - training.started_at).total_seconds() if training.started_at else None
    # From this attempt's steps alone: the time since started_at counts the model's load, and
    # the step count a resumed training's inherited steps.
    left = time_left(training, now=now)
    return {
        "view": view, "training": training, "version": view.version, "overview": overview,
        "active": not training.status.is_terminal, "percent": round(training.progress * 100),
        "elapsed": _duration(elapsed), "left": _duration(left),
        "ended": {TrainingStatus.SUCCEEDED: "succeeded", TrainingStatus.FAILED: "failed",
                  TrainingStatus.CANCELED: "was canceled"}.get(training.status),
        "held": view.version is not None and view.version.gate_status is GateStatus.HELD,
        "loss_points": _polyline(training.loss_curve, total=training.total_steps),
        "resume_step": web.services.training.resume_point(training),
        # The newest sample image: the LoRA as trained so far.
        "sample_step": view.samples[-1] if view.samples else None,
    }


LOSS_CHART = (300, 60)  # the SVG's view box: the page scales it


def _polyline(curve: tuple[tuple[int, float], ...], *, total: int) -> str | None:
    """The loss curve as SVG polyline points, steps across, loss up (None: nothing to draw)."""
    if len(curve) < 2:
        return None
    width, height = LOSS_CHART
    last = max(total, curve[-1][0], 1)
    low = min(v for _, v in curve)
    high = max(v for _, v in curve)
    span = (high - low) or 1.0
    return " ".join(f"{width * s / last:.1f},{height - 4 - (height - 8) * (v - low) / span:.1f}"
                    for s, v in curve)


def _duration(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, rest = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {rest:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def _train_page(request: Request, web: Web, viewer: Viewer, view: Any) -> HTMLResponse:
    svc = web.services
    model = svc.models.find(user=viewer.user)
    dataset = svc.intake.latest(user=viewer.user)
    # The page speaks of a retraining (what it keeps, the Retrain button) as the domain does
    # (is_retraining: the model has a version to retrain). Any ended training counted, so a
    # first training canceled or failed before it made a version offered to "Retrain", and
    # said that "the version you use now stays active" beside "No version is active yet".
    retraining = model is not None and bool(svc.models.versions(user=viewer.user))
    # Whether the next first training finds its pin taken: by a first training that started
    # and ended without a version (domain.plan.plan_training's trained_before), so the text
    # does not promise to pin the version configured now.
    pinned = view is not None and view.training.status.is_terminal
    # What the start would be refused with (the 409 page stays for a change meanwhile): said
    # before the user submits, with the same advice.
    refusal = svc.training.start_refusal(user=viewer.user) if dataset is not None else None
    return web.render(request, "train.html", viewer=viewer, model=model, dataset=dataset,
                      retraining=retraining, pinned=pinned, refusal=refusal,
                      **_status_context(web, viewer, view))


@router.get("/train")
def train_page(request: Request, viewer: PageViewer) -> HTMLResponse:
    web = _web(request)
    return _train_page(request, web, viewer, _latest_training(web, viewer))


@router.get("/train/status")
def train_status(request: Request, viewer: PageViewer) -> HTMLResponse:
    """The live part of the training page (htmx polls its figures while a training runs)."""
    web = _web(request)
    view = _latest_training(web, viewer)
    if request.headers.get("hx-request") == "true" and (
            view is None or view.training.status.is_terminal):
        # The poll that finds the training ended: not only its figures but the page's whole
        # panel (how it ended, no Cancel button, the Train button back) is swapped.
        response = _train_page(request, web, viewer, view)
        response.headers.update({"HX-Retarget": "#train-panel", "HX-Reselect": "#train-panel",
                                 "HX-Reswap": "outerHTML"})
        return response
    return web.render(request, "_status.html", viewer=viewer,
                      **_status_context(web, viewer, view))


@router.get("/train/{training_id}/samples/{step}.jpg")
def train_sample(request: Request, viewer: PageViewer, training_id: str, step: int) -> Response:
    web = _web(request)
    return _private(web.services.training.sample_image(user=viewer.user, training_id=training_id,
                                                       step=step), media_type="image/jpeg")


def _private(data: bytes, *, media_type: str) -> Response:
    """An image of the viewer's: no shared cache may keep it."""
    return Response(data, media_type=media_type, headers={"Cache-Control": "private"})


@router.post("/train/start")
async def train_start(request: Request, viewer: FormViewer) -> Response:
    web = _web(request)
    await in_thread(lambda: web.services.training.start(user=viewer.user))
    # True with scripts (the status updates) and without (it does not: a note says to refresh).
    return _done(request, "/train", "Training started: its status is below.")


@router.post("/train/cancel")
def train_cancel(request: Request, viewer: FormViewer, training_id: FormStr) -> Response:
    web = _web(request)
    # Without scripts the page does not update: its Cancel may be sent after the training ended,
    # which the outcome's message says, as the API's answer does.
    outcome = web.services.training.cancel_with_outcome(user=viewer.user,
                                                        training_id=training_id)
    return _done(request, "/train", outcome.message)


@router.post("/train/resume")
def train_resume(request: Request, viewer: FormViewer, training_id: FormStr) -> Response:
    web = _web(request)
    web.services.training.resume(user=viewer.user, training_id=training_id)
    return _done(request, "/train",
                 "Training resumed from its last checkpoint: its status is below.")


# ---------------------------------------------------------------------------- versions


def version_rows(versions: Sequence[tuple[Version, LikenessFacts | None]], *,
                 active_version_id: str | None,
                 photos: Mapping[str, int],
                 undecided: Mapping[str, Undecided] | None = None) -> list[dict[str, Any]]:
    """The Versions table, newest first. "Change" is the gate's measure: this version's identity
    minus the one it was judged against, both scored on the photos the gate decided on: this
    version's, or, when it was held on them (``measured_on`` "baseline_photos"), the training
    photos of the version it was judged against, which the change then names ("-0.482 vs v1 on
    v1's photos": on its own photos it may have gained). Each version's own score is against
    its own training photos, so two versions trained on different photo sets do not subtract:
    that difference would show a drop the gate did not see, or hide one. That version is not
    always the row below (after a held version, a rollback), so the change names it: "-0.015 vs
    v1". ``undecided``: why the gate has not decided on the pending versions whose worker
    stepped away on a database lock (``TrainingService.undecided``), said so."""
    undecided = undecided or {}
    rows = []
    active_number = next((v.number for v, _ in versions if v.id == active_version_id), None)
    for version, record in versions:
        gate = _gate_change(version.gate_details)
        delta = gate[2] - gate[1] if gate is not None else None
        against = version.gate_details.get("baseline_version_number")
        tolerance = headline_score(version.gate_details, "tolerance")
        shown = (None if gate is None
                 else f"{delta:+.0%} faces" if gate[0] is GateMeasure.FACE_SHARE
                 # The digits that read on the side of the tolerance the gate decided.
                 else shown_change(gate[1], gate[2], tolerance=DEFAULT_GATE_TOLERANCE
                                   if tolerance is None else tolerance))
        change = (None if shown is None
                  else f"{shown} vs v{against}" if isinstance(against, int) else shown)
        if change is not None and decided_on_baseline_photos(version.gate_details) is not None:
            change += f" on v{against}'s photos" if isinstance(against, int) else (
                " on the photos of the version it was judged against")
        why = (undecided.get(version.id) if version.gate_status is GateStatus.PENDING
               else None)
        # What the page shows, no more: its Likeness worked out once, by likeness_cell, as
        # ``selfie-lora versions`` prints it.
        rows.append({"version": version, "change": change,
                     "likeness": likeness_cell(version, record), "gate": gate_cell(version),
                     "active": active_version_id == version.id,
                     # The gate's reason as of now: "it is active" on a rolled-back version
                     # says which one is active now.
                     "gate_reason": gate_reason_now(
                         version.gate_reason, active=active_version_id == version.id,
                         active_number=active_number) if version.gate_reason else None,
                     "photos": photos.get(version.id),
                     # Its Gate cell's, use dialog's and no-script box's words of it.
                     "undecided_words": UNDECIDED_WORDS[why] if why is not None else None,
                     "undecided_against": UNDECIDED_AGAINST[why] if why is not None else None,
                     "undecided_box": UNDECIDED_BOX[why] if why is not None else None})
    return rows


def _gate_change(details: Mapping[str, Any]) -> tuple[GateMeasure, float, float] | None:
    """The gate's measure and this version's scores in it, before and after: the identity, or
    the face share when the training photos have no face (a version held on that showed no
    change at all), on the photos the gate decided on."""
    decided_on = decided_on_baseline_photos(details) or details
    before, after = decided_on.get("before"), decided_on.get("after")
    if not isinstance(before, dict) or not isinstance(after, dict):
        return None  # nothing to beat (a first version), or not scored
    measure = gate_measure(before, after)
    old, new = before.get(measure), after.get(measure)
    if isinstance(old, int | float) and isinstance(new, int | float):
        return measure, float(old), float(new)
    return None


# Rows of the Versions page's table (and its log's trainings of their time): every version
# made the page grow by a row, a form and a log entry with each training, 371 KB at 300.
VERSIONS_PAGE = 50


def _page_before(before: str | None) -> int | None:
    """The Versions page's forms' hidden ``before`` as a version number; None (the newest page)
    for anything else, as for a number past any version's. The page's own ``?before=`` refuses
    one that is no number or below 1 (``before_version_number``); a form's has done its work
    by then."""
    # Below 1 (not a number, 0): the newest page.
    return (version_number_below(before) or None) if before else None


def _versions_url(before: int | None) -> str:
    return "/versions" if before is None else f"/versions?before={before}"


def _page_of(rows: Sequence[Mapping[str, Any]], below: int | None
             ) -> tuple[list[Mapping[str, Any]], int | None]:
    """The page's rows: the ``VERSIONS_PAGE`` newest numbered below ``below`` (None, or one
    with none below it: the newest), and the number to ask the next page before."""
    below_rows = [r for r in rows if below is None or r["version"].number < below]
    # None older (?before=1, a hand-made link): the newest page, not an empty table captioned
    # "Versions v to v".
    below_rows = below_rows or list(rows)
    shown = below_rows[:VERSIONS_PAGE]
    older = shown[-1]["version"].number if len(below_rows) > VERSIONS_PAGE else None
    return shown, older


def _history_of_page(history: ModelHistory, shown: Sequence[Mapping[str, Any]], *,
                     first: bool, last: bool) -> ModelHistory:
    """``history`` with the trainings made in the time of the page's versions only: from the
    training of its oldest version (back to the first on the last page) up to that of the
    version above the page (to now on the first). Cut before the log is made of them: making
    every training's entry to keep a page's cost a full log per view."""
    if not shown:
        return history if first else dataclasses.replace(history, trainings=[])
    made = {t.id: t.created_at for t in history.trainings}
    newest, oldest = shown[0]["version"], shown[-1]["version"]
    above = min((v for v in history.versions if v.number > newest.number),
                key=lambda v: v.number, default=None)
    until = None if first or above is None else made.get(above.training_id)
    since = None if last else made.get(oldest.training_id)
    return dataclasses.replace(history, trainings=[
        t for t in history.trainings
        if (since is None or t.created_at >= since) and (until is None or t.created_at < until)])


@router.get("/versions")
def versions_page(request: Request, viewer: PageViewer, a: str | None = None,
                  b: str | None = None, before: str | None = None) -> HTMLResponse:
    web = _web(request)
    svc = web.services
    try:
        below = before_version_number(before) if before else None
    except InvalidInputError as exc:
        # As the API's 422 says it, whatever its length or characters (the newest page was
        # shown, where the API refused it); Back to the newest page, not the photos.
        return web.error_page(request, exc.http_status, exc.message, str(exc.code),
                              back="/versions")
    # Read once and shown four ways (table, photo counts, comparison, log): each of them
    # reading the versions, records and trainings again cost the same rows several times.
    history = svc.models.history(user=viewer.user)
    model = history.model if history is not None else None
    versions = (svc.models.versions_with_likeness(user=viewer.user, history=history)
                if history is not None else [])
    photos = svc.models.photos_used(user=viewer.user, history=history) if history else {}
    rows = version_rows(versions, active_version_id=model.active_version_id if model else None,
                        photos=photos,
                        undecided=(svc.training.undecided(history=history)
                                   if history is not None else None))
    comparison = None
    compare_error = None
    compare_invalid: tuple[str, ...] = ()
    if len(versions) >= 2:
        try:
            comparison = svc.likeness.compare(user=viewer.user, a=a, b=b, history=history)
        except (InvalidInputError, NotFoundError) as exc:
            compare_error = exc.message
            # The select at fault is marked: the one naming no version (an edited or stale
            # link), or both for one version chosen twice.
            compare_invalid = tuple(name for name, ref in (("a", a), ("b", b))
                                    if ref and _named_version(rows, ref) is None) or ("a", "b")
            same = _named_version(rows, b)
            if exc.code == ErrorCode.SAME_VERSION and same is not None:
                compare_error = (f"you chose v{same.number} twice: choose two different "
                                 "versions to compare")
    shown, older = _page_of(rows, below)
    first = not rows or (bool(shown) and shown[0] is rows[0])
    log = (svc.likeness.training_log(user=viewer.user, history=_history_of_page(
               history, shown, first=first, last=older is None))
           if history is not None else [])
    # The comparison's versions are chosen in its form; when there is none (an error), the
    # ones the user chose, so that the form shows what was asked.
    chosen = ((comparison.a.id, comparison.b.id) if comparison is not None
              else tuple(v.id if v else None for v in (_named_version(rows, a),
                                                        _named_version(rows, b))))
    # The grid's and the chart's words beside them: only their picture said which version was
    # in which column, each probe's result, and what the chart plots besides the likeness.
    return web.render(request, "versions.html", viewer=viewer, model=model, rows=shown,
                      all_rows=rows, older=older, newest=not first,
                      before=below if not first else None,
                      comparison=comparison, compare_error=compare_error,
                      compare_invalid=compare_invalid, log=log,
                      chosen=chosen, chart_series=CHART_SERIES,
                      # The chart's values as text (its alt points to them): the nearest-photo
                      # identity and the sane share were in the picture alone.
                      chart=(svc.likeness.chart_values(model, history=history)
                             if model is not None else None),
                      grid=grid_text(comparison) if comparison is not None else None)


def _named_version(rows: Sequence[Mapping[str, Any]], ref: str | None) -> Version | None:
    """The version ``ref`` names (its number, as the compare form sends it, or its id)."""
    return find_version([row["version"] for row in rows], ref) if ref else None


@router.post("/versions/{version_id}/activate")
def version_activate(request: Request, version_id: str, viewer: FormViewer,
                     before: OptionalFormStr = None) -> Response:
    web = _web(request)
    models = web.services.models
    activated = models.activate(user=viewer.user, version_id=version_id).active
    # The activation made it active; its number comes of the activation's own answer.
    assert activated is not None
    # Back to the page the form was on (its hidden ``before``): the newest page, where it went,
    # does not show a version from an older page, so the user who rolled back saw neither the
    # row nor its "active" badge. No #vN fragment: the browser scrolled to the row, the notice
    # out of sight and not focused (autofocus is skipped then), so the notice says where it is.
    return _done(request, _versions_url(_page_before(before)),
                 f"Version {activated.number} is now active: new pictures use it. "
                 "Its row below is marked active.")


@router.get("/versions/{version_id}/weights")
@router.head("/versions/{version_id}/weights")
def version_weights(request: Request, viewer: PageViewer, version_id: str) -> Response:
    # As the API's: the answer says Accept-Ranges and ETag, so a browser resuming a download
    # sends Range and If-Range, and checks it with HEAD.
    web = _web(request)
    return weights_response(
        web.services.models.download_weights(
            user=viewer.user, version_id=version_id,
            for_range=reads_a_part(request)),
        range_header=request.headers.get("range"), if_range=request.headers.get("if-range"),
        if_none_match=request.headers.get("if-none-match"), head=request.method == "HEAD")


@router.get("/versions/compare/grid.png")
async def versions_grid(request: Request, viewer: PageViewer, a: str | None = None,
                        b: str | None = None) -> Response:
    # As the API's: an ETag, a 304 to a browser holding it.
    return await grid_answer(request, _web(request).services.likeness, viewer.user, a=a, b=b)


@router.get("/versions/chart.png")
async def versions_chart(request: Request, viewer: PageViewer) -> Response:
    # As the API's: an ETag, a 304 to a browser holding it, a HEAD that draws nothing.
    return await chart_answer(request, _web(request).services.likeness, viewer.user)


# ---------------------------------------------------------------------------- generate


@router.get("/generate")
def generate_page(request: Request, viewer: PageViewer, before: str | None = None) -> HTMLResponse:
    web = _web(request)
    query = request.query_params
    # What the form had after "Save the scale" (its one-time cookie: model_scale) and the
    # version chosen in it (?version=, after a Generate too): shown again as they were.
    kept = web.take_typed(request, viewer) or {}
    typed = {field: kept.get(field, "") for field in _KEPT_FIELDS}
    typed["version"] = query.get("version", "")
    return _generate(request, viewer, before=before, scale=_chosen_scale(query.get("lora_scale")),
                     typed={**typed, "lora_scale": None} if any(typed.values()) else None)


def _undecided_of(training: TrainingService,
                  versions: Sequence[Version]) -> Mapping[str, Undecided]:
    """``TrainingService.undecided_of`` for the Generate page's version list: a note there, so
    its read failing (a lock or a statement timeout, the very situation it words) is logged and
    the list shows the usual words, where it made the whole page an error page."""
    try:
        return training.undecided_of(versions=versions)
    except SelfieLoraError as exc:
        logger.warning("the Generate page's version list without why the gate has not decided "
                       "on a pending version: %s", exc.message)
        return {}


def _generate(request: Request, viewer: Viewer, *, before: str | None, scale: float | None,
              status_code: int = 200, **context: Any) -> HTMLResponse:
    """The Generate page; ``context``: the scale form's refusal (``scale_error``) and the values
    typed in the form (``typed``: its fields by name), shown again as they were."""
    web = _web(request)
    svc = web.services
    model = svc.models.find(user=viewer.user)
    # A page of the gallery: ?before= is the last one shown ("Older pictures"); without paging
    # only the 50 newest were ever listed.
    page = svc.generation.page(user=viewer.user, before=before or None)
    history = page.generations
    numbers = svc.models.version_numbers(
        user=viewer.user, version_ids={g.version_id for g in history})
    # The slider spans the range the model allows (the API's too), or a stored scale outside
    # it would show clamped and "Save the scale" would overwrite it. After a Generate it stays
    # at the scale that picture used (?lora_scale=), not the saved one.
    withheld = {g.id: withheld_pictures(g) for g in history if g.withheld}
    pictures = {g.id: stored_pictures(g) for g in history}
    context.setdefault("typed", None)
    context.setdefault("scale_error", None)
    context.setdefault("field_error", None)
    versions = svc.generation.versions(user=viewer.user)
    typed = context["typed"]
    if typed is not None and typed["version"] not in {str(v.number) for v in versions}:
        typed["version"] = ""  # none (an address edited by hand, a version deleted): the active
    # The version chosen in the form (None: the active one), kept by its links and forms.
    version = (typed["version"] if typed is not None else None) or None
    return web.render(request, "generate.html", viewer=viewer, model=model, history=history,
                      not_ready=svc.generation.not_ready(user=viewer.user),
                      versions=versions, version=version,
                      # What the list says of a pending version: "still being scored" was
                      # said of one whose worker stepped away on a database lock too.
                      undecided={vid: UNDECIDED_NOTES[why]
                                 for vid, why in _undecided_of(svc.training, versions).items()},
                      numbers=numbers, presets=PRESETS, scale_min=LORA_SCALE_MIN,
                      scale_max=LORA_SCALE_MAX, withheld=withheld,
                      older=page.older, before=before or None,
                      pictures=pictures, scale=scale, seed_max=MAX_SEED,
                      gallery_notices=(GENERATION_DELETED, GENERATION_GONE),
                      # The paging links keep the scale chosen (a Delete's form too): without
                      # it the slider went back to the saved scale, and so did the next picture.
                      older_url=_generate_url(before=page.older, scale=scale, version=version),
                      newest_url=_generate_url(before=None, scale=scale, version=version),
                      status_code=status_code, **context)


# The Generate form's fields "Save the scale" keeps for the page it leads to, in a one-time
# cookie (``Web.keep_typed``), never in the address: the access log and the browser's history
# keep an address, and a prompt is the user's own.
_KEPT_FIELDS = ("prompt", "num_outputs", "seed")


def _generate_url(*, before: str | None, scale: float | None, version: str | None) -> str:
    """The Generate page at the gallery's position ``before`` (None: the newest) with the scale
    and the version chosen on it (None: the saved one, the active one)."""
    query = [f"before={quote(before, safe='')}"] if before else []
    if scale is not None:
        query.append(f"lora_scale={lora_scale_text(scale)}")
    if version:
        query.append(f"version={quote(version, safe='')}")
    return "/generate" + ("?" + "&".join(query) if query else "")


# A Delete's notice (say_done): generate.html shows it at the gallery, where the page lands.
GENERATION_DELETED = "Generation deleted."
# A Delete of a generation that is gone already: a second click of the button (the page's
# scripts disable it; without them it is sent twice), another tab's Delete, the retention.
GENERATION_GONE = "That generation was deleted already."
# Where a Delete puts the page back: a gallery item's id (g-<generation id>) or its heading.
_GALLERY_ANCHOR = re.compile(r"g-[0-9A-Za-z-]{1,64}|pictures")


def _chosen_scale(value: str | None) -> float | None:
    """The scale of the address (the one the last Generate used), or None (then the saved
    one): an address edited by hand to a wrong one is ignored."""
    try:
        return lora_scale_from_text(value)
    except InvalidInputError:
        return None


@router.post("/generate")
async def generate(request: Request, viewer: FormViewer, prompt: FormStr,
                   num_outputs: OptionalFormStr = None,
                   seed: OptionalFormStr = None,
                   lora_scale: OptionalFormStr = None,
                   version: OptionalFormStr = None) -> Response:
    web = _web(request)
    try:
        # The CLI's parser (and the API's rules): int() took "1_0" and "٣" here, which it
        # refused; the scale's as Save the scale reads it (pydantic's float took "0.2_5" and
        # "infinity").
        # The scale first: a refused one goes to the error page (no field of this form's), and
        # a field refused after it is answered with the scale as parsed.
        scale = lora_scale_from_text(lora_scale)
        seed_value = seed_from_text(seed)
        count = num_outputs_from_text(num_outputs)
        # As the API's: on the generation service's threads, within the per-user limit (a 429
        # page). The slider's scale is this request's (the API's per-request lora_scale): it
        # was in a form of its own, so Generate quietly used the saved scale whatever the
        # slider showed. Saving it as the default stays "Save the scale"'s; without one, the
        # saved scale.
        gone = threading.Event()  # set by ``finished`` if the browser goes away first
        made = await finished(web.services.generation.submit(
            user=viewer.user, request=GenerationRequest(prompt=prompt, num_outputs=count,
                                                        seed=seed_value, lora_scale=scale,
                                                        # The API's version_id; none: the active.
                                                        version_id=version or None),
            client_gone=gone), request, client_gone=gone)
    except InvalidInputError as error:
        # A prompt of spaces (which passes the textarea's required), a seed or count the
        # browser let through: the page again with the field marked and what was typed, as
        # "Save the scale" answers; the error page lost them without scripts. A scale refused
        # is no field of this form's (the slider): the error page, as before.
        field = field_at_fault(error)
        if field is None or web.services.generation.not_ready(user=viewer.user) is not None:
            raise
        typed = {"prompt": prompt, "num_outputs": num_outputs or "", "seed": seed or "",
                 "version": version or "", "lora_scale": (lora_scale_text(scale)
                                                           if scale is not None else None)}
        return _generate(request, viewer, before=None, scale=None, status_code=422,
                         field_error={"field": field, "why": error.message}, typed=typed)
    # The pictures are at the top of the gallery: said, as a failure's page says why, with the
    # version that made them (the form names it; a request without one takes the active).
    number = web.services.models.version_numbers(user=viewer.user,
                                                 version_ids={made.version_id}).get(made.version_id)
    sentence = f"{_pictures(len(made.image_keys))} made" + (
        f" with version {number}" if number is not None else "")
    if made.withheld:
        sentence += f"; {_pictures(len(made.withheld))} withheld by the safety checker"
    # With the scale and the version it used: the next Generate uses them again.
    return _done(request, _generate_url(before=None, scale=scale, version=version),
                 sentence + ": the newest under Your pictures.")


@router.post("/generations/{generation_id}/delete")
def generation_delete(request: Request, viewer: FormViewer, generation_id: str,
                      before: OptionalFormStr = None,
                      lora_scale: OptionalFormStr = None, version: OptionalFormStr = None,
                      focus: OptionalFormStr = None) -> Response:
    web = _web(request)
    try:
        web.services.generation.delete(user=viewer.user, generation_id=generation_id)
        said = GENERATION_DELETED
    except NotFoundError:
        # What the user wanted is so: back to the gallery, saying it, not a "Not found" page
        # that left them wondering whether the first click had deleted it. The same words for
        # an id never theirs: nothing is told of another user's.
        said = GENERATION_GONE
    # Back to the page the button was on (its ?before=, a position that holds without the
    # generation just deleted), not to the newest page, where the user lost their place; with
    # the scale chosen there, which the next Generate uses (not the saved one); at the
    # generation next to the deleted one (the form's ``focus``), which takes the focus, with
    # "Generation deleted" said: it went to the top, focus on the body, and said nothing. Said
    # once (say_done; generate.html shows it at the gallery), not by the address (&deleted=1),
    # which said it again on a reload.
    anchor = focus if focus and _GALLERY_ANCHOR.fullmatch(focus) else "pictures"
    return _done(request, _generate_url(before=before or None, scale=_chosen_scale(lora_scale),
                                        version=version) + "#" + anchor, said)


@router.get("/generations/{generation_id}/{index}.png")
def generation_image(request: Request, viewer: PageViewer, generation_id: str, index: int) -> Response:
    web = _web(request)
    return _private(web.services.generation.image(user=viewer.user, generation_id=generation_id,
                                                  index=index), media_type="image/png")


@router.post("/model/scale")
def model_scale(request: Request, viewer: FormViewer, lora_scale: OptionalFormStr = None,
                prompt: OptionalFormStr = None, num_outputs: OptionalFormStr = None,
                seed: OptionalFormStr = None, version: OptionalFormStr = None) -> Response:
    """A refused scale (none, not a number, out of the range) comes back to the Generate page
    beside the field, what was typed in the form kept, as the Model page's re-pin does: "Save
    the scale" skips the browser's checks (formnovalidate, so that an empty prompt does not
    block it), and the general error page was a dead end. Nothing was changed."""
    web = _web(request)
    text = (lora_scale or "").strip()

    def refused(why: str) -> HTMLResponse:
        if web.services.generation.not_ready(user=viewer.user) is not None:
            # The page shows no form then (a stale page's Save): the error page says it.
            raise InvalidInputError(why, code=ErrorCode.INVALID_LORA_SCALE)
        typed = {"lora_scale": lora_scale or "", "prompt": prompt or "",
                 "num_outputs": num_outputs or "", "seed": seed or "", "version": version or ""}
        return _generate(request, viewer, before=None, scale=None, status_code=422,
                         scale_error=why, typed=typed)

    if not text:
        return refused(f"type the scale to save: a number from {LORA_SCALE_MIN} "
                       f"to {LORA_SCALE_MAX}")
    # The text fronts' parser (Generate's, the CLI's): its words name the page's label, where
    # the service's name the API's field (lora_scale). float() took "1_0", "٣" and "inf".
    try:
        scale = lora_scale_from_text(text)
    except InvalidInputError as error:
        return refused(error.message)
    assert scale is not None  # ``text`` is not empty
    saved = web.services.models.set_lora_scale(user=viewer.user, lora_scale=scale)
    sentence = (f"Scale {lora_scale_text(saved.model.lora_scale)} saved: "
                "Generate and the API use it from now on.")
    response = _see(request, _generate_url(before=None, scale=None, version=version))
    # The button is in the Generate form: what was typed there is kept, not thrown away, in a
    # one-time cookie (the address put the prompt into the access log and the history).
    kept = {"prompt": prompt or "", "num_outputs": num_outputs or "", "seed": seed or ""}
    if any(kept.values()) and not web.keep_typed(response, request, viewer, kept):
        # Too long for a cookie (a long prompt of non-Latin letters): the rest is kept.
        web.keep_typed(response, request, viewer, {**kept, "prompt": ""})
        sentence += " Your prompt was too long to keep here: type or paste it again."
    web.say_done(response, request, sentence)
    return response


@router.post("/model/scale/default")
def model_scale_default(request: Request, viewer: FormViewer) -> Response:
    """Back to the default scale, no longer custom (the API's ``{"lora_scale": null}``): a
    later change of the default reaches the model again."""
    web = _web(request)
    saved = web.services.models.change(user=viewer.user, lora_scale_to_default=True)
    return _done(request, "/generate",
                 f"Back to the default scale, {lora_scale_text(saved.model.lora_scale)}.")


# ---------------------------------------------------------------------------- model, settings


@router.get("/model")
def model_page(request: Request, viewer: PageViewer) -> HTMLResponse:
    return _model(request, viewer)


def _model(request: Request, viewer: Viewer, *, status_code: int = 200,
           **context: Any) -> HTMLResponse:
    """The model page; ``context``: the trainer-version form's refusal and the values typed."""
    web = _web(request)
    model = web.services.models.find(user=viewer.user)
    overview = web.services.models.overview_of(model) if model is not None else None
    # Shown after a re-pin to more pixels than the stored photos have (the form comes back
    # here), and for as long as they are the latest.
    photos_notice = (web.services.training.photos_to_upload_again(user=viewer.user)
                     if model is not None else None)
    # The trainer version shown is the one the next training uses: a model never trained
    # takes the configured one at its first training, unless its user chose one.
    pin = web.services.training.next_pin(user=viewer.user) if model is not None else None
    # None active: 'none yet' read as no version at all when some were there.
    inactive = (len(web.services.models.versions(user=viewer.user))
                if overview is not None and overview.active is None else 0)
    return web.render(request, "model.html", viewer=viewer, overview=overview, pin=pin,
                      inactive_versions=inactive,
                      backend=web.services.settings.trainer, photos_notice=photos_notice,
                      status_code=status_code, **context)


@router.post("/model/trainer-version")
def model_trainer_version(request: Request, viewer: FormViewer,
                          trainer_version: OptionalFormStr = None,
                          reason: OptionalFormStr = None) -> Response:
    """A refusal (a version typed wrong, no reason, one the operator does not allow, a running
    training) comes back to the Model page beside the form, what was typed kept, as the
    Settings key form does: on the general error page, Back without scripts lost both fields.
    Nothing was changed, so sending it again is safe."""
    web = _web(request)
    typed = {"typed_version": trainer_version or "", "typed_reason": reason or ""}
    if not (trainer_version or "").strip():
        return _model(request, viewer, status_code=422, repin_field="trainer_version",
                      repin_error="type the trainer version to move to",
                      repin_code=ErrorCode.INVALID_INPUT, **typed)
    try:
        changed = web.services.models.change_trainer_version(user=viewer.user,
                                                   trainer_version=trainer_version or "",
                                                   reason=reason or "")
    except (InvalidInputError, ForbiddenError, ConflictError) as error:
        # The reason's refusals (none; over its length: invalid_request) are the reason
        # field's; a running training is no field's (the message takes the focus); any other
        # is the version typed.
        field = ("reason" if error.code in (ErrorCode.REASON_REQUIRED, ErrorCode.INVALID_REQUEST)
                 else None if isinstance(error, ConflictError) else "trainer_version")
        return _model(request, viewer, status_code=error.http_status, repin_field=field,
                      repin_error=page_message(error), repin_code=str(error.code), **typed)
    return _done(request, "/model", f"Trainer version {changed.model.trainer_version} pinned: "
                 "the next training uses it.")


# The revoked keys the Settings page lists (the most recently revoked); GET /api/keys has all.
REVOKED_KEYS_SHOWN = 20


def _settings(request: Request, viewer: Viewer, *, status_code: int = 200,
              **context: Any) -> HTMLResponse:
    """The settings page. Its create form carries a new one-time nonce, stored (hashed) with
    the key it makes: the form sent again makes no other key."""
    web = _web(request)
    now = utcnow()
    working, stopped = web.services.users.keys_by_state(user=viewer.user, now=now)
    # Revoked keys are kept for good (their names and prefixes tell a user what a log line's
    # key was): folded away, and only the latest, so the keys that work stay at the top of a
    # page that grew by a row with every rotation.
    return web.render(request, "settings.html", viewer=viewer, status_code=status_code,
                      keys=working, revoked=stopped[:REVOKED_KEYS_SHOWN],
                      revoked_count=len(stopped), now=now,
                      key_form_nonce=secrets.token_urlsafe(24), **context)


@router.get("/settings")
def settings_page(request: Request, viewer: PageViewer) -> HTMLResponse:
    return _settings(request, viewer)


@router.post("/settings/keys")
def settings_create_key(request: Request, viewer: FormViewer, name: FormStr,
                        form_nonce: OptionalFormStr = None) -> Response:
    web = _web(request)
    if not form_nonce:
        # A page from before the nonce (or a hand-made request): sending it again could make a
        # second key, so nothing is made; the page shown now carries one.
        return _settings(request, viewer, status_code=422, name=name,
                         key_notice="this page was out of date: create the key again")
    try:
        key, secret = web.services.users.create_key(user=viewer.user, name=name,
                                                    form_nonce=form_nonce)
    except InvalidInputError as error:
        # Beside the form, the name kept: nothing was made, so sending it again is safe.
        return _settings(request, viewer, status_code=422, name_error=error.message, name=name)
    except ConflictError as error:
        if error.code != ErrorCode.KEY_ALREADY_MADE:
            raise
        # This form was sent again (a reload, or Back to the page that showed the secret):
        # the key exists, and its secret is stored nowhere to show again.
        return _settings(request, viewer, status_code=409, key_notice=error.message)
    # The secret is in this answer's body alone (no cookie, nothing stored but its SHA-256; the
    # page is no-store): a reload sends the form's nonce again, which makes nothing.
    return _settings(request, viewer, new_secret=secret, new_key=key)


@router.post("/settings/keys/{key_id}/revoke")
def settings_revoke_key(request: Request, key_id: str, viewer: FormViewer) -> Response:
    web = _web(request)
    key = web.services.users.revoke_key(user=viewer.user, key_id=key_id)
    return _done(request, "/settings",
                 f"The key {key.name} was revoked: scripts using it stop working.")


@router.post("/settings/delete")
def settings_delete_account(request: Request, viewer: FormViewer,
                            confirm: OptionalFormStr = None) -> Response:
    """Delete the signed-in account and everything it owns (``services.erasure``): the name
    typed again confirms it; a training queued or running refuses it (cancel it first)."""
    web = _web(request)
    if not web.services.erasure.confirmed(name=viewer.user.name, typed=confirm):
        return _settings(request, viewer, status_code=422,
                         delete_error="type your name to confirm: nothing was deleted",
                         delete_name_wrong=True)
    try:
        web.services.erasure.erase_by_id(user_id=viewer.user.id)
    except ErasureBlockedError as error:
        # How to go on in this page's words (the service's message says what happened): the
        # form has no force, so a training is canceled on the Train page (linked beside it).
        # Once the account is disabled this browser is signed out: the service's periodic
        # collection finishes the deletion (AccountEraser.finish_pending).
        remedy = ("; cancel it on the Train page first, then delete your account"
                  if error.stage == "active" else
                  ": the deletion finishes on its own within minutes")
        return _settings(request, viewer, status_code=409, delete_error=error.message + remedy,
                         delete_busy=error.stage == "active")
    except DeploymentMismatchError as error:
        # Refused before anything changed (``GarbageCollector.check_deployment``): the storage
        # is another deployment's. Its words name the storage and the settings, for the
        # operator: they are logged under the reference the page gives, as the API's 503 does.
        server = report_server_error(error, method=request.method, path=request.url.path)
        return _settings(request, viewer, status_code=error.http_status, delete_error=(
            "Your account cannot be deleted just now: this service's storage is not set up "
            "right, so nothing was deleted. The operator must fix the storage configuration: "
            f"please tell them (reference {server.reference}), then try again."))
    response = _see(request, "/signin")
    web.clear_session_cookie(response, request)
    web.set_notice_cookie(response, request, ACCOUNT_DELETED)
    return response
