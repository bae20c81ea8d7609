"""What an upload may be: sizes, counts and pixel limits, and the uploaded file as read.

Every reader (zip, multipart files, folder) and the decoder take an :class:`UploadLimits`, so one
object states how much work a single upload can cause.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import BinaryIO

from selfie_lora.domain.entities import Finding

MIB = 1024 * 1024


def byte_size(value: int) -> str:
    """A size limit as users read it in a refusal (SELFIE_LORA_MAX_UPLOAD_BYTES: the API's
    guard, the upload routes, ``selfie-lora check``): MB (of 1024 x 1024 bytes) with one decimal
    where it is not whole, or bytes below 1 MB. Rounded down: what is refused is truly larger
    than the size stated (rounded, 1.96 MB read "2 MB" beside a 1.97 MB file it refused)."""
    if value < MIB:
        return f"{value} bytes"
    whole, tenth = divmod(value * 10 // MIB, 10)
    return f"{whole} MB" if tenth == 0 else f"{whole}.{tenth} MB"


@dataclass(frozen=True)
class UploadLimits:
    """Upper bounds on one upload. The defaults fit 200 phone photos with room to spare."""

    # The bytes as received (a zip, or all multipart files together).
    max_upload_bytes: int = 200 * MIB
    # Files read from one upload (photos and anything else that is not skipped).
    max_members: int = 200
    # Entries of an archive or folder in all, skipped ones included (a Mac zip holds a
    # ``__MACOSX/._x`` twin per photo): counted from the end record and the central directory
    # before anything is decompressed, so 10,000 empty members cost nothing.
    max_entries: int = 1000
    # Decompressed bytes of one file (over it: a finding about that file, which is never
    # decompressed or read further), and of all files of the upload together (over it: the
    # upload is refused).
    max_member_bytes: int = 50 * MIB
    max_total_bytes: int = 500 * MIB
    # Decompressed / compressed, per archive member and for the whole archive. Photos are already
    # compressed (ratio ~1); a zip bomb is 1000:1 or more.
    max_ratio: int = 200
    # The ratio is only judged past this many decompressed bytes: a small text-like member can
    # legitimately compress far better than 200:1 and costs nothing.
    ratio_min_bytes: int = MIB
    # Decoded image size, checked from the header before any pixel is decoded.
    max_pixels: int = 40_000_000
    max_side: int = 12_000
    # Longest side of a photo as stored after preparation.
    stored_max_side: int = 1024

    def mib(self, value: int) -> str:
        """A byte count as users read it in messages."""
        return f"{value / MIB:.0f} MB" if value >= MIB else f"{value} bytes"

    def over_limit(self, size: int) -> str:
        """``size`` (over ``max_member_bytes``) as users read it beside the limit: never the
        same text as the limit ("50 MB, over the 50 MB" would say nothing)."""
        shown = self.mib(size)
        if shown == self.mib(self.max_member_bytes) and size >= MIB:
            shown = f"{size / MIB:.1f} MB"
        return shown


@dataclass(frozen=True)
class UploadedFile:
    name: str  # for messages only (a sanitized display name); never used as a file name
    data: bytes
    # A file of the upload refused on its own while reading it (larger than a photo may be, an
    # archive inside the upload): its finding, as a photo that cannot be decoded gets one, and
    # no ``data`` (it was never decompressed or read in full). The rest of the upload is read.
    refused: Finding | None = None


# A file sent in a multipart upload as the intake is handed it: the name as sent, and its bytes
# or the (spooled) file holding them from where it stands, of which nothing is read when it is
# larger than a photo may be (``UploadLimits.max_member_bytes``).
SentFile = tuple[str, bytes | BinaryIO]
