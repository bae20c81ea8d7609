"""What an upload may be: sizes, counts and pixel limits, and the uploaded file as read.

Every reader (zip, multipart files, folder) and the decoder take an :class:`UploadLimits`, so one
object states how much work a single upload can cause.
"""

from __future__ import annotations

from dataclasses import dataclass

MIB = 1024 * 1024


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
    # Decompressed bytes of one file, and of all files of the upload together.
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


@dataclass(frozen=True)
class UploadedFile:
    name: str  # for messages only (a sanitized display name); never used as a file name
    data: bytes
