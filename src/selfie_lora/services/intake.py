"""Turning an upload into a stored dataset, or a 422 that stores nothing."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from selfie_lora.dataset.intake import (
    PreparedPhoto,
    UploadedFile,
    UploadLimits,
    prepare_photo,
    read_zip,
)
from selfie_lora.domain.entities import Dataset, Finding, User
from selfie_lora.errors import DatasetRejectedError, NotFoundError
from selfie_lora.services.common import new_id, utcnow
from selfie_lora.services.ports import BlobStore, Repository

logger = logging.getLogger(__name__)


class PhotoChecker(Protocol):
    """Judges prepared photos (faces, blur, duplicates...). Returns findings; a ``reject``
    finding about a photo leaves that photo out."""

    def check(self, photos: Sequence[PreparedPhoto]) -> list[Finding]: ...


class DuplicateChecker:
    """The always-on check: the same photo twice (byte-identical after preparation)."""

    def check(self, photos: Sequence[PreparedPhoto]) -> list[Finding]:
        seen: dict[str, str] = {}
        findings: list[Finding] = []
        for photo in photos:
            if photo.sha256 in seen:
                findings.append(Finding(
                    "reject", "duplicate_photo",
                    f"{photo.name} is the same photo as {seen[photo.sha256]}",
                    "leave one copy in and add a different photo instead", photo=photo.name,
                ))
            else:
                seen[photo.sha256] = photo.name
        return findings


@dataclass(frozen=True)
class IntakeReport:
    images_total: int
    accepted: tuple[PreparedPhoto, ...]
    findings: tuple[Finding, ...]
    trainable: bool


def photo_key(sha256: str) -> str:
    return f"photos/{sha256}.jpg"


def manifest_key(dataset_id: str) -> str:
    return f"datasets/{dataset_id}/manifest.json"


class IntakeService:
    def __init__(
        self,
        *,
        repo: Repository,
        blobs: BlobStore,
        limits: UploadLimits,
        min_photos: int,
        max_photos: int,
        checkers: Sequence[PhotoChecker] = (DuplicateChecker(),),
    ) -> None:
        self._repo = repo
        self._blobs = blobs
        self._limits = limits
        self._min = min_photos
        self._max = max_photos
        self._checkers = list(checkers)
        self.limits = limits

    def ingest_zip(self, *, user: User, data: bytes) -> Dataset:
        files, findings = read_zip(data, limits=self._limits)
        return self.ingest_files(user=user, files=files, findings=findings)

    def check_files(
        self, *, files: Sequence[UploadedFile], findings: Sequence[Finding] = ()
    ) -> IntakeReport:
        """Judge a set of photos without storing anything (``selfie-lora check``)."""
        all_findings = list(findings)
        prepared: list[PreparedPhoto] = []
        for upload in files:
            result = prepare_photo(upload, limits=self._limits)
            if isinstance(result, Finding):
                all_findings.append(result)
            else:
                prepared.append(result)
        for checker in self._checkers:
            all_findings.extend(checker.check(prepared))
        rejected = {f.photo for f in all_findings if f.severity == "reject" and f.photo}
        accepted = [p for p in prepared if p.name not in rejected]
        if len(accepted) < self._min:
            all_findings.append(Finding(
                "reject", "too_few_photos",
                f"{len(accepted)} usable photo(s); at least {self._min} are needed",
                "add more clear photos of your face (15-25 works best)",
            ))
        if len(accepted) > self._max:
            all_findings.append(Finding(
                "reject", "too_many_photos",
                f"{len(accepted)} usable photos; at most {self._max} are accepted",
                f"keep your best {self._max} photos",
            ))
        return IntakeReport(
            images_total=len(files), accepted=tuple(accepted), findings=tuple(all_findings),
            trainable=self._min <= len(accepted) <= self._max,
        )

    def ingest_files(
        self, *, user: User, files: Sequence[UploadedFile], findings: Sequence[Finding] = ()
    ) -> Dataset:
        report = self.check_files(files=files, findings=findings)
        accepted = list(report.accepted)
        all_findings = list(report.findings)
        if not report.trainable:
            # Nothing is stored for a set that cannot train: the user fixes it and uploads again.
            raise DatasetRejectedError(
                "these photos cannot be trained on: "
                + "; ".join(f.message for f in all_findings if f.severity == "reject"),
                details=[f.as_dict() for f in all_findings],
            )
        hashes = tuple(p.sha256 for p in accepted)
        set_hash = hashlib.sha256("\n".join(sorted(hashes)).encode()).hexdigest()
        dataset = Dataset(
            id=new_id(), user_id=user.id, images_total=len(files), images_accepted=len(accepted),
            photo_hashes=hashes, findings=tuple(all_findings), accepted=True, sha256=set_hash,
            created_at=utcnow(),
        )
        for photo in accepted:
            key = photo_key(photo.sha256)
            if not self._blobs.exists(key):  # content-addressed: the same photo is stored once
                self._blobs.put(key, photo.data)
        manifest = {
            "dataset_id": dataset.id,
            "photos": [{"sha256": p.sha256, "key": photo_key(p.sha256)} for p in accepted],
            "findings": [f.as_dict() for f in all_findings],
            "sha256": set_hash,
        }
        self._blobs.put(manifest_key(dataset.id), json.dumps(manifest, indent=2).encode())
        self._repo.add_dataset(dataset)
        logger.info("dataset %s: %d of %d photos accepted", dataset.id, len(accepted), len(files))
        return dataset

    def get(self, *, user: User, dataset_id: str) -> Dataset:
        dataset = self._repo.get_dataset(dataset_id)
        if dataset is None or dataset.user_id != user.id:
            raise NotFoundError("no such dataset")
        return dataset
