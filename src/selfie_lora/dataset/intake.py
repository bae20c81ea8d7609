"""Reading an upload into prepared, metadata-free photos.

This is the first line of the intake: safe archive reading and decoding. The checks that predict
a good LoRA plug in through ``PhotoChecker`` (see ``services.intake``).
"""

from __future__ import annotations

import hashlib
import io
import logging
import posixpath
import stat
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps

from selfie_lora.domain.entities import Finding
from selfie_lora.errors import InvalidInputError

logger = logging.getLogger(__name__)

IMAGE_FORMATS = ("JPEG", "PNG", "WEBP")
_IGNORED_PREFIXES = ("__MACOSX/",)
_IGNORED_NAMES = (".DS_Store", "Thumbs.db")


@dataclass(frozen=True)
class UploadLimits:
    max_upload_bytes: int = 200 * 1024 * 1024
    max_members: int = 200
    max_member_bytes: int = 50 * 1024 * 1024
    max_total_bytes: int = 500 * 1024 * 1024
    max_pixels: int = 40_000_000
    stored_max_side: int = 1024


@dataclass(frozen=True)
class UploadedFile:
    name: str  # as the user named it; shown in findings, never used as a file name
    data: bytes


@dataclass(frozen=True)
class PreparedPhoto:
    name: str
    sha256: str
    data: bytes  # JPEG, orientation applied, RGB, no metadata at all
    width: int
    height: int


def read_zip(data: bytes, *, limits: UploadLimits) -> tuple[list[UploadedFile], list[Finding]]:
    """The files of a zip upload, read with every size counted as it is decompressed."""
    if len(data) > limits.max_upload_bytes:
        raise InvalidInputError(
            f"the upload is larger than {limits.max_upload_bytes // (1024 * 1024)} MB",
            code="upload_too_large",
        )
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        infos = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise InvalidInputError(
            "the upload is not a readable zip archive", code="bad_archive", details=[str(exc)]
        ) from None
    if len(infos) > limits.max_members:
        raise InvalidInputError(
            f"the archive holds {len(infos)} entries; at most {limits.max_members} are accepted",
            code="too_many_members",
        )
    files: list[UploadedFile] = []
    findings: list[Finding] = []
    seen: set[str] = set()
    total = 0
    for info in infos:
        name = info.filename
        base = posixpath.basename(name.rstrip("/"))
        if info.is_dir():
            continue
        if name.startswith(_IGNORED_PREFIXES) or base.startswith("._") or base in _IGNORED_NAMES:
            findings.append(Finding("info", "ignored_file", f"{name} was ignored",
                                    "nothing to do: system files are skipped", photo=name))
            continue
        if name.startswith("/") or "\\" in name or ".." in name.split("/") or ":" in name:
            raise InvalidInputError(f"the archive entry {name!r} has an unsafe path",
                                    code="unsafe_path")
        if stat.S_ISLNK(info.external_attr >> 16):
            raise InvalidInputError(f"the archive entry {name!r} is a symbolic link",
                                    code="symlink_in_archive")
        if info.flag_bits & 0x1:
            raise InvalidInputError(f"the archive entry {name!r} is encrypted",
                                    code="encrypted_member")
        folded = name.casefold()
        if folded in seen:
            raise InvalidInputError(f"the archive holds {name!r} twice", code="duplicate_member")
        seen.add(folded)
        blob = _read_member(archive, info, limits=limits, total_so_far=total)
        total += len(blob)
        files.append(UploadedFile(name=name, data=blob))
    return files, findings


def _read_member(
    archive: zipfile.ZipFile, info: zipfile.ZipInfo, *, limits: UploadLimits, total_so_far: int
) -> bytes:
    # The declared file_size is never trusted (CVE-2024-0450 is not fixed in this Python):
    # bytes are counted as they come out of the decompressor.
    out = bytearray()
    try:
        with archive.open(info) as fh:
            while chunk := fh.read(64 * 1024):
                out += chunk
                if len(out) > limits.max_member_bytes:
                    raise InvalidInputError(
                        f"{info.filename} decompresses to more than "
                        f"{limits.max_member_bytes // (1024 * 1024)} MB",
                        code="member_too_large",
                    )
                if total_so_far + len(out) > limits.max_total_bytes:
                    raise InvalidInputError(
                        "the archive decompresses to more than "
                        f"{limits.max_total_bytes // (1024 * 1024)} MB",
                        code="archive_too_large",
                    )
    except InvalidInputError:
        raise
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError,
            RuntimeError) as exc:
        raise InvalidInputError(
            f"the archive entry {info.filename!r} cannot be read", code="bad_archive",
            details=[str(exc)],
        ) from None
    return bytes(out)


