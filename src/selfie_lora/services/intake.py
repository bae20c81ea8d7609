"""Turning an upload into a stored dataset, or a 422 that stores nothing.

Reading (``dataset.archive``) and judging (``dataset.pipeline``: decoding, face checks, set checks,
preparation) happen before anything is written; only a trainable set is stored, as prepared,
metadata-free photos (content-addressed, so the same photo is stored once) and a manifest.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selfie_lora.dataset.archive import (
    form_escape,
    form_filename,
    read_path,
    read_uploaded_files,
    read_zip,
    uploaded_name,
)
from selfie_lora.dataset.checks import AGAINST_THE_SET, CheckPolicy, TrainedPerson
from selfie_lora.dataset.limits import SentFile, UploadedFile, UploadLimits
from selfie_lora.dataset.pipeline import (
    IntakeResult,
    OutcomeCache,
    run_intake,
    shutdown_pools,
    stop_count,
    warm_up,
)
from selfie_lora.dataset.prepare import PreparedPhoto, dataset_sha256
from selfie_lora.domain.entities import Dataset, Finding, Recipe, User
from selfie_lora.domain.likeness import stored_embeddings
from selfie_lora.domain.plan import TrainingDefaults
from selfie_lora.domain.recipes import CheckTarget, recipe_for
from selfie_lora.errors import (
    ConfigError,
    DatasetRejectedError,
    NotFoundError,
    StorageError,
)
from selfie_lora.services.common import new_id, next_training_pin, utcnow
from selfie_lora.services.layout import manifest_key, original_key, photo_key, reference_key
from selfie_lora.services.ports import (
    AnalyzerFactory,
    BlobStore,
    BlobStream,
    FaceAnalyzer,
    Repository,
    Telemetry,
)
from selfie_lora.services.telemetry import NullTelemetry

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreparedDataset:
    """A checked upload whose files are stored, and whose row is still to commit: the dataset,
    and the content-addressed blobs it shares with other uploads (photos, originals) with their
    bytes, kept to write them again should one go meanwhile (``IntakeService.keep_stored``)."""

    dataset: Dataset
    shared: dict[str, bytes] = dataclasses.field(default_factory=dict, repr=False)


def _passed_own_checks(total: int, findings: Sequence[Finding]) -> int:
    failed = {f.photo for f in findings
              if f.severity == "reject" and f.photo and f.code not in AGAINST_THE_SET}
    return max(0, total - len(failed))


@dataclass(frozen=True)
class IntakeReport:
    """What ``selfie-lora check`` and every upload see: findings, the photos that would train,
    and one verdict."""

    images_total: int
    accepted: tuple[PreparedPhoto, ...]
    findings: tuple[Finding, ...]
    trainable: bool
    verdict: dict[str, Any]
    # What the photos were judged for: the training (a ``CheckTarget``) and its resolution.
    target: str
    resolution: int
    # The accepted photos' faces as found on the decoded upload (full detail, unlike the
    # training crops, which can be as small as 64 px): name -> (faces found, embedding).
    faces: dict[str, tuple[int, tuple[float, ...] | None]] = dataclasses.field(
        default_factory=dict)
    # Each analysed photo's main face as fractions of the photo (left, top, right, bottom), for
    # drawing the box on a thumbnail.
    boxes: dict[str, tuple[float, float, float, float]] = dataclasses.field(default_factory=dict)

    @property
    def passed_own_checks(self) -> int:
        """How many photos of the upload pass their own checks: all but those with a rejection
        of their own (unreadable files included). Copies and other people's photos pass theirs:
        counting the accepted photos instead said "4 of 10 pass their own checks" of a set where
        6 did, two of them only rejected against the others."""
        return _passed_own_checks(self.images_total, self.findings)

    @classmethod
    def from_result(cls, result: IntakeResult, *, notes: Sequence[Finding],
                    target: CheckTarget, resolution: int) -> IntakeReport:
        report = result.report
        findings = (*notes, *result.findings)
        # The counts say what the text says: a refused set trains none of its photos ("none is
        # usable"), and every photo not trained on is rejected, undecodable files included (they
        # are photos left out). "accepted" counted the prepared photos of a refused set and
        # "rejected" left the unreadable files out, so the two did not add up to images_total.
        accepted = len(result.prepared) if report.trainable else 0
        return cls(
            images_total=result.images_total, accepted=result.prepared,
            findings=findings, trainable=report.trainable,
            verdict={
                "trainable": report.trainable, "quality": report.quality,
                "score": report.score, "reasons": list(report.reasons),
                "accepted": accepted, "rejected": result.images_total - accepted,
                "passed_own_checks": _passed_own_checks(result.images_total, findings),
                "seconds": round(result.seconds, 3),
                "target": target.value, "resolution": resolution,
            },
            target=target.value, resolution=resolution,
            faces={a.name: (len(a.faces), a.embedding) for a in result.analyses},
            boxes={a.name: _fractions(a.main_face.box, a.image_size)
                   for a in result.analyses if a.main_face is not None},
        )


def _fractions(box: tuple[int, int, int, int], size: tuple[int, int]
               ) -> tuple[float, float, float, float]:
    width, height = max(1, size[0]), max(1, size[1])

    def clamp(v: float) -> float:
        return round(min(1.0, max(0.0, v)), 4)

    return (clamp(box[0] / width), clamp(box[1] / height), clamp(box[2] / width),
            clamp(box[3] / height))


@dataclass(frozen=True)
class DatasetPhoto:
    index: int
    name: str
    sha256: str
    # Fractions of the photo as uploaded (not of the crop stored for training).
    face_box: tuple[float, float, float, float] | None


def _as_list(embedding: tuple[float, ...] | None) -> list[float] | None:
    return list(embedding) if embedding is not None else None


class IntakeService:
    def __init__(
        self,
        *,
        repo: Repository | None,
        blobs: BlobStore | None,
        limits: UploadLimits,
        policy: CheckPolicy,
        analyzer: FaceAnalyzer,
        defaults: Callable[[], TrainingDefaults],
        analyzer_factory: AnalyzerFactory | None = None,
        workers: int = 2,
        keep_originals: bool = False,
        telemetry: Telemetry | None = None,
        gate_enabled: bool = True,
    ) -> None:
        # None: the photo checks alone (`selfie-lora check`), which store nothing and so need
        # neither a database nor a HOME; storing or reading a dataset is then a bug.
        self._repo_or_none = repo
        self._blobs_or_none = blobs
        self._telemetry: Telemetry = telemetry or NullTelemetry()
        self.limits = limits
        self._policy = policy
        self._analyzer = analyzer
        # Builds the analyzer of each photo-analysis process (None: analyse in threads).
        self._analyzer_factory = analyzer_factory
        self._defaults = defaults
        self._workers = workers
        # SELFIE_LORA_QUALITY_GATE: whether a retraining on another person's photos would be
        # held back, as the warning about such photos says (``_trained_person``).
        self._gate_enabled = gate_enabled
        self._keep_originals = keep_originals
        # Photos analysed before in this process: a check followed by its upload, or a
        # retraining with the same photos and one more, analyses each photo once.
        self.outcomes = OutcomeCache()

    @property
    def _repo(self) -> Repository:
        if self._repo_or_none is None:
            raise ConfigError("these photo checks have no database: they only judge photos")
        return self._repo_or_none

    @property
    def _blobs(self) -> BlobStore:
        if self._blobs_or_none is None:
            raise ConfigError("these photo checks have no storage: they only judge photos")
        return self._blobs_or_none

    def stop_count(self) -> int:
        """How many times the photo-analysis processes were stopped (``warm_up``'s ``since``)."""
        return stop_count()

    def warm_up(self, *, since: int | None = None) -> None:
        """Start the photo-analysis worker processes (a service start calls this). ``since``:
        ``stop_count()`` when the service started; a stop after it makes this start nothing."""
        try:
            if not warm_up(self._analyzer_factory, workers=self._workers, since=since):
                logger.info("photo-check warm-up stopped: the service is stopping")
        except Exception:  # only a head start: the first upload starts them otherwise
            logger.warning("could not start the photo-analysis processes early", exc_info=True)

    def shut_down(self) -> None:
        """Stop the photo-analysis processes (a service's shutdown calls this)."""
        shutdown_pools()

    def judged_for(self, user: User | None = None, *, target: CheckTarget | None = None
                   ) -> tuple[CheckTarget, int]:
        """The training photos are judged for, and its trainer's resolution: ``target``'s, else
        the one the user's model trains with next (``next_training_pin``), else a new model's
        (the configured default). Photos are cropped to the resolution, and judged against it
        (is the face sharp enough for it?)."""
        target, recipe = self._judged_recipe(user, target=target)
        return target, recipe.resolution

    def _judged_recipe(self, user: User | None, *, target: CheckTarget | None
                       ) -> tuple[CheckTarget, Recipe]:
        defaults = self._defaults()
        if target is not None:
            return target, target.recipe(replicate_recipe=defaults.replicate_recipe,
                                         backend=defaults.backend,
                                         trainer_version=defaults.trainer_version)
        model = self._repo.get_model_for_user(user.id) if user is not None else None
        if model is not None:  # cropped for the version its next training takes
            model = next_training_pin(self._repo, model, defaults)
        backend = model.backend if model else defaults.backend
        version = model.trainer_version if model else defaults.trainer_version
        recipe = recipe_for(backend=backend, trainer_version=version,
                            replicate_recipe=defaults.replicate_recipe)
        return CheckTarget.of(backend=backend, trainer_version=version), recipe

    def check_files(
        self, *, files: Sequence[UploadedFile], findings: Sequence[Finding] = (),
        user: User | None = None, target: CheckTarget | None = None,
    ) -> IntakeReport:
        """Judge a set of photos without storing anything, for ``target``'s training (by
        default the user's model's, see ``judged_for``)."""
        target, recipe = self._judged_recipe(user, target=target)
        resolution = recipe.resolution
        # The crops stored are what the recipe trains on: squares, or its aspect buckets.
        policy = dataclasses.replace(self._policy, resolution=resolution,
                                     aspect_buckets=recipe.aspect_buckets)
        result = run_intake(files, limits=self.limits, policy=policy, analyzer=self._analyzer,
                            factory=self._analyzer_factory, workers=self._workers,
                            cache=self.outcomes,
                            cache_scope=user.id if user is not None else None,
                            trained=self._trained_person(user) if user is not None else None)
        report = IntakeReport.from_result(result, notes=findings, target=target,
                                          resolution=resolution)
        self._telemetry.intake_done(seconds=result.seconds, photos=result.images_total,
                                    trainable=report.trainable)
        return report

    def _trained_person(self, user: User) -> TrainedPerson | None:
        """The person the user's model was trained on: the training photos' faces of its active
        version (else of its newest version, when none is active), read from the faces the
        intake stored with that dataset (``reference_key``; the likeness scoring writes the same
        file for a dataset stored without it). None when the user has no version yet, when the
        file is not there (a dataset stored before the intake kept the faces, never scored) or
        cannot be read: the comparison is then skipped rather than decoding every old photo on
        each upload."""
        if self._repo_or_none is None or self._blobs_or_none is None:
            return None
        model = self._repo.get_model_for_user(user.id)
        if model is None:
            return None
        version = (self._repo.get_version(model.active_version_id)
                   if model.active_version_id else None)
        active = version is not None
        if version is None:
            newest = self._repo.list_versions(model.id, limit=1)
            version = newest[0] if newest else None
        if version is None:
            return None
        training = self._repo.get_training(version.training_id)
        if training is None:
            return None
        key = reference_key(training.dataset_id, self._analyzer.model_name)
        try:
            if not self._blobs.exists(key):
                return None
            embeddings = stored_embeddings(json.loads(self._blobs.get(key)))
        except (StorageError, ValueError, KeyError, TypeError) as exc:
            # Only a comparison more: the upload is judged without it, never refused for it.
            logger.warning("version %s: its training photos' faces could not be read (%s: %s); "
                           "the new photos are not compared with them", version.id,
                           type(exc).__name__, exc)
            return None
        if not embeddings:
            return None
        return TrainedPerson(version=version.number, embeddings=embeddings,
                             gated=active and self._gate_enabled)

    # Reading an upload: every file checked for what it is before a photo is decoded (see
    # ``dataset.archive``); the notes are findings about skipped entries.
    def read_zip(self, data: bytes) -> tuple[list[UploadedFile], list[Finding]]:
        return read_zip(data, limits=self.limits)

    def read_files(self, named: Sequence[SentFile], *, form_escaped: bool = True
                   ) -> tuple[list[UploadedFile], list[Finding]]:
        return read_uploaded_files(named, limits=self.limits, form_escaped=form_escaped)

    def stored_names(self, raw_names: Sequence[str], *, form_escaped: bool = True) -> list[str]:
        """The names ``read_files`` reads these photos under, in order: cleaned for display
        (NFC, bounded, no control characters), so not always the names the browser sent."""
        return [uploaded_name(raw, index, form_escaped=form_escaped)
                for index, raw in enumerate(raw_names)]

    def sent_names(self, raw_names: Sequence[str], *, form_escaped: bool = True) -> list[str]:
        """The names the browser had for these files, in order: a part's filename carries a '"'
        as %22 (and CR, LF as %0D, %0A), which the page's script never sees. (Names that are
        not multipart filenames, ``form_escaped`` False, are the names.)"""
        return [form_filename(raw) if form_escaped else raw for raw in raw_names]

    def upload_names(self, filenames: Sequence[str], names: Sequence[str]
                     ) -> tuple[list[str], bool]:
        """The names to read the files of an upload under (``read_files``' names), and whether
        they are form-escaped (its ``form_escaped``), for the web page's upload and the API's
        alike. ``filenames``: the parts' multipart filenames ("" where a part has none: the
        intake names it by its place, "photo3"). ``names``: the files' own names, sent beside
        them (the web page's script sends them; so may an API client), taken where each is
        what its filename says once escaped as a browser escapes it: a '%' is not, so only
        these names tell '100%22off.jpg' from '100"off.jpg'. Else the filenames, read back."""
        if len(names) == len(filenames) and all(
                form_escape(name) == filename
                for name, filename in zip(names, filenames, strict=True)):
            return list(names), False
        return list(filenames), True

    def read_path(self, path: Path) -> tuple[list[UploadedFile], list[Finding]]:
        """A folder of photos or a zip on this machine (the command line)."""
        return read_path(path, limits=self.limits)

    def check_path(self, path: Path, *, target: CheckTarget | None = None) -> IntakeReport:
        """``selfie-lora check [--for TARGET]``: the report for a folder or zip, nothing stored;
        judged for ``target``'s training, by default a new model's."""
        files, notes = self.read_path(path)
        return self.check_files(files=files, findings=notes, target=target)

    def ingest_zip(self, *, user: User, data: bytes) -> Dataset:
        files, notes = self.read_zip(data)
        return self.ingest_files(user=user, files=files, findings=notes)

    def ingest_files(
        self, *, user: User, files: Sequence[UploadedFile], findings: Sequence[Finding] = ()
    ) -> Dataset:
        """Check the photos and store them as a dataset (``DatasetRejectedError`` otherwise)."""
        prepared = self.prepare_files(user=user, files=files, findings=findings)
        self._repo.add_dataset(prepared.dataset)
        self.keep_stored(prepared=prepared)
        return prepared.dataset

    def keep_stored(self, *, prepared: PreparedDataset) -> None:
        """Called once the dataset's row has committed: writes again any of its shared blobs
        that is gone. A garbage collection that read the references before that commit, and
        looked at the blob's age before this upload wrote it again, may have deleted it since;
        from the commit on, no collection deletes it (the row names it)."""
        for key, data in prepared.shared.items():
            # Best effort: the row is stored, and a storage error here must not fail the upload.
            try:
                if not self._blobs.exists(key):
                    logger.warning("dataset %s: %s was deleted while it was uploaded again (a "
                                   "garbage collection); written again", prepared.dataset.id,
                                   key)
                    self._blobs.put(key, data)
            except StorageError:
                logger.exception("dataset %s: could not check that %s is stored",
                                 prepared.dataset.id, key)

    def prepare_files(
        self, *, user: User, files: Sequence[UploadedFile], findings: Sequence[Finding] = ()
    ) -> PreparedDataset:
        """Check the photos and store their prepared files; the dataset's row is the caller's to
        add (``ingest_files``, or the transaction that starts a training on them), who then
        calls ``keep_stored``."""
        report = self.check_files(files=files, findings=findings, user=user)
        if not report.trainable:
            # Nothing is stored for a set that cannot train: the user fixes it and uploads again.
            must_change = [f.message for f in report.findings if f.severity == "reject"]
            raise DatasetRejectedError(
                "these photos cannot be trained on: " + "; ".join(must_change),
                details=[f.as_dict() for f in report.findings],
                boxes={name: list(box) for name, box in report.boxes.items()},
            )
        accepted = report.accepted
        dataset = Dataset(
            id=new_id(), user_id=user.id, images_total=report.images_total,
            images_accepted=len(accepted), photo_hashes=tuple(p.sha256 for p in accepted),
            findings=report.findings, accepted=True, sha256=dataset_sha256(accepted),
            created_at=utcnow(), verdict=report.verdict,
            face_boxes=tuple(p.face_box for p in accepted),
        )
        shared: dict[str, bytes] = {}
        for photo in accepted:
            # Content-addressed: the same photo is stored once. Written again when it is there
            # already (the same bytes, atomically): a fresh blob is one the garbage collector
            # spares, so a photo nothing referred to any more is not collected between this
            # write and the commit of the row that refers to it again.
            self._blobs.put(photo_key(photo.sha256), photo.data)
            shared[photo_key(photo.sha256)] = photo.data
        originals: dict[str, str] = {}
        if self._keep_originals:
            by_name = {f.name: f for f in files}
            for photo in accepted:
                source = by_name.get(photo.name)
                if source is not None:
                    # Kept as uploaded (metadata included) only because the operator asked to.
                    sha = hashlib.sha256(source.data).hexdigest()
                    self._blobs.put(original_key(sha), source.data)  # fresh, as photos
                    originals[photo.sha256] = original_key(sha)
                    shared[original_key(sha)] = source.data
        manifest = {
            "dataset_id": dataset.id,
            "resolution": report.resolution,
            "photos": [{"sha256": p.sha256, "key": photo_key(p.sha256), "name": p.name,
                        "face_box": list(report.boxes[p.name]) if p.name in report.boxes
                        else None,
                        "crop_face_box": list(p.face_box) if p.face_box else None,
                        "original": originals.get(p.sha256)} for p in accepted],
            "findings": [f.as_dict() for f in report.findings],
            "verdict": report.verdict,
            "sha256": dataset.sha256,
        }
        self._blobs.put(manifest_key(dataset.id), json.dumps(manifest, indent=2).encode())
        self._blobs.put(reference_key(dataset.id, self._analyzer.model_name), json.dumps({
            "dataset_id": dataset.id, "embedding_model": self._analyzer.model_name,
            "photos": [{"sha256": p.sha256, "faces": report.faces.get(p.name, (0, None))[0],
                        "embedding": _as_list(report.faces.get(p.name, (0, None))[1])}
                       for p in accepted],
        }).encode())
        logger.info("dataset %s: %d of %d photos accepted (%s, score %s)", dataset.id,
                    len(accepted), report.images_total, report.verdict["quality"],
                    report.verdict["score"])
        return PreparedDataset(dataset=dataset, shared=shared)

    def latest(self, *, user: User) -> Dataset | None:
        """The user's newest accepted photo set (what a training without a dataset uses)."""
        return self._repo.latest_accepted_dataset(user.id)

    def photos(self, *, user: User, dataset_id: str) -> list[DatasetPhoto]:
        """The kept photos of one of the user's datasets, in upload order (from its manifest)."""
        dataset = self.get(user=user, dataset_id=dataset_id)
        manifest = json.loads(self._blobs.get(manifest_key(dataset.id)))
        out = []
        for index, photo in enumerate(manifest.get("photos", [])):
            box = photo.get("face_box")
            out.append(DatasetPhoto(
                index=index, name=str(photo.get("name") or f"photo {index + 1}"),
                sha256=str(photo["sha256"]),
                face_box=(float(box[0]), float(box[1]), float(box[2]), float(box[3]))
                if box else None))
        return out

    def photo(self, *, user: User, dataset_id: str, index: int) -> BlobStream:
        """One kept photo of one of the user's datasets (JPEG, as prepared for training), to
        stream to the client."""
        for photo in self.photos(user=user, dataset_id=dataset_id):
            if photo.index == index:
                return self._blobs.open(photo_key(photo.sha256))
        raise NotFoundError("no such photo")

    def get(self, *, user: User, dataset_id: str) -> Dataset:
        dataset = self._repo.get_dataset(dataset_id)
        if dataset is None or dataset.user_id != user.id:
            raise NotFoundError("no such dataset")
        return dataset
