"""Likeness tracking: score every version on its model's fixed probes, let the gate decide whether
a new version replaces the active one, alert on a drop, and compare versions.

The training service calls ``judge`` once a training's version is stored (the training stays
``processing``, phase "scoring", until then), and records the verdict with ``apply_verdict`` in
the same transaction that ends the training: this service owns the likeness records and the
versions' gates, the training service owns the training's status.

1. **score** the version: generate each probe (same prompt, same seed, the version's weights at
   the fixed ``PROBE_LORA_SCALE`` whatever scale the user chose, through
   ``GenerationService.render``: the user's own code path), store the images
   (``quality/versions/<version>/probe-<n>-scale-<s>.png``), measure each image (blank,
   saturated, broken, sharpness) and find its face (``FaceAnalyzer``), then score the faces
   against the training photos' faces (``domain.likeness.score_probes``). Training photos are
   analysed once per dataset (``quality/datasets/<dataset>/<embedding model>.json``).
2. **gate** (only while the version's gate is ``pending``): score the active version against the
   *same* training photos (its probe faces are stored, so this is arithmetic, unless its probes
   were made at another ``SELFIE_LORA_PROBE_SIZE``: they are made again at this one), decide
   (``domain.likeness.decide_gate``). A held version gets an alert, logged and, when
   ``SELFIE_LORA_ALERT_URL`` is set, POSTed there: at least once, never fatal, tried again
   after a failure or a dead sender by the reconcilers (``deliver_due_alerts``,
   ``domain.alerts``).

Comparisons score both versions against the training photos of the newer one, probe by probe.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from selfie_lora.domain import alerts
from selfie_lora.domain.entities import (
    GateStatus,
    Model,
    Probe,
    Training,
    User,
    Version,
    names_no_row,
)
from selfie_lora.domain.likeness import (
    ACTIVATE_HINT,
    BASELINE_PHOTOS,
    DEFAULT_GATE_TOLERANCE,
    DEFAULT_PROBE_COUNT,
    GATE_OFF_REASON,
    KEPT_NOT_ACTIVATED,
    NEW_PHOTOS,
    PROBE_LORA_SCALE,
    Embedding,
    GateMeasure,
    IdentityScores,
    LikenessFacts,
    LikenessStatus,
    LikenessSummary,
    ProbeResult,
    VersionLikeness,
    baseline_no_longer_active,
    decide_gate,
    decided_on_baseline_photos,
    gate_measure,
    headline_score,
    held_but_user_activated,
    nothing_to_beat_reason,
    probes_for_existing_model,
    score_probes,
    shown_scores,
    stored_embeddings,
    training_figures,
    unscored_words,
)
from selfie_lora.domain.versions import VERSION_ACTIVATED, find_version, no_such_version
from selfie_lora.errors import (
    AlertDeliveryError,
    BlobMissingError,
    DatabaseLockedError,
    DatabaseUnreachableError,
    ErrorCode,
    GenerationError,
    InvalidInputError,
    NoModelError,
    NotFoundError,
    SelfieLoraError,
    StorageError,
    StorageUnavailableError,
    TrainingInterruptedError,
)
from selfie_lora.likeness.chart import ChartPoint, chart_inputs, drawn_from, render_chart
from selfie_lora.likeness.grid import GridRow, grid_drawn_from, grid_inputs, render_grid
from selfie_lora.likeness.images import analysis_array, image_sanity
from selfie_lora.services.common import ModelHistory, page_limit, read_history, utcnow
from selfie_lora.services.generation import GenerationService
from selfie_lora.services.layout import chart_key, grid_key, photo_key, probe_image_key, reference_key
from selfie_lora.services.ports import (
    Alerter,
    BlobStore,
    FaceAnalyzer,
    LoraHold,
    Repository,
    Telemetry,
)
from selfie_lora.services.telemetry import NullTelemetry

logger = logging.getLogger(__name__)






CANCELED_REASON = ("version {number}'s training was canceled before the likeness gate decided, "
                   f"so {KEPT_NOT_ACTIVATED}{ACTIVATE_HINT}")
# ... and one the gate could not judge at all (``TrainingService._end_unjudged``): {why} says why.
UNJUDGED_REASON = ("the likeness gate could not judge version {number}: {why}, so "
                   f"{KEPT_NOT_ACTIVATED}{ACTIVATE_HINT} (on the Versions page, where you can "
                   "also compare it with the active version)")


# Why a version could not be scored, as its owner reads it (its record's ``error``, the gate's
# reason "could not be scored (...)"), for an error of the server's side (a 5xx) other than the
# generator's: its own words are the operator's (a path of the server, the object storage's
# endpoint, the database's refusal, a face tool not installed), which the WARNING keeps. Raised
# while the probes are made or while the training photos are analysed, hence "scored"; the owner's
# step is to tell the operator (the gate reason adds "activate it yourself").
SCORING_SERVER_ERROR = ("the server's storage or setup failed while it was scored; tell the "
                        "operator if it lasts")
# ... and for a generator's error that carries no sentence written for the user
# (``GenerationError.user_message``): the local generator's words name the weights cache's path,
# the base pipeline's folder or torch's own text, so the owner reads this, as the API's generation
# endpoint answers a fixed sentence; the words are in the WARNING.
SCORING_GENERATOR_ERROR = ("the image generator failed while its probes were made; tell the "
                           "operator if it lasts")
# ... and why the active version's photos could not be read for that (the storage's words in the
# WARNING the worker logs).
BASELINE_PHOTOS_UNREAD = "its training photos could not be read"


def _scoring_error(exc: SelfieLoraError) -> str:
    """What a version's owner is told of ``exc``, which ended its scoring: a client's error's
    message (4xx, written for the user, as the API answers it), a generator's user_message, else
    ``SCORING_GENERATOR_ERROR`` for a generator's error and ``SCORING_SERVER_ERROR`` for any
    other."""
    if isinstance(exc, GenerationError):
        return exc.user_message or SCORING_GENERATOR_ERROR
    return exc.message if exc.http_status < 500 else SCORING_SERVER_ERROR


class BaselinePhotosUnreadableError(StorageError):
    """The active version's training photos could not be read while a new version was judged
    (the storage is away, not the photos gone): the caller tries the scoring again later."""


class _PhotosGoneError(Exception):
    """``why``: the owner's words (the gate's reason); ``detail``: the error's own, which may
    name the storage's keys, for the operator's WARNING only."""

    def __init__(self, why: str, *, detail: str | None = None) -> None:
        super().__init__(why)
        self.why = why
        self.detail = detail


@dataclass(frozen=True)
class Chart:
    """The likeness chart (``LikenessService.chart``) or a comparison's grid (``grid``):
    ``inputs``, the digest of what it shows (``chart_inputs``, ``grid_inputs``: equal digests,
    the same picture), and the PNG (None: not drawn). ``whole`` False: a grid drawn with a
    probe image missing from the storage (a blank cell), which its digest does not tell from
    the whole one (it names the images' keys): neither stored nor to be cached by a browser."""

    inputs: str
    png: bytes | None
    whole: bool = True


@dataclass(frozen=True)
class ChartValues:
    """What the chart plots: every version's point, and the number of the version on whose
    training photos they are measured (None: none scored, no identity plotted)."""

    points: list[ChartPoint]
    photos_of: int | None


@dataclass(frozen=True)
class GateVerdict:
    """What the gate decided about a version, before it is recorded."""

    version_id: str
    model_id: str
    status: GateStatus
    reason: str
    details: dict[str, Any]
    baseline: Version | None  # what it was compared with (None: nothing to beat)
    reference_id: str | None  # the training photos both were scored against
    record: VersionLikeness  # the version's likeness record


@dataclass(frozen=True)
class GateDecided:
    """A version's gate decided inside a caller's transaction (``apply_verdict``,
    ``hold_unjudged``): a held one's alert claimed by this process, to deliver once that
    transaction committed (None: it passed, or no alerter, the alert recorded, never sent, or
    ``hold_unjudged(claim=False)``, the alert left due for a reconciler), and
    the operator's log line, to write once it committed too (``log``)."""

    alert: alerts.ClaimedAlert | None
    status: GateStatus
    version_number: int
    model_id: str
    reason: str

    def log(self) -> None:
        """The operator's line of the decision (a held version's "likeness alert" WARNING), for
        the caller to write once the transaction committed: one written inside it told of a
        decision, and an alert, never recorded when the transaction was rolled back (a cancel
        asked before the hold, a failed commit)."""
        if self.status is GateStatus.PASSED:
            logger.info("version %d of model %s passed the likeness gate: %s",
                        self.version_number, self.model_id, self.reason)
        else:
            logger.warning("likeness alert: version %d of model %s held back: %s",
                           self.version_number, self.model_id, self.reason)


@dataclass(frozen=True)
class Reference:
    """The face embeddings of one dataset's training photos (photos without a face left out)."""

    dataset_id: str
    embedding_model: str
    photos: int
    embeddings: tuple[Embedding, ...]


@dataclass(frozen=True)
class LikenessReport:
    model: Model
    version: Version
    record: VersionLikeness | None
    baseline: Version | None  # what it was (or would be) compared with


@dataclass(frozen=True)
class ProbeComparison:
    probe: Probe
    a: ProbeResult | None
    b: ProbeResult | None
    a_score: dict[str, Any] | None  # ProbeScore.as_dict() against the common reference
    b_score: dict[str, Any] | None


@dataclass(frozen=True)
class Comparison:
    model: Model
    a: Version
    b: Version
    record_a: VersionLikeness | None
    record_b: VersionLikeness | None
    scores_a: IdentityScores | None  # against ``reference``
    scores_b: IdentityScores | None
    reference_dataset_id: str | None
    probes: tuple[ProbeComparison, ...]
    # Whose training photos both sides are scored against: the newer version's, A or B (None:
    # they could not be read, and there are no scores).
    reference_version: Version | None = None
    # Why a side that has scores is not compared (scored at another probe size or with another
    # face model: ``stale_reason``); None when it is, or has no scores at all.
    stale_a: str | None = None
    stale_b: str | None = None


DISCORD_CONTENT_MAX = 2000


def no_mentions() -> dict[str, list[str]]:
    """Discord's ``allowed_mentions`` that pings nobody, whatever "content" says (Slack's hooks
    ignore it); a new one each time, as it is stored with each alert."""
    return {"parse": []}


def _replaced_version_id(version: Version, *, active: str | None) -> str | None:
    """The version ``version`` was stored to replace, which the gate judges it against: the one
    active when it was stored, whatever its user activated since (trying it early, rolling back:
    the verdict must not depend on which buttons were clicked meanwhile, nor on when a dead
    worker's scoring was taken over). Versions stored before that was recorded: the one its
    user's override replaced, or else ``active`` (the model's active version now)."""
    details = version.gate_details
    if "active_when_stored" in details:
        stored = details["active_when_stored"]
        return str(stored) if stored else None  # None: nothing was active, nothing to beat
    override = details.get("override")
    if isinstance(override, dict):
        replaced = override.get("replaced_version_id")
        return str(replaced) if replaced else None
    return active


def _headline(scores: object) -> Mapping[str, Any] | None:
    return scores if isinstance(scores, dict) else None


def alert_text(*, user_name: str, version_number: int, baseline_number: int | None,
               before: object, after: object, tolerance: float, message: str,
               url: str | None, photos_of: int | None = None) -> str:
    """A held-back version's alert as a person reads it in a chat: whose, which versions, the
    likeness before and after, why, and where to look."""
    compared = gate_measure(_headline(before), _headline(after))
    if compared is GateMeasure.FACE_SHARE:
        # Training photos without a face: no identity on either side, the gate compared the
        # face share. Scored versions are worded by it, never as "not scored".
        measure, unit, form = "faces in", " of probes", "{:.0%}"
    else:
        measure, unit, form = "likeness", "", "{:.3f}"

    def shown(scores: object) -> str:
        value = headline_score(scores, compared)
        return form.format(value) if value is not None else "not scored"
    after_text, before_text = shown(after), shown(before)
    after_value, before_value = headline_score(after, compared), headline_score(before, compared)
    if (compared is GateMeasure.IDENTITY and after_value is not None
            and before_value is not None):
        # The digits the gate's reason shows, so that the drop reads as it was decided.
        after_text, before_text = shown_scores(after_value, before_value, tolerance=tolerance)
    headline = (f"{measure} {after_text}{unit}" if after_text != "not scored"
                else "likeness not scored")
    against = (f" against version {baseline_number}'s {before_text}"
               if baseline_number is not None else "")
    if (photos_of is not None and compared is GateMeasure.IDENTITY
            and after_text != "not scored"):
        # The identity depends on the photos it is measured on (the face share does not).
        against += f" on version {photos_of}'s training photos"
    line = (f"selfie-lora held back {user_name}'s version {version_number} ({headline}"
            f"{against}, tolerance {tolerance:g}). {message.rstrip('.')}.")
    return f"{line} Versions: {url}" if url else line


def mismatch_alert_text(*, user_name: str, version_number: int, message: str,
                        url: str | None) -> str:
    """The alert of a version held because Replicate published it to another model
    (``version_mismatch``): no likeness, baseline score or tolerance, which had no part in it."""
    line = (f"selfie-lora held back {user_name}'s version {version_number} (not for its "
            f"likeness: Replicate published it to another model). {message.rstrip('.')}.")
    return f"{line} Versions: {url}" if url else line


# The training log's page (GET /api/model/log) when no limit is asked for.
LOG_PAGE = 50
# How many alerts a reconcile pass sends in one go, its due alerts and those of the versions it
# holds together (one budget, ``AlertSends``), each up to the alert timeout against a slow
# endpoint (5 s by default): the rest stay due for the next passes (a hold's recorded due at
# once, or, when the budget ran out during the hold, claimed, then due once its claim runs out).
ALERTS_PER_PASS = 10
# The time a reconcile pass gives those sends (``AlertSends``), or one alert timeout when that is
# longer: a send starts only if it can end within it, so a pass's sends end within it whatever
# the alert timeout (ten sends to an endpoint that answers just within the timeout took 50 s).
# A stop asked while they run ends them after the send in flight, up to one alert timeout: within
# the 30 s a worker's stop allows (``worker.STOP_GRACE_S``) for a timeout up to 30 s, the
# default 5 s included; a longer one can outlast it.
ALERT_SENDS_SECONDS = 15.0


class AlertSends:
    """What a reconcile pass may still send, its round of due alerts and the alerts of the
    versions it holds together: at most ``count`` sends, none started unless it can end
    (``send_seconds``: the alert timeout, the longest one send takes) within ``seconds`` of when
    this was made, or within one send when that is longer (``monotonic``), none once
    ``stopping`` is set (the worker's stop: its grace allows the send in flight, not the pass's
    other sends), once a send failed (the endpoint is likely down: each further send would cost
    a timeout) or once ``end`` is called.

    The alerts not sent are left for a later pass, to send once: a due one is not claimed (asked
    before each claim); a hold's is recorded due at once when the budget was spent before the
    hold (``allowed`` then False), else claimed, and due once its claim runs out."""

    def __init__(self, *, count: int, seconds: float, send_seconds: float,
                 stopping: threading.Event | None = None,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self._left = count
        self._monotonic = monotonic
        # At least one send's time: a budget shorter than the alert timeout would start none,
        # and the alerts only a reconciler sends (a dead sender's, a retry) would never be sent.
        self._until = monotonic() + max(seconds, send_seconds)
        self._send_seconds = send_seconds
        self._stopping = stopping
        self._ended = False

    @property
    def left(self) -> int:
        """How many sends the count still allows (the time, a stop or a failure aside)."""
        return max(0, self._left)

    def allowed(self) -> bool:
        """Whether one more send may start now."""
        return (not self._ended and self._left > 0
                and (self._stopping is None or not self._stopping.is_set())
                # One that may take the alert timeout starts only if it can end in time: a
                # check of the start alone let a pass's last send run a whole timeout past it.
                and self._monotonic() + self._send_seconds <= self._until)

    def sent(self, *, delivered: bool) -> None:
        """A send done: counted, and one that failed ends the pass's sends."""
        self._left -= 1
        if not delivered:
            self._ended = True

    def end(self) -> None:
        """No send more this pass."""
        self._ended = True


@dataclass(frozen=True)
class LogPage:
    """A page of a model's log: ``trainings`` newest first, the ``events`` of their time oldest
    first; ``older``: the next page's ``before`` (None: this page reaches back to the start)."""

    events: Sequence[dict[str, Any]]
    trainings: list[dict[str, Any]]
    older: str | None


class LikenessService:
    def __init__(
        self,
        *,
        repo: Repository,
        blobs: BlobStore,
        generation: GenerationService,
        faces: FaceAnalyzer,
        alerter: Alerter | None = None,
        tolerance: float = DEFAULT_GATE_TOLERANCE,
        probe_count: int = DEFAULT_PROBE_COUNT,
        probe_size: int | None = None,
        gate_enabled: bool = True,
        telemetry: Telemetry | None = None,
        clock: Callable[[], datetime] = utcnow,
        public_url: str | None = None,
        alert_timeout: float = 5.0,
    ) -> None:
        if not 0.0 <= tolerance <= 1.0:
            raise ValueError("the gate tolerance is a similarity difference, 0..1")
        self._repo = repo
        self._telemetry: Telemetry = telemetry or NullTelemetry()
        self._blobs = blobs
        self._generation = generation
        self._faces = faces
        self._alerter = alerter
        # The longest one send to ``alerter`` takes (SELFIE_LORA_ALERT_TIMEOUT): a reconcile
        # pass starts a send only if it can end within the pass's time for sends (``AlertSends``).
        self.alert_timeout = alert_timeout
        self.tolerance = tolerance
        self._probe_count = probe_count
        self._probe_size = probe_size
        # Off: every new version passes at once (it is still scored).
        self.gate_enabled = gate_enabled
        self._clock = clock
        # The web app's versions page, linked from each alert (None: no public address known).
        self._versions_url = f"{public_url.rstrip('/')}/versions" if public_url else None

    # ------------------------------------------------------------------ worker side
    def judge(self, version_id: str, *, checkpoint: Callable[[], None] | None = None,
              unscorable: str | None = None) -> GateVerdict:
        """Score the version and decide whether it replaces the active one. Writes only
        likeness records (the version's, and the baseline's when it had none); the caller
        records the verdict (``apply_verdict``) in the transaction that ends the training.
        ``checkpoint`` is called between probes and may raise to stop (a worker shutting down);
        the probe images already made are kept, so the next attempt goes on from there.
        ``unscorable`` (why) judges the version as it stands: nothing is scored, neither the
        version nor its baseline (a worker dying on either would die again, for ever), only the
        likeness records already stored are used."""
        version, model, training = self._load(version_id)
        if unscorable is None:
            record = self.score(version.id, checkpoint=checkpoint)
        else:
            record = self._unscored(version, training, why=unscorable)
        if version.gate_status is not GateStatus.PENDING:
            # Decided already (a version stored before leases): keep that decision.
            return GateVerdict(
                version_id=version.id, model_id=model.id, status=version.gate_status,
                reason=version.gate_reason or "", details=dict(version.gate_details),
                baseline=None, reference_id=None, record=record)
        baseline_id = _replaced_version_id(version, active=model.active_version_id)
        baseline = (self._repo.get_version(baseline_id)
                    if baseline_id and baseline_id != version.id else None)
        # A lock is raised only while it is scored: once judged without scores (its attempts
        # spent), another step-away would be counted again and again, for ever (nothing ends a
        # training whose version is stored); judged without the reference then, as before.
        reference = (self._reference_for(version, outage_raises=True,
                                         lock_raises=unscorable is None)
                     if _scored(record) else None)
        after = self._scores_against(record, reference)
        if version.version_mismatch and baseline is not None:
            # Replicate published it to another model (replicate-python #419): nothing ever
            # generates with it (GenerationService.render), so it is held over the active version
            # whether the gate is on or off (off, it passed and replaced a version that made
            # pictures), and without the hint to activate it, which ModelService.activate
            # refuses.
            return GateVerdict(
                version_id=version.id, model_id=model.id, status=GateStatus.HELD,
                reason=(f"Replicate published version {version.number} to another model than "
                        "yours, so it cannot make your pictures (train again for a version of "
                        f"your own): {KEPT_NOT_ACTIVATED}"),
                details={"after": after.headline() if after else None, "before": None,
                         "tolerance": self.tolerance},
                baseline=baseline, reference_id=reference.dataset_id if reference else None,
                record=record)
        if baseline is None or not self.gate_enabled:
            # Nothing to beat (a first version, or none is active), or no gate: it passes,
            # scored or not.
            details: dict[str, Any] = {"after": after.headline() if after else None,
                                       "before": None, "tolerance": self.tolerance}
            return GateVerdict(
                version_id=version.id, model_id=model.id, status=GateStatus.PASSED,
                reason=(nothing_to_beat_reason(version.number) if baseline is None
                        else GATE_OFF_REASON),
                details=details, baseline=baseline,
                reference_id=reference.dataset_id if reference else None, record=record)
        before = None
        baseline_error = None
        if after is not None:
            stored = self._repo.get_likeness(baseline.id)
            if unscorable is None:
                baseline_record: VersionLikeness | None = self.score(baseline.id,
                                                                     checkpoint=checkpoint)
            else:
                baseline_record = stored if stored is not None and self._is_current(stored) else None
            before = self._scores_against(baseline_record, reference)
            if before is None:
                # The baseline exists but has no scores to compare with: the gate holds the new
                # version (decide_gate) and says why here.
                failed = baseline_record or stored
                baseline_error = (failed.error if failed is not None and failed.error
                                  else "it has no scores with the current face model and probe size")
                if unscorable is not None:
                    baseline_error += f"; it was not scored again: {unscorable}"
        # Also on the active version's own photos, when the new ones are others: measured on the
        # new photos alone, a retraining on someone else's photos beats the active version at
        # resembling that someone (decide_gate).
        theirs = unmeasured = None
        if before is not None and reference is not None:
            try:
                theirs = self._baseline_photos(baseline)
            except _PhotosGoneError as exc:
                # Deleted for good, not an outage: no attempt will read them. Judged on the new
                # photos alone, and the reason says so (decide_gate): never silently.
                unmeasured = exc.why
                logger.warning("version %s: %s%s", version.id, exc.why,
                               f" ({exc.detail})" if exc.detail else "")
            except StorageError as exc:
                if unscorable is None:
                    # An outage: the scoring is tried again (the training service steps away),
                    # never judged as if the check had passed.
                    raise BaselinePhotosUnreadableError(
                        f"the training photos of version {baseline.number} could not be read "
                        f"({exc.message})") from exc
                # Nothing is tried again any more: a drop cannot be ruled out, so it is held.
                before = None
                logger.warning("version %s: the training photos of version %d could not be read "
                               "and are not read again: %s", version.id, baseline.number,
                               exc.message)
                baseline_error = f"{BASELINE_PHOTOS_UNREAD}; they were not read again: {unscorable}"
        on_theirs = None
        if theirs is not None and reference is not None and not _same_photos(reference, theirs):
            cand_there = self._scores_against(record, theirs)
            base_there = self._scores_against(baseline_record, theirs)
            if cand_there is not None and base_there is not None:
                on_theirs = (cand_there, base_there)
        decision = decide_gate(
            candidate=after, baseline=before, tolerance=self.tolerance,
            candidate_number=version.number, baseline_number=baseline.number,
            candidate_error=record.error or "no likeness record", baseline_error=baseline_error,
            on_baseline_photos=on_theirs, baseline_photos_unmeasured=unmeasured,
        )
        if theirs is not None and "on_baseline_photos" in decision.details:
            decision.details["on_baseline_photos"]["reference_dataset_id"] = theirs.dataset_id
        return GateVerdict(
            version_id=version.id, model_id=model.id, status=decision.status,
            reason=decision.reason,
            details=decision.details, baseline=baseline,
            reference_id=reference.dataset_id if reference else None, record=record)

    def apply_verdict(self, tx: Repository, verdict: GateVerdict) -> GateDecided | None:
        """Record ``verdict`` inside the caller's transaction ``tx``: the version's gate, its
        activation when it passed (unless its user activated another version meanwhile) and,
        when it was held, an alert, claimed by this process when there is an alerter. Returned
        (None: decided before, or gone): that alert, to deliver once the transaction committed,
        and the operator's line, to write then too (``GateDecided.log``)."""
        locked = _lock_model_and_version(tx, verdict.model_id, verdict.version_id)
        if locked is None:
            return None
        model, current = locked
        if current.gate_status is not GateStatus.PENDING:
            return None  # decided before
        now = self._clock()
        baseline = verdict.baseline
        details = {
            **current.gate_details, **verdict.details, "decided_at": now.isoformat(),
            "baseline_version_id": baseline.id if baseline else None,
            "baseline_version_number": baseline.number if baseline else None,
            "reference_dataset_id": verdict.reference_id,
        }
        reason = verdict.reason
        active = (tx.get_version(model.active_version_id)
                  if model.active_version_id not in (None, current.id) else None)
        if baseline is not None and active is not None and active.id != baseline.id:
            # Read under the model's lock: the user made another version active while this one
            # was scored (the gate read the baseline when it began). The verdict stands (it was
            # judged against the version it was stored to replace), but its wording must not
            # send the user and the operator to a version that is no longer in use.
            reason = baseline_no_longer_active(reason, baseline_number=baseline.number,
                                               active_number=active.number)
        if verdict.status is GateStatus.PASSED:
            active_now = model.active_version_id
            chosen = current.gate_details.get("activations_when_stored")
            # Chosen since it was stored: even back to what was active then (v2, then v3 tried
            # early, then v2 again): the user's last choice, not this pass, decides.
            chose_since = chosen is not None and tx.count_events(
                current.model_id, kind=VERSION_ACTIVATED) > int(chosen)
            if active_now == current.id or (
                    active_now == current.gate_details.get("active_when_stored")
                    and not chose_since):
                tx.set_model_active_version(current.model_id, current.id)
            else:
                # The user activated another version by hand while this one was scored.
                reason = (reason.removesuffix(": it is active").removesuffix(", it is active")
                          + "; it passed, but the version you activated meanwhile stays active")
                details["kept_user_choice"] = active_now
        elif verdict.status is GateStatus.HELD and model.active_version_id == current.id:
            # Held, but its user activated it while it was scored: it stays active (their
            # choice stands), and the reason and alert must not say it was not activated.
            reason = held_but_user_activated(reason)
            details["kept_user_choice"] = current.id
        tx.set_version_gate(current.id, status=verdict.status, reason=reason, details=details)
        claimed = None
        if verdict.status is GateStatus.HELD:
            claimed = self._record_alert(tx, model, current, baseline=baseline,
                                         details=verdict.details, message=reason, at=now)
        self._gate_event(tx, current, status=verdict.status, baseline=baseline, reason=reason,
                         details=verdict.details)
        return GateDecided(alert=claimed, status=verdict.status, version_number=current.number,
                           model_id=current.model_id, reason=reason)

    def hold_canceled(self, tx: Repository, version_id: str) -> bool:
        """Inside the caller's transaction: the version of a training its user canceled before
        the gate decided is kept, held, never activated by the gate (one its user activated
        meanwhile stays active, and its reason says so). Whether it was held (not when it was
        decided already, or is gone)."""
        return self._hold_undecided(tx, version_id, reason=CANCELED_REASON,
                                    mark="canceled") is not None

    def hold_unjudged(self, tx: Repository, version_id: str, *, why: str, claim: bool = True
                      ) -> GateDecided | None:
        """Inside the caller's transaction: a version the gate could not judge (``why``, its
        owner's words) is kept, held, never activated by the gate, as a canceled one is; None
        when it was not (decided already, or gone). Unlike a canceled one (its owner asked for
        the end), its owner learns of it as of any version the gate held: the ``not_scored``
        alert, recorded and claimed as ``apply_verdict``'s (the returned hold's, to deliver
        once ``tx`` committed, and its log line, ``GateDecided.log``, to write then too), and
        the ``gate_held`` entry of the retraining log. ``claim`` False (a caller that will not
        send it: a reconcile pass whose sends are spent): the alert is recorded due at once,
        unclaimed, for any reconciler to claim and send, once."""
        held = self._hold_undecided(tx, version_id, reason=UNJUDGED_REASON.replace("{why}", why),
                                    mark="unjudged")
        if held is None:
            return None
        model, version, reason = held
        claimed = self._record_alert(tx, model, version, baseline=None, details={},
                                     message=reason, at=self._clock(), claim=claim)
        self._gate_event(tx, version, status=GateStatus.HELD, baseline=None, reason=reason,
                         details={})
        return GateDecided(alert=claimed, status=GateStatus.HELD, version_number=version.number,
                           model_id=version.model_id, reason=reason)

    def _hold_undecided(self, tx: Repository, version_id: str, *, reason: str,
                        mark: str) -> tuple[Model, Version, str] | None:
        """The hold of ``hold_canceled`` and ``hold_unjudged``: the version's model and row as
        locked, and the reason written, or None when it was not held."""
        found = tx.get_version(version_id)
        locked = None if found is None else _lock_model_and_version(tx, found.model_id, version_id)
        if locked is None:
            return None
        model, current = locked
        if current.gate_status is not GateStatus.PENDING:
            return None
        reason = reason.replace("{number}", str(current.number))
        if model.active_version_id == current.id:
            reason = held_but_user_activated(reason)  # activated by its user meanwhile: it stays
        tx.set_version_gate(current.id, status=GateStatus.HELD, reason=reason,
                            details={**current.gate_details, "decided_at": utcnow().isoformat(),
                                     mark: True})
        return model, current, reason

    def _record_alert(self, tx: Repository, model: Model, version: Version, *,
                      baseline: Version | None, details: Mapping[str, Any], message: str,
                      at: datetime, claim: bool = True) -> alerts.ClaimedAlert | None:
        """A held version's alert, recorded inside ``tx``: claimed by this process when there is
        an alerter (returned, to deliver once ``tx`` committed), else recorded, never sent;
        ``claim`` False, recorded due at once instead (None returned), for a reconciler."""
        owner = tx.get_user(model.user_id)
        alert = self._alert(model, version, baseline=baseline, details=details, message=message,
                            at=at, user_name=owner.name if owner is not None else None)
        if self._alerter is None:
            tx.set_version_alert(version.id, alert, due_at=None)
            return None
        if not claim:
            # Not sent by this process: due now, so the next reconciler's round claims it (the
            # compare-and-set claim lets one send it) instead of waiting out a claim nobody
            # would use.
            tx.set_version_alert(version.id, alert, due_at=at)
            return None
        # Due, and claimed by this process, which sends it once the transaction committed;
        # should it die first, any reconciler sends it when the claim runs out.
        claimed = alerts.ClaimedAlert(version_id=version.id, alert=alert, claim=at + alerts.CLAIM)
        tx.set_version_alert(version.id, alert, due_at=claimed.claim)
        return claimed

    def _gate_event(self, tx: Repository, version: Version, *, status: GateStatus,
                    baseline: Version | None, reason: str, details: Mapping[str, Any]) -> None:
        """The gate's decision in the retraining log (``gate_passed``, ``gate_held``)."""
        tx.add_event(model_id=version.model_id, kind=f"gate_{status}", data={
            "version_id": version.id, "version_number": version.number,
            "baseline_version_id": baseline.id if baseline else None,
            "reason": reason, "before": details.get("before"),
            "after": details.get("after"), "tolerance": self.tolerance,
        })

    def deliver_alert(self, claimed: alerts.ClaimedAlert) -> bool:
        """Send a held version's alert to the operator (this process claimed it) and record how
        it went, while the claim still holds: delivered (True), due again after a failure
        (``domain.alerts``), or given up."""
        return self._deliver(claimed, in_round=False)

    def _deliver(self, claimed: alerts.ClaimedAlert, *, in_round: bool) -> bool:
        """``deliver_alert``; ``in_round`` (a reconciler's round of due alerts): a record that
        got no answer from the database is raised, not only logged, to end the round."""
        if self._alerter is None:
            return False
        version_id, alert = claimed.version_id, claimed.alert
        previous = alert.get("delivery") or {}
        attempts = int(previous.get("attempts", 0)) + 1
        # What the receiver gets: the alert as ``_alert`` made it (its ``alert_id`` included),
        # without the record of earlier attempts; one an older release recorded, in today's shape.
        payload = self._in_todays_shape(
            {key: value for key, value in alert.items() if key != "delivery"})
        due_at = None
        try:
            self._alerter.send(payload)
            delivery: dict[str, Any] = {"delivered": True, "at": self._clock().isoformat(),
                                        "attempts": attempts}
        except Exception as exc:  # recorded, logged and tried again later: never fatal
            now = self._clock()
            wait = alerts.retry_after(attempts)
            due_at = now + wait if wait is not None else None
            # The error is stored on the version and served to its owner: only an adapter's
            # AlertDeliveryError says more than its type (host and HTTP status at most). Anything
            # else may quote the alert URL, which is the operator's secret.
            error = (str(exc) if isinstance(exc, AlertDeliveryError)
                     else f"the alert could not be sent ({type(exc).__name__})")[:300]
            logger.warning("the likeness alert for version %s could not be delivered (attempt "
                           "%d): %s; %s", version_id, attempts, error,
                           f"trying again at {due_at.isoformat()}" if due_at is not None
                           else "giving up")
            delivery = {"delivered": False, "at": now.isoformat(), "error": error,
                        "attempts": attempts,
                        "next_at": due_at.isoformat() if due_at is not None else None}
        try:
            recorded = self._repo.record_alert_delivery(
                version_id, {**payload, "delivery": delivery}, claim=claimed.claim,
                due_at=due_at)
        except StorageError as exc:
            # The send is over, the database failed its record (away, locked, full). Raised, it
            # reached the worker's run after the training had ended, which then said the
            # training would be continued (or logged a traceback) about one that was over. Left
            # as a dead sender leaves it: due again when this claim runs out, and sent again
            # with its alert_id (delivery is at least once).
            # "May": the database may have stored the record and lost only its answer (a
            # connection cut after the commit), and then the alert is not sent again.
            # A hung database (its answer timeout waited out) in a round: the round's next claim
            # would wait as long again, one wait an alert due (~20 s each on PostgreSQL) where a
            # worker's stop allows 30 s, and the pass's later parts after it. Raised, the hang is
            # said by the round's caller (its outage's WARNING): this line is INFO then, not a
            # second WARNING for the one hang.
            hung = in_round and isinstance(exc, DatabaseUnreachableError) and exc.unanswered
            logger.log(logging.INFO if hung else logging.WARNING,
                       "the outcome of the likeness alert for version %s (%s) could not be "
                       "recorded (%s): it may be sent again after %s (not if the record was "
                       "stored and only the database's answer lost)", version_id,
                       "delivered" if delivery["delivered"] else "failed", exc.message,
                       claimed.claim.isoformat())
            if hung:
                raise
            return bool(delivery["delivered"])
        if not recorded:
            outcome = "delivered" if delivery["delivered"] else "failed"
            gone = self._version_gone(version_id)
            if gone:
                # Its account was deleted while it was sent (the only way a version goes): no
                # row left to record on. Said as such: "taken over by another sender" sent an
                # operator looking for a second process that never was.
                why = "its version was deleted (with its account) while it was sent"
            elif gone is None:
                why = "another sender took it over or its version was deleted meanwhile"
            else:
                # This send outlasted its claim and another sender has taken the alert over:
                # its record (delivered, or a later attempt) stands, and this late one would
                # undo it.
                why = "it was taken over by another sender while this one sent it"
            logger.info("the likeness alert for version %s: %s; its outcome (%s) is not "
                        "recorded", version_id, why, outcome)
        # What the round goes on from is how this endpoint answered, recorded or not.
        return bool(delivery["delivered"])

    def alert_sends(self, *, stopping: threading.Event | None = None,
                    monotonic: Callable[[], float] = time.monotonic) -> AlertSends:
        """A reconcile pass's budget of alert sends (``AlertSends``): ``ALERTS_PER_PASS`` sends
        within ``ALERT_SENDS_SECONDS``, each taking up to this service's alert timeout."""
        return AlertSends(count=ALERTS_PER_PASS, seconds=ALERT_SENDS_SECONDS,
                          send_seconds=self.alert_timeout, stopping=stopping,
                          monotonic=monotonic)

    def deliver_due_alerts(self, *, sends: AlertSends | None = None) -> int:
        """Send the alerts that are due: those whose sender died before sending, and failed
        deliveries whose next attempt has come; how many were tried. Called by every
        reconciler: each alert is claimed first, so one process sends it. A failure ends the
        round (the endpoint is likely down: the rest wait for the next round rather than each
        costing the reconciler a timeout), and so does a database that gives a call no answer,
        raised (``DatabaseUnreachableError.unanswered``: each further call would wait as long).
        ``sends``: what the round may send (its reconcile pass's, shared with the pass's holds;
        by default ``ALERTS_PER_PASS`` sends in ``ALERT_SENDS_SECONDS``); a failed send ends
        it too."""
        if self._alerter is None:
            return 0
        if sends is None:
            sends = self.alert_sends()
        if not sends.allowed():
            return 0
        now = self._clock()
        tried = 0
        for version_id in self._repo.due_alerts(now, limit=sends.left):
            # Asked before each claim: an alert not claimed stays due, for the next round to send
            # once (a claim taken and not sent would keep it from every round until it ran out).
            if not sends.allowed():
                break
            # Each claim runs from when it is taken: the sends before it in this round took up
            # to a deadline each, and a claim timed from the round's start could be spent already.
            now = self._clock()
            until = now + alerts.CLAIM
            claimed = self._repo.claim_alert(version_id, now=now, until=until)
            if claimed is None or claimed.alert is None:
                continue  # another process took it
            tried += 1
            delivered = self._deliver(alerts.ClaimedAlert(version_id=version_id,
                                                          alert=claimed.alert, claim=until),
                                      in_round=True)
            sends.sent(delivered=delivered)
            if not delivered:
                break
        return tried

    def _version_gone(self, version_id: str) -> bool | None:
        """Whether the version no longer exists; None when the database cannot say now."""
        try:
            return self._repo.get_version(version_id) is None
        except StorageError:
            return None  # for a log line only: not worth more than saying both

    def score(self, version_id: str, *, force: bool = False,
              checkpoint: Callable[[], None] | None = None) -> VersionLikeness:
        """The version's likeness record, scored now unless it already is (with the current
        embedding model, the fixed probe scale and the current probe size). Expected failures
        (no generator, a generator error, face tools missing) are recorded on the record as
        ``failed``, never raised; a ``checkpoint`` that raises stops the scoring (and is
        raised), and so does an outage (``StorageUnavailableError``: the object storage or the
        database out of reach, a blip) or a lock (``DatabaseLockedError``: a lock held elsewhere
        past the database's wait, a statement past its timeout): the next scoring goes on from
        the probe images stored, never a version recorded as one that could not be scored (the
        gate held a version for good, and alerted, for a storage blip or a lock of seconds)."""
        version, model, training = self._load(version_id)
        existing = self._repo.get_likeness(version.id)
        if existing is not None and not force and self._is_current(existing):
            return existing
        base = existing or self._new_record(version, training)
        started = time.monotonic()
        try:
            probes = self._probes(model)
            reference = self.reference(training.dataset_id)
            results = []
            # Every probe renders with this version's LoRA at one scale: loaded once for them
            # all (a local generator loaded and unloaded it for each probe), unloaded however
            # the scoring ends.
            hold = LoraHold()
            try:
                for probe in probes:
                    if checkpoint is not None:
                        checkpoint()
                    results.append(self._probe(model, version, probe, checkpoint=checkpoint,
                                               lora_hold=hold))
            finally:
                hold.close()
            scores = score_probes(tuple(results), reference.embeddings)
            record = dataclasses.replace(
                base, status=LikenessStatus.SCORED, embedding_model=self._faces.model_name,
                reference_dataset_id=reference.dataset_id, scores=scores, probes=tuple(results),
                error=None, scored_at=utcnow(),
            )
        except (TrainingInterruptedError, StorageUnavailableError, DatabaseLockedError):
            raise
        except SelfieLoraError as exc:
            logger.warning("version %s could not be scored: %s", version.id, exc.message)
            record = dataclasses.replace(base, status=LikenessStatus.FAILED,
                                          error=_scoring_error(exc), scored_at=utcnow())
        except Exception as exc:
            logger.exception("scoring version %s crashed", version.id)
            record = dataclasses.replace(
                base, status=LikenessStatus.FAILED, scored_at=utcnow(),
                error=f"internal error while scoring ({type(exc).__name__})")
        self._telemetry.scoring_done(seconds=time.monotonic() - started, status=str(record.status))
        # One transaction: a record stored without its log entry (a crash between the two)
        # would never be logged, since the next scoring finds the record current and stops.
        # A failed re-score of a version scored before (another probe size or face model, a
        # forced one) is logged and returned, but the stored record keeps its last good scores:
        # overwriting it lost the version's likeness (the gate's baseline, the chart's point)
        # to a generator outage. The next scoring tries again, the stored record not current.
        with self._repo.atomic() as tx:
            # The record as it is now, not as this scoring found it: another process (the worker
            # and ``selfie-lora compare``) may have scored the version meanwhile. The model's row
            # is locked first, so two scorers of one version decide here one after the other.
            tx.get_model(model.id, for_update=True)
            stored = tx.get_likeness(version.id)
            if (stored is not None and _stamp(stored) != _stamp(existing)
                    and self._is_current(stored)):
                # Its scores stand (and were logged with them): a failure here (a second
                # pipeline out of memory) must not replace them, and a second success would
                # only log the same version twice.
                logger.info("version %s was scored by another process while this one scored "
                            "it (%s here): its record stands", version.id, record.status)
                return stored
            keep = (record.status is LikenessStatus.FAILED and stored is not None
                    and stored.status is LikenessStatus.SCORED)
            if not keep:
                tx.save_likeness(record)
            self._log_outcome(tx, version, record)
        if record.scores is not None:
            logger.info("version %d of model %s scored: %s", version.number, model.id,
                        record.scores.headline())
        return record

    def _stale_reason(self, record: LikenessFacts | None) -> str | None:
        """Why a scored record is not compared with others: it was made another way than
        ``score`` makes one now (``_is_current``). None for a current record or an unscored one."""
        if record is None or not _scored(record) or self._is_current(record):
            return None
        how = ("with another face model" if record.embedding_model != self._faces.model_name
               else "at another probe size")
        return f"scored {how}: run selfie-lora compare to score it again"

    def _being_scored(self, version: Version) -> bool:
        """The gate has not judged ``version`` and its training is in phase "scoring": its
        worker scores it (or will, once a worker takes the training over)."""
        if version.gate_status is not GateStatus.PENDING:
            return False
        training = self._repo.get_training(version.training_id)
        return training is not None and training.is_scoring

    def _is_current(self, record: LikenessFacts) -> bool:
        """Scored as ``score`` would score it now: with the current embedding model (scores of
        two models are never compared) and every probe image made at the fixed scale and at
        the current SELFIE_LORA_PROBE_SIZE. The gate and ``compare`` put two versions' records
        side by side: after the size changed, a record made at the old one would set images of
        one size against images of another (another picture, another face size for the same
        seed), which measures the setting, not the training; such a record is scored again."""
        return (record.status is LikenessStatus.SCORED
                and record.embedding_model == self._faces.model_name
                and all(p.lora_scale == PROBE_LORA_SCALE
                        # The key names the size the image was asked at (layout.probe_image_key).
                        and p.image_key == probe_image_key(record.version_id, p.index,
                                                           PROBE_LORA_SCALE, self._probe_size)
                        for p in record.probe_marks))

    def _unscored(self, version: Version, training: Training, *, why: str) -> VersionLikeness:
        """The version's record as it stands, or, when it has no scores, one recorded as failed
        for ``why``: saved with its ``quality_failed`` event in one transaction, as ``score``
        saves every other outcome (saved alone, it was the one outcome missing from the log)."""
        with self._repo.atomic() as tx:
            # Under the model's lock, as ``score`` decides: another process may have scored it.
            tx.get_model(version.model_id, for_update=True)
            existing = tx.get_likeness(version.id)
            if existing is not None and existing.status is LikenessStatus.SCORED:
                return existing
            if (existing is not None and existing.status is LikenessStatus.FAILED
                    and existing.error == why):
                # Judged so already, by a worker that died before the training's end: its
                # event is in the log once.
                return existing
            record = dataclasses.replace(existing or self._new_record(version, training),
                                          status=LikenessStatus.FAILED, error=why,
                                          scored_at=utcnow())
            tx.save_likeness(record)
            self._log_outcome(tx, version, record)
        return record

    @staticmethod
    def _log_outcome(tx: Repository, version: Version, record: VersionLikeness) -> None:
        """The model's log entry of a scoring's outcome (``quality_scored``/``quality_failed``)."""
        tx.add_event(model_id=version.model_id, kind=f"quality_{record.status}", data={
            "version_id": version.id, "version_number": version.number,
            "training_id": version.training_id, "embedding_model": record.embedding_model,
            "reference_dataset_id": record.reference_dataset_id,
            "scores": record.scores.headline() if record.scores else None,
            "error": record.error,
        })

    def reference(self, dataset_id: str) -> Reference:
        """The training photos' faces, analysed once per dataset and embedding model."""
        key = reference_key(dataset_id, self._faces.model_name)
        if self._blobs.exists(key):
            stored = json.loads(self._blobs.get(key))
        else:
            dataset = self._repo.get_dataset(dataset_id)
            if dataset is None:
                raise NotFoundError("the training's photos are gone")
            photos = []
            for sha in dataset.photo_hashes:
                faces = self._faces.detect(analysis_array(self._blobs.get(photo_key(sha))))
                first = faces[0] if faces else None
                photos.append({
                    "sha256": sha, "faces": len(faces),
                    "embedding": list(first.embedding) if first and first.embedding else None,
                })
            stored = {"dataset_id": dataset_id, "embedding_model": self._faces.model_name,
                      "photos": photos}
            self._blobs.put(key, json.dumps(stored).encode())
        return Reference(dataset_id=dataset_id, embedding_model=str(stored["embedding_model"]),
                         photos=len(stored["photos"]), embeddings=stored_embeddings(stored))

    # ------------------------------------------------------------------ read side
    def report(self, *, user: User, version_id: str) -> LikenessReport:
        model, version = self._owned(user, version_id)
        return LikenessReport(model=model, version=version,
                             record=self._repo.get_likeness(version.id),
                             baseline=self._baseline_of(model, version))

    def summaries(self, model: Model) -> dict[str, LikenessSummary]:
        """Every version's likeness record, by version id, without its probes' results."""
        return {q.version_id: q for q in self._repo.list_likeness_summaries(model.id)}

    def probe_image(self, *, user: User, version_id: str, index: int) -> bytes:
        _model, version = self._owned(user, version_id)
        record = self._repo.get_likeness(version.id)
        for probe in record.probes if record else ():
            if probe.index == index and probe.image_key and self._blobs.exists(probe.image_key):
                return self._blobs.get(probe.image_key)
        raise NotFoundError("no such probe image")

    def compare(self, *, user: User, a: str | None = None, b: str | None = None,
                history: ModelHistory | None = None) -> Comparison:
        """Version ``a`` against version ``b``, probe by probe. ``b`` defaults to the newest
        version, ``a`` to the version ``b`` was (or would be) compared with by the gate.
        ``history``: the user's model and versions, already read (``ModelService.history``)."""
        model = history.model if history is not None else self._model(user)
        versions = history.versions if history is not None else self._repo.list_versions(model.id)
        if not versions:
            raise NotFoundError("your model has no version yet")
        vb = self._resolve(versions, b) if b else versions[0]
        # A: what the gate compared B with; for a first version, the newest other one.
        va = (self._resolve(versions, a) if a else self._baseline_of(model, vb, versions=versions)
              or next((v for v in versions if v.id != vb.id), None))
        if va is None:
            raise InvalidInputError("there is no other version to compare with yet",
                                    code=ErrorCode.NOTHING_TO_COMPARE)
        if va.id == vb.id:
            raise InvalidInputError("compare two different versions", code=ErrorCode.SAME_VERSION)
        # The two whole records, probes and all (``history`` has summaries only).
        qa, qb = self._repo.get_likeness(va.id), self._repo.get_likeness(vb.id)
        newer = vb if vb.number > va.number else va
        reference = self._reference_for(newer)
        # A record made another way than ``score`` makes one now (after SELFIE_LORA_PROBE_SIZE
        # changed, say) is not put beside the other: the difference would measure the setting,
        # not the training. It shows as not comparable, with the reason, until it is scored again.
        stale = {v.id: self._stale_reason(q) for v, q in ((va, qa), (vb, qb))}
        scores = {v.id: None if stale[v.id] else self._scores_against(q, reference)
                  for v, q in ((va, qa), (vb, qb))}
        by_index = {v.id: {p.index: p for p in (q.probes if q else ())} for v, q in
                    ((va, qa), (vb, qb))}
        rows = []
        for probe in model.probes:
            sa, sb = scores[va.id], scores[vb.id]
            rows.append(ProbeComparison(
                probe=probe, a=by_index[va.id].get(probe.index), b=by_index[vb.id].get(probe.index),
                a_score=_probe_score(sa, probe.index), b_score=_probe_score(sb, probe.index),
            ))
        return Comparison(model=model, a=va, b=vb, record_a=qa, record_b=qb,
                          scores_a=scores[va.id], scores_b=scores[vb.id],
                          reference_dataset_id=reference.dataset_id if reference else None,
                          probes=tuple(rows), reference_version=newer if reference else None,
                          stale_a=stale[va.id], stale_b=stale[vb.id])

    def compare_scored(self, *, user: User, a: str | None = None, b: str | None = None,
                       on_scoring: Callable[[Version], None] | None = None,
                       on_being_scored: Callable[[Version], None] | None = None) -> Comparison:
        """``compare``, after scoring whichever of the two versions has no current scores (a
        version from before likeness tracking, one whose scoring failed, or one scored with
        another face model or at another probe size). A new version whose training is still in
        phase "scoring" is left to the worker (``on_being_scored``): it shows as not scored."""
        comparison = self.compare(user=user, a=a, b=b)
        for version, record in ((comparison.a, comparison.record_a),
                                (comparison.b, comparison.record_b)):
            if record is None or not self._is_current(record):
                if self._being_scored(version):
                    # Scoring it here too rendered its probes twice (a second pipeline on the
                    # worker's GPU, on a local machine) and logged it twice, and a failure here
                    # could land after the worker's scores and replace them.
                    if on_being_scored is not None:
                        on_being_scored(version)
                    continue
                if on_scoring is not None:
                    on_scoring(version)
                self.score(version.id, force=record is not None)
        return self.compare(user=user, a=comparison.a.id, b=comparison.b.id)

    def grid_png(self, comparison: Comparison) -> bytes:
        """The side-by-side grid of a comparison (``grid``), drawn or read."""
        png = self.grid(comparison).png
        assert png is not None  # drawn unless told not to
        return png

    def grid(self, comparison: Comparison, *, draw: bool = True,
             unless: Collection[str] = ()) -> Chart:
        """The side-by-side grid of a comparison (stored under ``quality/compare/``), drawn
        only when what it shows changed: every view of the Versions page drew it again (its
        probe images read, decoded and scaled) and wrote it back, an upload per view on S3.
        Its ``inputs`` among ``unless`` (the grids the caller holds already, ``*`` for any):
        neither read, drawn nor stored (png None). ``draw`` False (a HEAD, which sends
        headers only): neither drawn nor stored either; whether it would be ``whole`` is
        told by the probe images being there (or, one missing, a whole grid stored)."""
        text = grid_text(comparison)
        if not comparison.probes:
            raise InvalidInputError("the model has no probes yet: wait for its first scoring",
                                    code=ErrorCode.NOT_SCORED)
        corner = f"probe\n{text.measured_on}"
        # A probe image's key names its version, probe, scale and size, and the image under a
        # key is written once: the keys stand for the images.
        inputs = grid_inputs([text.a, text.b, corner,
                              [dataclasses.astuple(probe) for probe in text.probes],
                              [[row.a.image_key if row.a else None,
                                row.b.image_key if row.b else None]
                               for row in comparison.probes]])
        if inputs in unless or "*" in unless:  # "*": any grid the caller holds
            return Chart(inputs=inputs, png=None)
        key = grid_key(comparison.a.id, comparison.b.id)
        if not draw and all(self._blobs.exists(probe.image_key)
                            for row in comparison.probes for probe in (row.a, row.b)
                            if probe is not None and probe.image_key is not None):
            return Chart(inputs=inputs, png=None)  # what a GET sends: stored or drawn whole
        try:
            stored: bytes | None = self._blobs.get(key)
        except BlobMissingError:
            stored = None
        if stored is not None and grid_drawn_from(stored) == inputs:
            return Chart(inputs=inputs, png=stored if draw else None)
        if not draw:
            return Chart(inputs=inputs, png=None, whole=False)
        missing: list[str] = []
        rows = [GridRow(label=[probe.label, probe.prompt, f"A: {probe.a}", f"B: {probe.b}"],
                        left=self._image_or_none(row.a, missing=missing),
                        right=self._image_or_none(row.b, missing=missing))
                for probe, row in zip(text.probes, comparison.probes, strict=True)]
        if missing:
            # The image may be written again under the same key (``_probe`` makes a missing
            # one again): a grid stored, or cached by a browser under this digest, would keep
            # the blank cell for good. Drawn at each view until it is whole.
            logger.info("grid of versions %s and %s drawn with %d probe image(s) missing from "
                        "the storage (%s): not stored", comparison.a.number, comparison.b.number,
                        len(missing), ", ".join(missing[:3]))
            png = render_grid(left_title=text.a, right_title=text.b, rows=rows, corner=corner)
            return Chart(inputs=inputs, png=png, whole=False)
        png = render_grid(left_title=text.a, right_title=text.b, rows=rows, corner=corner,
                          inputs=inputs)
        self._blobs.put(key, png)
        return Chart(inputs=inputs, png=png)

    def chart_points(self, model: Model, *,
                     history: ModelHistory | None = None) -> list[ChartPoint]:
        """Every version's scores against one yardstick (``_chart``). ``history``: the model's
        versions and records, already read (the Versions page reads them once)."""
        return self._chart(model, history=history)[0]

    def chart_values(self, model: Model, *,
                     history: ModelHistory | None = None) -> ChartValues:
        """``chart_points`` and whose training photos they are measured on, which the chart's
        title says: the Versions page's text for the chart says it too."""
        points, yardstick = self._chart(model, history=history)
        return ChartValues(points=points,
                           photos_of=yardstick.number if yardstick is not None else None)

    def _chart(self, model: Model, *,
               history: ModelHistory | None = None) -> tuple[list[ChartPoint], Version | None]:
        """Every version's scores against one yardstick, and whose training photos it is: the
        active version's when it is scored (the likeness the user has: a version held because
        it no longer shows that person is plotted as the drop the gate saw, not as a gain on
        its own photos), else the newest scored version's."""
        versions = sorted(history.versions if history is not None
                          else self._repo.list_versions(model.id), key=lambda v: v.number)
        summaries = history.records if history is not None else self.summaries(model)
        scored = [v for v in versions if _scored(summaries.get(v.id))]
        yardstick = next((v for v in scored if v.id == model.active_version_id),
                         scored[-1] if scored else None)
        reference = self._reference_for(yardstick) if yardstick else None
        # Only the versions scored against other photos than the yardstick's are scored again,
        # from their probes: those records alone are read whole.
        again = {v.id for v in scored if reference is not None
                 and summaries[v.id].embedding_model == reference.embedding_model
                 and not self._stale_reason(summaries[v.id])
                 and _needs_probes(summaries[v.id], reference)}
        whole = {q.version_id: q for q in self._repo.list_likeness(model.id, version_ids=again)
                 } if again else {}
        points = []
        for v in versions:
            record: LikenessFacts | None = whole.get(v.id) or summaries.get(v.id)
            # A gap for a record made at another probe size (``compare``): not its likeness.
            s = None if self._stale_reason(record) else self._scores_against(record, reference)
            points.append(ChartPoint(
                number=v.number, identity=s.identity if s else None,
                identity_nearest=s.identity_nearest if s else None,
                face_share=s.face_share if s else None, sane_share=s.sane_share if s else None,
                gate_status=str(v.gate_status), active=v.id == model.active_version_id,
            ))
        return points, yardstick if reference is not None else None

    def chart_png(self, *, user: User) -> bytes:
        """The chart of scores across all versions (``chart``), drawn."""
        png = self.chart(user=user).png
        assert png is not None  # drawn unless told not to
        return png

    def chart(self, *, user: User, draw: bool = True, unless: Collection[str] = ()) -> Chart:
        """The chart of scores across all versions (stored under ``quality/models/``), drawn
        only when what it shows changed: drawing took 150-300 ms at 300 versions, and writing
        it back on every view of the Versions page was an upload per view on S3. ``draw``
        False, or its ``inputs`` among ``unless`` (the charts the caller holds already): what
        it shows alone (the database's rows), the storage neither read nor written (a HEAD
        sends headers only; a browser holding this chart is told it is unchanged)."""
        model = self._model(user)
        points, yardstick = self._chart(model)
        if not points:
            raise NotFoundError("your model has no version yet")
        title = f"likeness of {model.trigger_word} across versions"
        if yardstick is not None:
            title += f", on version {yardstick.number}'s training photos"
        inputs = chart_inputs(points, title=title, tolerance=self.tolerance,
                              gate=self.gate_enabled)
        if not draw or inputs in unless:
            return Chart(inputs=inputs, png=None)
        key = chart_key(model.id)
        try:
            stored = self._blobs.get(key)
        except BlobMissingError:
            stored = None
        if stored is not None and drawn_from(stored) == inputs:
            return Chart(inputs=inputs, png=stored)
        png = render_chart(points, title=title, tolerance=self.tolerance,
                           gate=self.gate_enabled)
        self._blobs.put(key, png)
        return Chart(inputs=inputs, png=png)

    def training_log(self, *, user: User, history: ModelHistory | None = None
                     ) -> list[dict[str, Any]]:
        """One entry per training, newest first: first training or retraining, what it kept, the
        version it made, the gate's decision and the scores before and after. ``history``: the
        user's model, versions, records and trainings, already read."""
        if history is None:
            history = read_history(self._repo, self._model(user))
        versions = {v.id: v for v in history.versions}
        records = history.records
        entries = []
        for t in history.trainings:
            version = versions.get(t.version_id) if t.version_id else None
            record = records.get(version.id) if version else None
            details = version.gate_details if version else {}
            after = details.get("after")
            if after is None and record is not None and record.scores is not None:
                after = record.scores.headline()
            entries.append({
                "training_id": t.id, "status": str(t.status),
                "kind": "retraining" if t.is_retraining else "first_training",
                "preserved": t.preserved, "trigger_word": t.trigger_word,
                "destination": t.destination, "trainer_version": t.trainer_version,
                "lora_scale": t.preserved.get("lora_scale"),
                "version_id": version.id if version else None,
                "version_number": version.number if version else None,
                "gate": ({"status": str(version.gate_status), "reason": version.gate_reason,
                          "baseline_version_id": details.get("baseline_version_id"),
                          "overridden": "override" in details} if version else None),
                "scores": {"before": details.get("before"), "after": after},
                "training": record.training if record else None,
                "error": t.error, "created_at": t.created_at.isoformat(),
                "completed_at": t.completed_at.isoformat() if t.completed_at else None,
            })
        return entries

    def log_page(self, *, user: User, limit: int = LOG_PAGE, before: str | None = None
                 ) -> LogPage:
        """``GET /api/model/log``, a page at a time: the ``limit`` (1 to ``PAGE_MAX``) newest
        trainings older than training ``before`` (the ``older`` of the page before), newest
        first, with the audit events of the same stretch of time, oldest first (the first
        page's reach to now, the last page's back to the upload). Whole, the log was about
        4 KB per training, and grew with every one. A page reads its own trainings, their
        versions and likeness summaries: every page read the model's every training, version
        and likeness record, so each got slower as the history grew."""
        model = self._model(user)
        limit = page_limit(limit)
        after = None
        # An empty ``before`` is the first page, as ``GenerationService.page`` takes it: a script
        # passing the last page's ``older`` on starts with none.
        if before:
            # No lookup for one holding a control character: PostgreSQL refuses a NUL in it.
            after = None if names_no_row(before) else self._repo.get_training(before)
            if after is None or after.model_id != model.id:
                raise NotFoundError("no such training")
        # By time, then id: the order holds between requests for trainings of one instant.
        # One more than shown: whether there are older ones, without reading them all.
        found = self._repo.list_trainings_page(model.id, limit=limit + 1, before=after)
        shown, more = found[:limit], len(found) > limit
        until = after.created_at if after is not None else None
        # An event at a boundary's very instant is on the newer page only: since is inclusive,
        # until exclusive, and the next page's until is this page's since.
        events = self._repo.list_events(model.id, since=shown[-1].created_at if more else None,
                                        until=until)
        version_ids = {t.version_id for t in shown if t.version_id}
        history = ModelHistory(
            model=model, versions=self._repo.versions_by_ids(model.id, version_ids),
            records={r.version_id: r for r in self._repo.list_likeness_summaries(
                model.id, version_ids=version_ids)}, trainings=shown)
        return LogPage(events=events, trainings=self.training_log(user=user, history=history),
                       older=shown[-1].id if more else None)

    # ------------------------------------------------------------------ the gate
    def _alert(self, model: Model, version: Version, *, baseline: Version | None,
               details: Mapping[str, Any], message: str, at: datetime,
               user_name: str | None) -> dict[str, Any]:
        """A held version's alert: ``baseline`` and ``details`` are the gate's verdict's (none
        for a version it could not judge: an alert of kind ``not_scored``)."""
        # Held on the active version's photos: the numbers that decided, on those photos.
        there = decided_on_baseline_photos(details)
        decided = there if there is not None else details
        before, after = decided.get("before"), decided.get("after")
        photos_of = baseline.number if there is not None and baseline else version.number
        if version.version_mismatch:
            # Held for where Replicate published it, not for its likeness, and the gate on or
            # off (``_judge``): "not scored against version 1's not scored, tolerance 0.02" said
            # neither, and of a version 1 that may well be scored.
            kind = "version_mismatch"
            text = mismatch_alert_text(user_name=user_name or model.user_id,
                                       version_number=version.number, message=message,
                                       url=self._versions_url)
        else:
            # Scores on both sides: a drop; otherwise the version or its baseline was not
            # scored.
            kind = "likeness_drop" if after and before else "not_scored"
            text = alert_text(
                user_name=user_name or model.user_id, version_number=version.number,
                baseline_number=baseline.number if baseline else None, before=before,
                after=after, tolerance=self.tolerance, message=message,
                url=self._versions_url, photos_of=photos_of)
        return {
            # The same in every delivery of this alert: a receiver drops what it has seen.
            "alert_id": f"{kind}:{version.id}",
            "kind": kind, "message": message, "at": at.isoformat(), "user_id": model.user_id,
            "user_name": user_name,
            "model_id": model.id, "destination": model.destination,
            "version_id": version.id, "version_number": version.number,
            "baseline_version_id": baseline.id if baseline else None,
            "baseline_version_number": baseline.number if baseline else None,
            "before": before, "after": after,
            # Whose training photos ``before`` and ``after`` were measured on: the new
            # version's ("new_photos") or the active version's ("baseline_photos").
            "measured_on": details.get("measured_on"),
            "tolerance": self.tolerance, "url": self._versions_url,
            # What a chat hook shows: Slack's incoming webhooks need "text", Discord's
            # "content" (at most 2000 characters); both refused this body without them.
            "text": text, "content": text[:DISCORD_CONTENT_MAX],
            # Discord pings whoever "content" names, and a user name may hold "@everyone" or
            # "@here" (names allow "@", and sign-up may be open): an alert mentions nobody.
            "allowed_mentions": no_mentions(),
            "delivery": None,
        }

    def _in_todays_shape(self, alert: dict[str, Any]) -> dict[str, Any]:
        """``alert`` with the fields ``_alert`` makes today that it lacks, what it has unchanged.
        One recorded by an older release and still due at the upgrade (its hook was down, a
        retry pending) has no "text"/"content": a Slack or Discord hook refuses it until it is
        given up."""
        missing = ({"user_name", "url", "measured_on", "text", "content", "allowed_mentions"}
                   - alert.keys())
        if not missing:
            return alert
        filled = dict(alert)
        if "user_name" in missing:
            owner = self._repo.get_user(str(alert["user_id"]))
            filled["user_name"] = owner.name if owner is not None else None
        filled.setdefault("url", self._versions_url)
        # Releases before measured_on measured both versions on the new version's photos only.
        filled.setdefault("measured_on", NEW_PHOTOS if alert["before"] and alert["after"] else None)
        baseline_number = alert["baseline_version_number"]
        text = filled.get("text") or alert_text(
            user_name=filled["user_name"] or str(alert["user_id"]),
            version_number=int(alert["version_number"]), baseline_number=baseline_number,
            before=alert["before"], after=alert["after"], tolerance=float(alert["tolerance"]),
            message=str(alert["message"]), url=filled["url"],
            photos_of=(baseline_number if filled["measured_on"] == BASELINE_PHOTOS
                       else int(alert["version_number"])))
        filled.setdefault("text", text)
        filled.setdefault("content", str(text)[:DISCORD_CONTENT_MAX])
        filled.setdefault("allowed_mentions", no_mentions())
        return filled

    # ------------------------------------------------------------------ internals
    def _probe(self, model: Model, version: Version, probe: Probe, *,
               checkpoint: Callable[[], None] | None = None,
               lora_hold: LoraHold | None = None) -> ProbeResult:
        # Same weights, prompt, seed, scale and size: the same image. The size is in the key, so
        # an image of another size is never taken for this one, and a record scored at another
        # size is not current (``_is_current``): the gate scores the active version again.
        key = probe_image_key(version.id, probe.index, PROBE_LORA_SCALE, self._probe_size)
        if self._blobs.exists(key):
            png = self._blobs.get(key)
        else:
            # The checkpoint goes with the job: the generator calls it while it loads its
            # pipeline and between diffusion steps, so a cancel does not wait for the probe (a
            # cold pipeline's load, or a FLUX.1 image, takes tens of seconds to minutes).
            png = self._generation.render(model=model, version=version, prompt=probe.prompt,
                                          seed=probe.seed, size=self._probe_size,
                                          lora_scale=PROBE_LORA_SCALE,
                                          stop=checkpoint, lora_hold=lora_hold).images[0]
            self._blobs.put(key, png)
            if checkpoint is not None:
                checkpoint()  # stored first: the next attempt goes on from this image
        sanity = image_sanity(png)
        faces = [] if sanity.nan else self._faces.detect(analysis_array(png))
        face = faces[0] if faces else None
        return ProbeResult(
            index=probe.index, prompt=probe.prompt, seed=probe.seed, image_key=key,
            faces=len(faces), face_box=face.box if face else None,
            embedding=face.embedding if face else None, sanity=sanity,
            lora_scale=PROBE_LORA_SCALE,
        )

    def _probes(self, model: Model) -> tuple[Probe, ...]:
        if model.probes:
            return model.probes
        # A model from before likeness tracking: its probe set is fixed now, once.
        self._repo.set_model_probes(model.id, probes_for_existing_model(
            model_id=model.id, trigger_word=model.trigger_word, count=self._probe_count))
        refreshed = self._repo.get_model(model.id)
        assert refreshed is not None
        assert refreshed.probes
        return refreshed.probes

    def _reference_for(self, version: Version, *, outage_raises: bool = False,
                       lock_raises: bool = False) -> Reference | None:
        """``outage_raises``: an outage (``StorageUnavailableError``) is raised, and with
        ``lock_raises`` a lock (``DatabaseLockedError``), not taken for photos that have no
        reference (the gate would hold a version scored a moment before as unscored)."""
        training = self._repo.get_training(version.training_id)
        if training is None:
            return None
        try:
            return self.reference(training.dataset_id)
        except SelfieLoraError as exc:
            if outage_raises and isinstance(exc, StorageUnavailableError):
                raise
            if lock_raises and isinstance(exc, DatabaseLockedError):
                raise
            logger.warning("no reference photos for version %s: %s", version.id, exc.message)
            return None

    def _baseline_photos(self, version: Version) -> Reference:
        """The face embeddings of ``version``'s training photos, for the gate. Unlike
        ``_reference_for`` it tells photos gone for good (``_PhotosGoneError``: the training, its
        dataset or a photo deleted, or not analysable) from an outage (``StorageError``,
        raised)."""
        training = self._repo.get_training(version.training_id)
        if training is None:
            raise _PhotosGoneError(f"the training of version {version.number} is gone")
        try:
            return self.reference(training.dataset_id)
        except (BlobMissingError, NotFoundError) as exc:
            raise _PhotosGoneError(f"the training photos of version {version.number} are gone",
                                   detail=exc.message) from exc
        except StorageError:
            raise
        except SelfieLoraError as exc:
            # Photos that cannot be analysed (a damaged file): no attempt will do better.
            # A client's error's message is written for the user; a server's is the operator's.
            said = f" ({exc.message})" if exc.http_status < 500 else ""
            raise _PhotosGoneError(f"the training photos of version {version.number} could "
                                   f"not be analysed{said}", detail=exc.message) from exc

    def _scores_against(self, record: LikenessFacts | None,
                        reference: Reference | None) -> IdentityScores | None:
        if not _scored(record) or reference is None:
            return None
        assert record is not None
        if record.embedding_model != reference.embedding_model:
            # Its probes were embedded by another face model (the operator switched it): their
            # distances to this reference mean nothing until the version is scored again.
            return None
        if not _needs_probes(record, reference):
            return record.scores
        if not isinstance(record, VersionLikeness):
            # A summary has no probes to score again: the chart reads those records whole, in
            # a second read, and one rescored or deleted in between (a rescore or a version
            # deletion at the same time) comes back changed or not at all. A gap in the chart,
            # not a 500: its next drawing reads it again.
            logger.debug("version %s: its likeness record changed while it was read; "
                         "no score", record.version_id)
            return None
        return score_probes(record.probes, reference.embeddings)

    def _baseline_of(self, model: Model, version: Version, *,
                     versions: Sequence[Version] | None = None) -> Version | None:
        """What ``version`` was compared with by the gate; for a version not judged yet, or held
        unjudged (its training canceled while it was scored), the one the gate compares it with:
        the version it was stored to replace (``_replaced_version_id``); for a first version,
        none. Else the previous version by number, which may be a held one the gate never
        compares with: only for versions that have nothing better recorded."""
        baseline_id = version.gate_details.get("baseline_version_id")
        if baseline_id:
            return self._repo.get_version(str(baseline_id))
        pending = version.gate_status is GateStatus.PENDING
        replaced = _replaced_version_id(version,
                                        active=model.active_version_id if pending else None)
        if replaced and replaced != version.id:
            found = self._repo.get_version(replaced)
            if found is not None:
                return found
        if versions is None:
            versions = self._repo.list_versions(model.id)
        older = [v for v in versions if v.number < version.number]
        return older[0] if older else None

    def _new_record(self, version: Version, training: Training) -> VersionLikeness:
        # The training's figures come from its row: the trainer's metrics, and the time from
        # its start to its version.
        seconds = None
        if training.started_at:
            seconds = round((version.created_at - training.started_at).total_seconds(), 3)
        return VersionLikeness(
            version_id=version.id, model_id=version.model_id, status=LikenessStatus.PENDING,
            created_at=utcnow(), training=training_figures(
                dict(training.metrics), loss=training.loss,
                steps=max(training.step, training.total_steps), seconds=seconds,
                recipe=training.recipe.values()),
        )

    def _load(self, version_id: str) -> tuple[Version, Model, Training]:
        version = self._repo.get_version(version_id)
        if version is None:
            raise NotFoundError(f"version {version_id} does not exist")
        training = self._repo.get_training(version.training_id)
        if training is None:
            raise NotFoundError(f"the training of version {version_id} does not exist")
        return version, self._require_model(version), training

    def _require_model(self, version: Version) -> Model:
        model = self._repo.get_model(version.model_id)
        if model is None:
            raise NotFoundError(f"the model of version {version.id} does not exist")
        return model

    def _model(self, user: User) -> Model:
        model = self._repo.get_model_for_user(user.id)
        if model is None:
            raise NoModelError(user=user.name)
        return model

    def _owned(self, user: User, version_id: str) -> tuple[Model, Version]:
        model = self._model(user)
        return model, self._resolve(self._repo.list_versions(model.id), version_id)

    @staticmethod
    def _resolve(versions: Sequence[Version], ref: str) -> Version:
        version = find_version(versions, ref)
        if version is None:
            raise no_such_version(ref)
        return version

    def _image_or_none(self, probe: ProbeResult | None, *, missing: list[str]) -> bytes | None:
        """The probe's image; None for a probe with none, or one whose image is not in the
        storage, whose key is then added to ``missing``."""
        if probe is None or probe.image_key is None:
            return None
        try:
            return self._blobs.get(probe.image_key)
        except BlobMissingError:
            missing.append(probe.image_key)
            return None


def _lock_model_and_version(tx: Repository, model_id: str,
                            version_id: str) -> tuple[Model, Version] | None:
    """Inside ``tx``: the model's row locked, then the version read. Every write of a version's
    gate and of the model's active version takes the model's row first (the gate here, the
    user's activation in ``ModelService.activate``), so on PostgreSQL (READ COMMITTED) what is
    read after the lock cannot be changed by the other before this transaction ends; on SQLite
    ``BEGIN IMMEDIATE`` already serialises them."""
    model = tx.get_model(model_id, for_update=True)
    version = tx.get_version(version_id)
    if model is None or version is None:
        return None
    return model, version


def _stamp(record: VersionLikeness | None) -> tuple[object, ...] | None:
    """What tells one stored write of a record from another (a whole-record comparison would
    call a record with a NaN score changed when it was not)."""
    if record is None:
        return None
    return (record.status, record.scored_at, record.embedding_model, record.error)


def _same_photos(a: Reference, b: Reference) -> bool:
    """Whether two references measure against the same faces: one dataset, or the same photos
    uploaded again (a new dataset, the same embeddings): then one comparison is enough."""
    return a.dataset_id == b.dataset_id or (a.embedding_model == b.embedding_model
                                            and a.embeddings == b.embeddings)


def _scored(record: LikenessFacts | None) -> bool:
    return (record is not None and record.status is LikenessStatus.SCORED
            and bool(record.probe_marks))


def _needs_probes(record: LikenessFacts, reference: Reference) -> bool:
    """Whether ``record`` is scored against ``reference`` from its probes: its stored scores
    are against other photos (or it has none)."""
    return record.reference_dataset_id != reference.dataset_id or record.scores is None


def _probe_score(scores: IdentityScores | None, index: int) -> dict[str, Any] | None:
    if scores is None:
        return None
    for p in scores.per_probe:
        if p.index == index:
            return p.as_dict()
    return None


@dataclass(frozen=True)
class ProbeText:
    label: str  # "probe 0, seed 7"
    prompt: str
    a: str  # "identity 0.812", "no face", "not scored"
    b: str


@dataclass(frozen=True)
class GridText:
    """The words of a comparison's grid: the same in the picture and beside it, for those who
    cannot see the picture (the versions page)."""

    a: str  # "A: version 1 (passed) identity 0.800"
    b: str
    probes: tuple[ProbeText, ...]
    # Whose training photos both columns' identity is measured on ("identity on v2's training
    # photos"): the newer version's, so a version's identity here is not its Likeness in the
    # Versions table (on its own photos) when the two were trained on other photos.
    measured_on: str = ""


def grid_text(comparison: Comparison) -> GridText:
    unscored_a = unscored_words(comparison.a, comparison.record_a)
    unscored_b = unscored_words(comparison.b, comparison.record_b)
    used = comparison.reference_version
    return GridText(
        measured_on=(f"identity on v{used.number}'s training photos" if used is not None
                     else "no training photos to measure identity on"),
        a=_column_title("A", comparison.a, comparison.scores_a, comparison.stale_a,
                        unscored=unscored_a),
        b=_column_title("B", comparison.b, comparison.scores_b, comparison.stale_b,
                        unscored=unscored_b),
        # The API's numbering (probes[].index, .../quality/probes/{n}), from 0.
        probes=tuple(ProbeText(label=f"probe {row.probe.index}, seed {row.probe.seed}",
                               prompt=row.probe.prompt,
                               a=_probe_label(row.a, row.a_score, unscored=unscored_a),
                               b=_probe_label(row.b, row.b_score, unscored=unscored_b))
                     for row in comparison.probes))


def _probe_label(result: ProbeResult | None, score: dict[str, Any] | None, *,
                 unscored: str = "not scored") -> str:
    if result is None:
        return unscored
    if not result.face_found:
        return "no face" + ("" if result.sanity is None or result.sanity.ok else ", bad image")
    sim = score.get("similarity") if score else None
    return "face" if sim is None else f"identity {sim:.3f}"


def _column_title(side: str, version: Version, scores: IdentityScores | None,
                  stale: str | None = None, *, unscored: str = "not scored") -> str:
    title = f"{side}: version {version.number} ({version.gate_status})"
    if stale is not None:
        # On a second line (the header holds two), without its hint: a cell is ~40 characters.
        return f"{title}\n{stale.split(':')[0]}"
    if scores is None and unscored != "not scored":
        # Why its column has no scores, on a second line too: its scoring failed (the gate's
        # reason on the Versions page says why), or its worker is still scoring it.
        return f"{title}\n{unscored}"
    if scores is not None and scores.identity is not None:
        title += f" identity {scores.identity:.3f}"
    return title