def prepare_photo(upload: UploadedFile, *, limits: UploadLimits) -> PreparedPhoto | Finding:
    """Decode a photo by its content and re-encode it without any metadata, or say why not."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(upload.data), formats=IMAGE_FORMATS) as img:
                if img.width * img.height > limits.max_pixels:
                    return Finding("reject", "image_too_large",
                                   f"{upload.name} is {img.width}x{img.height} pixels",
                                   "use a photo of at most 40 megapixels", photo=upload.name)
                img.load()
                oriented = ImageOps.exif_transpose(img)
                rgb = _to_rgb(oriented)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return Finding("reject", "decompression_bomb", f"{upload.name} is not a safe image",
                       "upload the original photo from your phone", photo=upload.name)
    except Exception as exc:  # any decoder failure is a finding about this photo, never a 500
        logger.debug("cannot decode %s: %r", upload.name, exc)
        return Finding("reject", "unreadable_image",
                       f"{upload.name} is not a JPEG, PNG or WebP photo we can read",
                       "upload photos straight from your camera or phone", photo=upload.name)
    rgb.thumbnail((limits.stored_max_side, limits.stored_max_side), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    # No exif=, no icc_profile=, no comment: the stored photo carries no metadata at all.
    rgb.save(buf, format="JPEG", quality=95, optimize=True)
    data = buf.getvalue()
    return PreparedPhoto(name=upload.name, sha256=hashlib.sha256(data).hexdigest(), data=data,
                         width=rgb.width, height=rgb.height)


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img.copy()
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        return img.point(lambda v: v / 256).convert("L").convert("RGB")
    return img.convert("RGB")


def read_uploaded_files(
    files: list[tuple[str, bytes]], *, limits: UploadLimits
) -> tuple[list[UploadedFile], list[Finding]]:
    """Photos sent one by one (multipart ``files``). Zips inside are refused: send them to
    upload-zip."""
    if len(files) > limits.max_members:
        raise InvalidInputError(f"{len(files)} files sent; at most {limits.max_members} are "
                                "accepted", code="too_many_members")
    out: list[UploadedFile] = []
    seen: set[str] = set()
    for name, data in files:
        base = posixpath.basename(name.replace("\\", "/")) or "photo"
        if base.casefold() in seen:
            raise InvalidInputError(f"two files are named {base!r}", code="duplicate_member")
        seen.add(base.casefold())
        out.append(UploadedFile(name=base, data=data))
    return out, []


def read_folder(path: Path, *, limits: UploadLimits) -> list[UploadedFile]:
    """The regular files directly in ``path`` (hidden and system files skipped), size-capped."""
    files: list[UploadedFile] = []
    total = 0
    for entry in sorted(path.iterdir()):
        if not entry.is_file() or entry.is_symlink() or entry.name.startswith("."):
            continue
        if entry.name in _IGNORED_NAMES or entry.suffix.lower() in (".txt", ".md", ".json"):
            continue
        size = entry.stat().st_size
        if size > limits.max_member_bytes:
            raise InvalidInputError(f"{entry.name} is larger than "
                                    f"{limits.max_member_bytes // (1024 * 1024)} MB",
                                    code="member_too_large")
        total += size
        if total > limits.max_total_bytes:
            raise InvalidInputError("the folder holds too many bytes of photos",
                                    code="archive_too_large")
        files.append(UploadedFile(name=entry.name, data=entry.read_bytes()))
    if len(files) > limits.max_members:
        raise InvalidInputError(f"the folder holds {len(files)} files; at most "
                                f"{limits.max_members} are accepted", code="too_many_members")
    return files


def read_path(path: Path, *, limits: UploadLimits) -> tuple[list[UploadedFile], list[Finding]]:
    """A folder of photos or a zip of them."""
    if path.is_dir():
        return read_folder(path, limits=limits), []
    if path.is_file():
        return read_zip(path.read_bytes(), limits=limits)
    raise InvalidInputError(f"{path} is neither a folder nor a zip file", code="no_such_path")
