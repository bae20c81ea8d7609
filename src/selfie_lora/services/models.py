"""The user's model: reading it, its LoRA scale, its versions, rollback and explicit re-pinning."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from datetime import timedelta

from selfie_lora.domain.entities import GateStatus, Model, User, Version
from selfie_lora.domain.likeness import LikenessFacts, VersionLikeness
from selfie_lora.domain.plan import (
    DEFAULT_LORA_SCALE,
    TrainingDefaults,
    check_repin_lengths,
    check_version_fits_base_model,
    pin_for_training,
    repin_is_recorded,
    validate_lora_scale,
    with_trainer_version,
)
from selfie_lora.domain.recipes import RepinPolicy
from selfie_lora.domain.versions import VERSION_ACTIVATED, find_version, no_such_version
from selfie_lora.domain.weights import WeightsFormat
from selfie_lora.errors import (
    BlobMissingError,
    ConflictError,
    ErrorCode,
    InvalidInputError,
    NoModelError,
    NotFoundError,
)
from selfie_lora.services.common import (
    REPINNED_EVENT,
    ModelHistory,
    page_limit,
    pin_facts,
    read_history,
    utcnow,
)
from selfie_lora.services.generation import generates_from_stored_weights, weights_missing_error
from selfie_lora.services.ports import BlobStore, BlobStream, Repository, WeightsConverter

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelOverview:
    """The model with its active version and that version's likeness record. ``model`` is
    pinned as its next training will be (backend, trainer version, destination); ``pin_fixed``
    says whether that pin is its own already (it has had a training, or its user re-pinned it)
    or, false, still follows the configuration until its first training."""

    model: Model
    active: Version | None
    active_record: VersionLikeness | None
    pin_fixed: bool = True


def weights_missing_for_download(version: Version) -> ConflictError:
    """What a user is told when ``version``'s weights cannot be downloaded or exported because
    the file is gone from the storage: the 409 ``weights_missing`` generating with it answers, not
    a 500 they would retry (nothing brings the file back; another version's can be had)."""
    return weights_missing_error(version, so="they cannot be downloaded",
                                 instead="download another version")


def weights_filename(version: Version, weights_format: WeightsFormat) -> str:
    return f"lora-v{version.number}{weights_format.file_suffix}.safetensors"


@dataclass(frozen=True)
class WeightsDownload:
    """A version's LoRA file: a presigned URL to send the client to, or its bytes to stream.
    ``sha256`` is the digest of those bytes (an export's differs from the stored file's)."""

    version: Version
    url: str | None
    stream: BlobStream | None
    weights_format: WeightsFormat = WeightsFormat.DIFFUSERS
    digest: str | None = None
    # The stored file's bytes [start, end) read on their own (a resumed download), instead of
    # the stream's from its first byte; None for a stream held in memory (an export).
    open_range: Callable[[int, int], BlobStream] | None = None
    # ``stream`` holds the file's first byte only (``for_range``): its size, for the answer to
    # choose the range, whose bytes ``open_range`` then reads.
    probe: bool = False

    @property
    def filename(self) -> str:
        return weights_filename(self.version, self.weights_format)

    @property
    def sha256(self) -> str:
        return self.digest or self.version.weights_sha256


@dataclass(frozen=True)
class WeightsExport:
    """A version's LoRA file in a layout, whole (``selfie-lora export``)."""

    version: Version
    weights_format: WeightsFormat
    data: bytes

    @property
    def filename(self) -> str:
        return weights_filename(self.version, self.weights_format)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


class ModelService:
    def __init__(self, *, repo: Repository, blobs: BlobStore,
                 download_url_expiry: timedelta | None = None,
                 converter: WeightsConverter | None = None,
                 repin_policy: RepinPolicy | None = None,
                 defaults: Callable[[], TrainingDefaults] | None = None) -> None:
        self._repo = repo
        # What the configuration says now (a callable, as TrainingService's): a model never
        # trained nor re-pinned is re-pinned relative to the pin its first training would take
        # (the model page's), not to the row stored at its upload. None: the stored row is that
        # pin (tests that never reconfigure).
        self._defaults = defaults
        # Which trainer versions a user may re-pin to (default: the built-in Replicate trainer's
        # versions and every local recipe).
        self._repin_policy = repin_policy or RepinPolicy()
        self._blobs = blobs
        # None: only the stored layout can be downloaded.
        self._converter = converter
        # Set: downloads are presigned URLs of the object storage (where it has them).
        self._download_url_expiry = download_url_expiry

    def get(self, *, user: User) -> Model:
        return _users_model(self._repo, user)

    def find(self, *, user: User) -> Model | None:
        return self._repo.get_model_for_user(user.id)

    def overview(self, *, user: User) -> ModelOverview:
        """``GET /api/model``: 404 before the first upload. One read of the database."""
        found = self._repo.get_model_overview(user.id)
        if found is None:
            raise NoModelError(user=user.name)
        model, active, record = found
        return self._pinned_overview(model, active, record)

    def overview_of(self, model: Model) -> ModelOverview:
        active = self.active_version(model=model)
        record = self._repo.get_likeness(active.id) if active else None
        return self._pinned_overview(model, active, record)

    def _pinned_overview(self, model: Model, active: Version | None,
                         record: VersionLikeness | None, *,
                         repo: Repository | None = None) -> ModelOverview:
        """The overview with the pin the next training takes (the model page's,
        ``TrainingService.next_pin``), not the row stored at the upload: before the first
        training that row may name a trainer version, backend and destination the training
        will not use (the configuration changed since the upload). ``repo``: the transaction
        the model was read in (a write's answer), else the service's repository."""
        if active is not None:
            # Every version comes of a training, so the pin is fixed: the hot read of a
            # trained model (GET /api/model, the progress polls) stays one query.
            return ModelOverview(model=model, active=active, active_record=record)
        facts = pin_facts(repo or self._repo, model)
        # Also when the user re-pinned it (``fixed``): its trainer version is kept, but until
        # the first training creates the destination that follows the configured Replicate
        # owner, as the model page and that training have it.
        if not facts.trained_before and self._defaults is not None:
            model = pin_for_training(model, self._defaults(), trained_before=False,
                                     repinned_by_user=facts.repinned_by_user)
        return ModelOverview(model=model, active=active, active_record=record,
                             pin_fixed=facts.fixed)

    def _written_overview(self, tx: Repository, user: User) -> ModelOverview:
        """A write's answer: the overview as the write's own transaction ``tx`` leaves it, read
        before it commits. Read after the commit, another request's write committed in between
        (the same user's scale reset, another activation) was answered as this one's."""
        found = tx.get_model_overview(user.id)
        if found is None:  # the model's row is locked by the write: it cannot be gone
            raise NoModelError(user=user.name)
        return self._pinned_overview(*found, repo=tx)

    def history(self, *, user: User) -> ModelHistory | None:
        """The user's model with its versions, likeness records and trainings, each read once
        (None before the first upload), for a page that shows them in several ways."""
        model = self._repo.get_model_for_user(user.id)
        return None if model is None else read_history(self._repo, model)

    def versions_with_likeness(self, *, user: User, history: ModelHistory | None = None
                               ) -> list[tuple[Version, LikenessFacts | None]]:
        """Every version, newest first, each with its likeness record."""
        if history is None:
            return self.versions_page(user=user).versions
        return [(v, history.records.get(v.id)) for v in history.versions]

    def version_numbers(self, *, user: User, version_ids: Collection[str]) -> dict[str, int]:
        """The numbers of the user's versions among ``version_ids`` (a page of generations'),
        by id; one gone since is left out. Only those are read: the Generate page read every
        version and likeness record of the model to number its 50 pictures."""
        model = self._repo.get_model_for_user(user.id)
        if model is None or not version_ids:
            return {}
        return {v.id: v.number for v in self._repo.versions_by_ids(model.id, version_ids)}

    def versions_page(self, *, user: User, limit: int | None = None, before: str | None = None
                      ) -> VersionsPage:
        """``GET /api/model/versions``: every version, newest first (the contract's answer),
        or with ``limit`` (1 to ``PAGE_MAX``) a page of them: those numbered below ``before``
        (``older`` of the page before: a version number, ``12`` or ``v12``; it need not exist
        any more; an empty one is the first page, as ``GenerationService.page`` takes it).
        ``older`` is None on the page holding version 1."""
        below = before_version_number(before) if before else None
        model = self._repo.get_model_for_user(user.id)
        if model is None:
            return VersionsPage(versions=[], older=None)
        # One more than shown: whether there are older ones, without counting them all.
        rows = self._repo.list_versions(
            model.id, below=below, limit=page_limit(limit) + 1 if limit is not None else None)
        shown = rows[:limit] if limit is not None else rows
        # The summaries: the answer has each version's headline scores, not its probes. A
        # page's own versions' only, as the log's pages read theirs: every record of the model
        # for five versions cost a read that grew with every training. The whole list reads
        # them all (a filter naming every version would only lengthen the query).
        records = {r.version_id: r for r in self._repo.list_likeness_summaries(
            model.id, version_ids={v.id for v in shown} if limit is not None else None)}
        older = str(shown[-1].number) if limit is not None and len(rows) > limit else None
        return VersionsPage(versions=[(v, records.get(v.id)) for v in shown], older=older)

    def photos_used(self, *, user: User, history: ModelHistory | None = None) -> dict[str, int]:
        """How many photos each version was trained on (version id -> count)."""
        if history is None:
            history = self.history(user=user)
            if history is None:
                return {}
        by_training = {t.id: t.dataset_id for t in history.trainings}
        used = {v.id: by_training[v.training_id] for v in history.versions
                if v.training_id in by_training}
        # One read for every photo set: reading each dataset row cost a query per upload on
        # every view of the Versions page.
        sizes = self._repo.dataset_sizes(set(used.values()))
        return {version_id: sizes.get(dataset_id, 0) for version_id, dataset_id in used.items()}

    def set_lora_scale(self, *, user: User, lora_scale: float) -> ModelOverview:
        return self.change(user=user, lora_scale=lora_scale)

    def change_trainer_version(self, *, user: User, trainer_version: str,
                               reason: str) -> ModelOverview:
        """The one explicit, logged way to move a model to another trainer version (``change``)."""
        return self.change(user=user, trainer_version=trainer_version, reason=reason)

    def change(self, *, user: User, lora_scale: float | None = None,
               lora_scale_to_default: bool = False,
               trainer_version: str | None = None, reason: str = "") -> ModelOverview:
        """``PATCH /api/model``: the LoRA scale, the trainer version, or both, each change with
        its event in the audit log, all in one transaction: the whole of it is applied, or
        nothing (a crash, a bad scale, a refused re-pin). The trainer version must be one its
        backend can train with (422) and that the operator allows (403, ``RepinPolicy``), and
        needs a reason; moving to the version already pinned changes nothing and logs nothing,
        so a PATCH sent again (its answer lost) leaves the log as the first one did, except on
        a model never trained nor re-pinned yet, whose first explicit choice is logged even
        when it is the version shown (``repin_is_recorded``), so that it becomes the pin.
        ``lora_scale_to_default`` (``{"lora_scale": null}``) gives the model back the default
        scale, no longer custom (``lora_scale_reset``); on a model not custom it changes and
        logs nothing. The answer is the model as this change left it (``_written_overview``)."""
        if lora_scale is not None and lora_scale_to_default:
            raise InvalidInputError("send a lora_scale or go back to the default, not both",
                                    code=ErrorCode.INVALID_LORA_SCALE)
        scale = validate_lora_scale(lora_scale) if lora_scale is not None else None
        if trainer_version is not None and not reason.strip():
            raise InvalidInputError("say why the trainer version changes (reason)",
                                    code=ErrorCode.REASON_REQUIRED)
        check_repin_lengths(trainer_version=trainer_version or "", reason=reason)
        repinned: tuple[str, str] | None = None
        # The checks and the writes in one transaction, the model row locked (PostgreSQL; on
        # SQLite the transaction holds the database's write lock from its start): a start takes
        # the same lock (TrainingService.start), so none can queue a training on the old pin
        # between "nothing is running" and the new pin; and the scale's "from" is the one it
        # replaces.
        with self._repo.atomic() as tx:
            model = _users_model(tx, user, for_update=True)
            if trainer_version is not None:
                trainings = tx.list_trainings(model.id)
                facts = pin_facts(tx, model, trainings=trainings)
                # The pin the re-pin moves: before the first training and any re-pin, the one
                # that training would take (the configured backend, its destination and
                # version: what the model page shows), not the upload's row. Against the row,
                # a server moved from local to Replicate refused the Replicate version the
                # page showed, and a PATCH back to the upload's local version was recorded as
                # the user's pin, sending the first training to the old backend.
                base = model if self._defaults is None else pin_for_training(
                    model, self._defaults(), trained_before=facts.trained_before,
                    repinned_by_user=facts.repinned_by_user)
                version = self._repin_policy.check(backend=base.backend,
                                                   trainer_version=trainer_version)
                changed = with_trainer_version(base, version)
                # On a model never trained, a re-pin to the version it shows is recorded too:
                # without its event the first training would take the configured version.
                if repin_is_recorded(pinned=base.trainer_version,
                                     requested=changed.trainer_version,
                                     trained_before=facts.trained_before,
                                     repinned_before=facts.repinned_by_user):
                    if any(t.status.is_active for t in trainings):
                        raise ConflictError("wait for the running training to end before "
                                            "re-pinning")
                    # The backend and destination with the version: the event makes this the
                    # pin (pin_for_training keeps the row), so the row must be the whole pin.
                    tx.set_model_pin(model.id, backend=changed.backend,
                                     trainer_version=changed.trainer_version,
                                     destination=changed.destination)
                    tx.add_event(model_id=model.id, kind=REPINNED_EVENT, data={
                        "from": base.trainer_version, "to": changed.trainer_version,
                        "reason": reason,
                    })
                    repinned = (base.trainer_version, changed.trainer_version)
            if scale is not None:
                tx.set_model_lora_scale(model.id, scale, is_custom=True)
                tx.add_event(model_id=model.id, kind="lora_scale_set",
                             data={"from": model.lora_scale, "to": scale})
            if lora_scale_to_default and model.lora_scale_is_custom:
                # Not custom: a later change of the default reaches this model (contract
                # invariant 4: the default applies while no scale is set).
                tx.set_model_lora_scale(model.id, DEFAULT_LORA_SCALE, is_custom=False)
                tx.add_event(model_id=model.id, kind="lora_scale_reset",
                             data={"from": model.lora_scale, "to": DEFAULT_LORA_SCALE})
            changed_overview = self._written_overview(tx, user)
        if repinned is not None:
            logger.warning("model %s re-pinned from %s to %s (%s)", model.id, *repinned, reason)
        return changed_overview

    def versions(self, *, user: User) -> Sequence[Version]:
        model = self._repo.get_model_for_user(user.id)
        return [] if model is None else self._repo.list_versions(model.id)

    def version(self, *, user: User, version_id: str) -> Version:
        """The user's version ``version_id``: its id, or its number (``2`` or ``v2``)."""
        return _models_version(self._repo, self.get(user=user), version_id)

    def active_version(self, *, model: Model) -> Version | None:
        if model.active_version_id is None:
            return None
        return self._repo.get_version(model.active_version_id)

    def activate(self, *, user: User, version_id: str) -> ModelOverview:
        """Rollback or roll forward, the gate notwithstanding: a version the likeness gate held
        back (or has not judged yet) can be activated; the override is recorded on the version
        and in the log. A version whose weights are gone from the storage, on a backend that
        generates from them, is refused (409 ``weights_missing``), as is a local version trained
        for another base model than the server's (409 ``base_model_mismatch``) and one Replicate
        published to another model (409 ``version_mismatch``). The answer is
        the model as this activation left it (``_written_overview``): that version active.
        The version already active changes and logs nothing (the same answer)."""
        found = self.get(user=user)
        wanted = _models_version(self._repo, found, version_id)
        if (generates_from_stored_weights(found.backend)
                and not self._blobs.exists(wanted.weights_key)):
            # Active, it would fail every generation: refused, nothing changed. Checked before
            # the model's row is locked (a storage round trip); a version's weights are never
            # deleted while a version names them, so the answer still holds below.
            logger.error("model %s: version %d not activated: its weights %s are missing",
                         wanted.model_id, wanted.number, wanted.weights_key)
            raise weights_missing_error(wanted)
        if wanted.version_mismatch and wanted.id != found.active_version_id:
            # Active, a version Replicate published to another model than the user's would fail
            # every generation too (422 version_mismatch: its pictures would be another
            # model's), in place of one that worked. Refused, nothing changed; the one active
            # already (a first version, nothing to beat) is left as it is.
            raise ConflictError(
                f"version {wanted.number} cannot become the active version: Replicate "
                f"published it to another model than yours ({found.destination}), so its "
                "pictures would not be of you; activate another version, or retrain",
                code=ErrorCode.VERSION_MISMATCH)
        # Active, a version trained for another base model would fail every generation too.
        check_version_fits_base_model(backend=found.backend, version=wanted,
                                      base_model=self._repin_policy.base_model,
                                      use="become the active version")
        # Read and written under the model's row lock, which the gate takes too
        # (LikenessService.apply_verdict): a gate decision committed while this request waited is
        # what it reads, so it neither undoes the decision nor is undone by it.
        with self._repo.atomic() as tx:
            model = _users_model(tx, user, for_update=True)
            version = _models_version(tx, model, version_id)
            overrides = version.gate_status is not GateStatus.PASSED
            # The version already active: nothing changes and nothing is logged (as a re-pin to
            # the same trainer version), so a client retrying after a lost answer adds no
            # second version_activated event; the answer is the same.
            changes = version.id != model.active_version_id
            if changes:
                tx.set_model_active_version(model.id, version.id)
                if overrides:
                    # Only the marker: the gate's status, reason and scores are the gate's.
                    tx.set_version_override(version.id, {
                        "at": utcnow().isoformat(), "by": "user",
                        "gate_status": str(version.gate_status),
                        "replaced_version_id": model.active_version_id})
                tx.add_event(model_id=model.id, kind=VERSION_ACTIVATED, data={
                    "from": model.active_version_id, "to": version.id,
                    "number": version.number, "gate": str(version.gate_status),
                    "gate_reason": version.gate_reason, "overrides_gate": overrides,
                })
            activated = self._written_overview(tx, user)
        if overrides and changes:
            logger.info("model %s: version %d activated by its user against the gate (%s)",
                        model.id, version.number, version.gate_status)
        return activated

    def weights(self, *, user: User, version_id: str) -> bytes:
        return self._blobs.get(self.version(user=user, version_id=version_id).weights_key)

    def owner_for_export(self, *, version_id: str | None) -> User:
        """Whose version ``selfie-lora export VERSION`` means when no user is named, if only one
        can be meant: the owner of the version with that id, else the one user of this service
        with a model (VERSION a number, or none: the active one). NotFoundError when nobody has a
        model; InvalidInputError when several users could be meant."""
        if version_id is not None:
            version = self._repo.get_version(version_id.strip())
            model = self._repo.get_model(version.model_id) if version is not None else None
            owner = self._repo.get_user(model.user_id) if model is not None else None
            if owner is not None:
                return owner
        owners = self._repo.list_model_owners(limit=2)
        if not owners:
            raise NotFoundError("nobody has a model yet: train one first")
        if len(owners) > 1:
            raise InvalidInputError(
                "several users have a model here: name the user (--user NAME) or the version by "
                "its id")
        owner = self._repo.get_user(owners[0])
        if owner is None:  # the model's user is gone: as if there were no model
            raise NotFoundError("nobody has a model yet: train one first")
        return owner

    def export_weights(self, *, user: User, version_id: str | None = None,
                       weights_format: WeightsFormat = WeightsFormat.DIFFUSERS) -> WeightsExport:
        """The LoRA file of version ``version_id`` (None: the active one) in ``weights_format``.

        An export is converted from the stored file on each request, not kept: it takes about as
        long as reading the file (numpy, no torch), and a second copy of every version's weights
        would double their storage. A file the converter does not understand (a Replicate
        training's may hold modules kohya's layout has no place for) is refused (422).
        """
        if version_id is None:
            version = self.active_version(model=self.get(user=user))
            if version is None:
                raise NotFoundError("no active version yet: train the model first")
        else:
            version = self.version(user=user, version_id=version_id)
        try:
            data = self._blobs.get(version.weights_key)
        except BlobMissingError as exc:
            raise self._weights_missing(version, exc) from exc
        if weights_format is not WeightsFormat.DIFFUSERS:
            if self._converter is None:
                raise InvalidInputError(f"this server cannot export {weights_format} weights",
                                        code=ErrorCode.UNSUPPORTED_WEIGHTS)
            data = self._converter.convert(data, to=weights_format)
        return WeightsExport(version=version, weights_format=weights_format, data=data)

    def download_weights(self, *, user: User, version_id: str,
                         weights_format: WeightsFormat = WeightsFormat.DIFFUSERS,
                         for_range: bool = False) -> WeightsDownload:
        """The version's LoRA file for a download: the stored layout is never read whole into
        memory; another layout is converted in memory (see :meth:`export_weights`).
        ``for_range`` (the client asked for a byte range): the stored file's stream is opened on
        its first byte only (``WeightsDownload.probe``), so that no more than the range is read:
        a whole GET closed unread still pulled megabytes of a large file from S3."""
        if weights_format is not WeightsFormat.DIFFUSERS:
            export = self.export_weights(user=user, version_id=version_id,
                                         weights_format=weights_format)
            return WeightsDownload(
                version=export.version, url=None, weights_format=weights_format,
                stream=BlobStream(size=len(export.data), chunks=iter([export.data])),
                digest=export.sha256)
        version = self.version(user=user, version_id=version_id)
        if self._download_url_expiry is not None:
            url = self._blobs.download_url(
                version.weights_key, expires=self._download_url_expiry,
                filename=weights_filename(version, WeightsFormat.DIFFUSERS))
            if url is not None:
                # A URL is signed whether the object is there or not: without this one look
                # (a HEAD) a missing file was a 307 to a URL that answered 404, where the
                # streamed download answers 409 weights_missing.
                if not self._blobs.exists(version.weights_key):
                    raise self._weights_missing(version, BlobMissingError(
                        f"blob {version.weights_key!r} is missing"))
                return WeightsDownload(version=version, url=url, stream=None)
        try:
            # The stores fail here, before the first byte, when the blob is gone: the answer can
            # still be a 409 rather than a broken stream.
            stream = (self._blobs.open(version.weights_key, start=0, end=1) if for_range
                      else self._blobs.open(version.weights_key))
        except BlobMissingError as exc:
            raise self._weights_missing(version, exc) from exc

        def open_range(start: int, end: int) -> BlobStream:
            try:
                return self._blobs.open(version.weights_key, start=start, end=end)
            except BlobMissingError as exc:  # deleted since the first look
                raise self._weights_missing(version, exc) from exc

        return WeightsDownload(version=version, url=None, stream=stream, open_range=open_range,
                               probe=for_range)

    @staticmethod
    def _weights_missing(version: Version, exc: BlobMissingError) -> ConflictError:
        # The user is told which version; the operator gets the key to look for.
        logger.error("version %s (model %s) cannot be downloaded: %s", version.id,
                     version.model_id, exc.message)
        return weights_missing_for_download(version)


# Version numbers are an INTEGER column: no version is numbered past it.
VERSION_NUMBER_MAX = 2**31 - 1


# How much of a ``before`` that is no number its refusal repeats.
_REF_SHOWN = 64


def before_version_number(ref: str) -> int | None:
    """A ``before`` of the API's versions list and of the Versions page alike: a version number
    (``12``, or ``v12`` as the pages write it); None for one past any version's (no version is
    older: the newest page, as ``before=9999`` gives). Refused (422) when it is no number,
    whatever its length or characters, or a number below 1, which no version is (the page
    showed its newest page for these, where the API said 422). Bound as it was,
    ``2147483648`` was out of PostgreSQL's INTEGER range (a 500 telling the client to retry)
    and a number past 2**63 SQLite's (an OverflowError)."""
    number = version_number_below(ref)
    if number is not None and number < 1:
        raise _no_version_number(ref)
    return number


def _no_version_number(ref: str) -> InvalidInputError:
    # Its start only: a ``before`` is of any length, and the answer need not repeat it.
    # The dots outside the quotes: inside, they read as part of what was sent.
    shown = (repr(ref) if len(ref) <= _REF_SHOWN
             else f"{ref[:_REF_SHOWN]!r}... ({len(ref)} characters)")
    return InvalidInputError(f"before must be a version number, not {shown}")


def _version_digits(ref: str) -> str | None:
    """The digits of ``ref`` (``12`` or ``v12``), or None when it is no number."""
    digits = ref.strip().removeprefix("v")
    # ASCII digits only: isdecimal() and int() take any script's (U+FF11, fullwidth 1; U+0661,
    # Arabic-Indic 1), which activate and every other version reference refuse.
    return digits if digits.isascii() and digits.isdecimal() else None


def version_number_below(ref: str) -> int | None:
    """``ref`` (``12`` or ``v12``) as a number below which to list versions: 0 when it is not
    a number, None past any version's number (int() refuses over 4300 digits: those too).
    The API and the Versions page refuse what is below 1 (``before_version_number``); the
    page's forms go back to its newest page for a hidden ``before`` that is no number (an
    edited form: the form's work is done by then)."""
    digits = _version_digits(ref)
    if digits is None:
        return 0
    # Without the zeros in front: they count towards int()'s 4300 digits too (5000 zeros and a
    # 5 was a ValueError, a 500), and make no number longer.
    significant = digits.lstrip("0") or "0"
    if len(significant) > len(str(VERSION_NUMBER_MAX)):
        return None
    number = int(significant)
    return number if number <= VERSION_NUMBER_MAX else None


@dataclass(frozen=True)
class VersionsPage:
    """A page of a model's versions with their likeness records, newest first; ``older``: the
    next page's ``before`` (None: this page holds the oldest)."""

    versions: list[tuple[Version, LikenessFacts | None]]
    older: str | None


def _users_model(repo: Repository, user: User, *, for_update: bool = False) -> Model:
    """The user's model (its row locked with ``for_update``, inside a transaction)."""
    model = repo.get_model_for_user(user.id, for_update=for_update)
    if model is None:
        raise NoModelError(user=user.name)
    return model


def _models_version(repo: Repository, model: Model, version_id: str) -> Version:
    """``model``'s version ``version_id``: its id, or its number (``2`` or ``v2``)."""
    version = find_version(repo.list_versions(model.id), version_id)
    if version is None:
        raise no_such_version(version_id)
    return version

