"""Finding a LoRA's weights in a trainer's output, whatever its shape.

Replicate's trainers have answered with a dict (``{"version", "weights"}``), a bare URL, a list of
URLs, URLs to a ``.tar``, a ``.zip`` or a direct ``.safetensors``, and the client wraps URLs in
``FileOutput`` objects. :func:`find_weights_url` accepts all of these and reports *how* it found the
weights (the contract asks for that method to be logged), and :func:`extract_safetensors` turns the
downloaded bytes into one validated ``.safetensors`` file without ever writing archive members to
disk under their own names.
"""

from __future__ import annotations

import bz2
import io
import json
import logging
import lzma
import posixpath
import re
import struct
import tarfile
import zipfile
import zlib
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import IO
from urllib.parse import urlsplit

from selfie_lora.errors import WeightsNotFoundError

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MAX_WEIGHTS_BYTES",
    "extract_safetensors",
    "find_weights_url",
    "is_safetensors",
]

# A rank-128 FLUX LoRA is about 1.2 GB; anything far above is not a LoRA (or is a bomb).
DEFAULT_MAX_WEIGHTS_BYTES = 2 * 1024**3
# Walking limits: the output is JSON from a remote service, so bound the work it can cause.
_MAX_DEPTH = 32
_MAX_NODES = 10_000
# A safetensors header is a JSON table of tensors; 100 MB would be millions of tensors.
_MAX_HEADER_BYTES = 100 * 1024 * 1024

_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".tar.zst")
# A key is weights-like when one of its words is one of these (``lora_weights``, ``lora``,
# ``weights_url``), or it holds ``trained_model``. Words, not substrings: ``base_model`` and
# ``vae_model`` name the model the LoRA was trained on, whose file is not the user's LoRA.
_WEIGHT_KEY_WORDS = frozenset({"weights", "weight", "lora", "safetensors"})
_WEIGHT_KEY_PHRASES = (("trained", "model"),)
# A key with one of these words names files written on the way (``lora_checkpoints``,
# ``step_500``, ``samples``, ``training_logs``), not the final LoRA. It ranks after every other
# key, even one that is weights-like by its other words: ``lora_checkpoints`` says "lora", and an
# intermediate step's ``.safetensors`` (which holds LoRA tensors and passes the check) would
# otherwise beat the final ``.tar`` under ``trained_model`` or ``lora`` on kind.
_INTERMEDIATE_KEY_WORDS = frozenset(
    {"checkpoint", "checkpoints", "ckpt", "ckpts", "step", "steps", "intermediate",
     "sample", "samples", "log", "logs"}
)

_USER_MESSAGE = (
    "The training finished, but no LoRA file was found in its output. "
    "Start the training again; if it keeps happening, contact support."
)


# --------------------------------------------------------------------------- finding the URL


@dataclass(frozen=True)
class _Candidate:
    url: str
    path: str  # where in the output it was found, e.g. "output.weights[0]"
    key: str  # the nearest dict key above it ("" at the root or in a top-level list)
    order: int  # walk order, to break ties deterministically


def _url_of(value: object) -> str | None:
    """The URL a value stands for: a string, or a ``FileOutput``-like object with ``.url``."""
    if isinstance(value, str):
        text = value.strip()
    else:
        url = getattr(value, "url", None)
        if not isinstance(url, str):
            return None
        text = url.strip()
    if text.startswith(("https://", "http://", "data:")):
        return text
    return None


def _kind(url: str) -> str | None:
    """``"safetensors"``, ``"tar"``, ``"zip"`` or None, from the URL's path (query ignored)."""
    if url.startswith("data:"):
        media = url[5:].split(",", 1)[0].lower()
        if "zip" in media:
            return "zip"
        if "tar" in media:
            return "tar"
        if "safetensors" in media:
            return "safetensors"
        return None
    path = urlsplit(url).path.lower()
    if path.endswith(".safetensors"):
        return "safetensors"
    if path.endswith(_TAR_SUFFIXES):
        return "tar"
    if path.endswith(".zip"):
        return "zip"
    return None


_KIND_RANK = {"safetensors": 0, "tar": 1, "zip": 2}


def _walk(output: object) -> list[_Candidate]:
    """Every URL in ``output``, breadth first, with the path that leads to it."""
    found: list[_Candidate] = []
    queue: deque[tuple[object, str, str, int]] = deque([(output, "output", "", 0)])
    seen = 0
    while queue:
        value, path, key, depth = queue.popleft()
        seen += 1
        if seen > _MAX_NODES:
            logger.warning("trainer output too large to search fully; stopped after %d nodes", seen)
            break
        url = _url_of(value)
        if url is not None:
            found.append(_Candidate(url=url, path=path, key=key, order=len(found)))
            continue
        if depth >= _MAX_DEPTH:
            continue
        if isinstance(value, Mapping):
            for k, v in value.items():
                queue.append((v, f"{path}.{k}", _snake(str(k)), depth + 1))
        elif isinstance(value, Sequence) and not isinstance(value, str | bytes | bytearray):
            for i, v in enumerate(value):
                queue.append((v, f"{path}[{i}]", key, depth + 1))
    return found


def _snake(key: str) -> str:
    """A key's words, lower case: ``loraWeights`` -> ``lora_weights``; ``LoRA`` stays one word
    (a new word starts at a capital followed by a small letter)."""
    return re.sub(r"([a-z0-9])([A-Z][a-z])", r"\1_\2", key).lower()


def _key_rank(key: str) -> int:
    """0 for the ``weights`` key itself, 1 for another weights-like key, 2 for any other, 3 for
    a key naming intermediate files (checkpoints, steps, samples, logs)."""
    if key == "weights":
        return 0
    words = tuple(w for w in re.split(r"[^a-z0-9]+", key) if w)
    if _INTERMEDIATE_KEY_WORDS.intersection(words):
        return 3
    if _WEIGHT_KEY_WORDS.intersection(words):
        return 1
    for phrase in _WEIGHT_KEY_PHRASES:
        n = len(phrase)
        if any(words[i : i + n] == phrase for i in range(len(words) - n + 1)):
            return 1
    return 2


def find_weights_url(output: object) -> tuple[str, str]:
    """Return ``(url, method)`` for the LoRA weights in a trainer's ``output``.

    ``method`` names where the URL was found (``"output.weights"``, ``"output[1]"``, ...) and what
    it points at, so the log says how the weights were found. The candidates are the URLs with a
    known kind (``.safetensors``, tar or zip) anywhere, and the URLs without one under a
    weights-like key; the one chosen is the first by, in this order:

    1. its key: the ``weights`` key itself, then another weights-like key (one whose words
       include ``weights``, ``lora`` or ``safetensors``, or ``trained_model``; ``base_model`` is
       not one), then any other key, then last a key naming intermediate files (one whose
       words include ``checkpoints``, ``steps``, ``intermediate``, ``samples`` or ``logs``:
       ``lora_checkpoints`` is not weights-like although it says ``lora``);
    2. its kind: ``.safetensors``, tar, zip, then a URL without a known extension;
    3. the order it was found in (breadth first).

    Else, when the output is a lone URL, that URL. Raises :class:`WeightsNotFoundError` when
    nothing fits. (The key wins over the kind: an output that also names, say, the base model's
    ``ae.safetensors`` or a ``samples.zip`` must not have that stored as the user's LoRA, and a
    ``lora_checkpoints`` list of intermediate files does not beat the final weights under any
    key.)
    """
    candidates = _walk(output)
    if not candidates:
        raise WeightsNotFoundError(
            f"no URL in the trainer output (type {type(output).__name__})",
            user_message=_USER_MESSAGE,
        )

    # One ranking for every candidate: a weights key without an extension (a signed URL whose
    # path ends in an opaque id) still beats a known kind under another key.
    def rank(c: _Candidate) -> tuple[int, int, int]:
        kind = _kind(c.url)
        return _key_rank(c.key), len(_KIND_RANK) if kind is None else _KIND_RANK[kind], c.order

    eligible = [c for c in candidates if _key_rank(c.key) < 2 or _kind(c.url) is not None]
    if eligible:
        best = min(eligible, key=rank)
        return best.url, f"{best.path} ({_kind(best.url) or 'unrecognised extension'})"
    # Some trainers answer with nothing but a signed URL whose path ends in an opaque id.
    if len(candidates) == 1 and candidates[0].key == "":
        return candidates[0].url, f"{candidates[0].path} (unrecognised extension)"
    raise WeightsNotFoundError(
        f"none of the {len(candidates)} URLs in the trainer output looks like LoRA weights: "
        + ", ".join(c.path for c in candidates[:10]),
        user_message=_USER_MESSAGE,
    )


# --------------------------------------------------------------------------- extracting


def is_safetensors(data: bytes) -> bool:
    """True when ``data`` is a well-formed safetensors file (header and offsets checked)."""
    try:
        _check_safetensors(data)
    except ValueError:
        return False
    return True


def _check_safetensors(data: bytes, *, lora: bool = False) -> int:
    """Validate the header and return the number of tensors; ValueError when malformed, or with
    ``lora`` when no tensor is named as a LoRA's are."""
    if len(data) < 8:
        raise ValueError("shorter than a safetensors header")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len < 2 or header_len > _MAX_HEADER_BYTES or 8 + header_len > len(data):
        raise ValueError("header length out of range")
    raw = data[8 : 8 + header_len]
    if not raw.lstrip().startswith(b"{"):
        raise ValueError("header is not a JSON object")
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    payload = len(data) - 8 - header_len
    tensors = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
            raise ValueError(f"tensor {name!r} lacks dtype, shape or data_offsets")
        offsets = info["data_offsets"]
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= payload
        ):
            raise ValueError(f"tensor {name!r} has offsets outside the file")
        tensors += 1
    if tensors == 0:
        raise ValueError("no tensors")
    # Every LoRA layout names its tensors so (diffusers/peft lora_A/lora_B, kohya lora_unet_*
    # with lora_down/lora_up, ai-toolkit the same): a base model's or a VAE's file listed in
    # the output beside the weights has none, and stored as a version it would be generated
    # with as if it were the user's LoRA.
    if lora and not any("lora" in name.lower() for name in header if name != "__metadata__"):
        raise ValueError("it holds no LoRA tensors (a base model's or another file?)")
    return tensors


def _read_capped(stream: IO[bytes], *, limit: int, what: str) -> bytes:
    """Read a member, counting decompressed bytes ourselves (headers can lie: CVE-2024-0450)."""
    chunks: list[bytes] = []
    total = 0
    while True:
        chunk = stream.read(1024 * 1024)
        if not chunk:
            break
        total += len(chunk)
        if total > limit:
            raise WeightsNotFoundError(
                f"{what} is larger than the {limit} byte cap", user_message=_USER_MESSAGE
            )
        chunks.append(chunk)
    return b"".join(chunks)


def _suspicious(name: str) -> bool:
    # Nothing is written under these names, but a traversal name in an output archive means the
    # archive is not what the trainer writes; skipping it keeps the choice honest.
    parts = name.replace("\\", "/").split("/")
    return name.startswith(("/", "\\")) or ".." in parts or bool(re.match(r"^[A-Za-z]:", name))


def _choose(names: Iterable[str]) -> tuple[str, str]:
    """Pick one ``.safetensors`` member: ``lora.safetensors`` first, then one without a step
    number (ai-toolkit's intermediate checkpoints are ``lora_000000500.safetensors``), else the
    last in name order (the highest step)."""
    pool = sorted(n for n in names if n.lower().endswith(".safetensors") and not _suspicious(n))
    if not pool:
        raise WeightsNotFoundError("no .safetensors member in the archive", user_message=_USER_MESSAGE)
    exact = [n for n in pool if posixpath.basename(n).lower() == "lora.safetensors"]
    if exact:
        # the shallowest one: the trainer's final file rather than a copy in a sub-folder
        return min(exact, key=lambda n: (n.count("/"), n)), "named lora.safetensors"
    if len(pool) == 1:
        return pool[0], "only .safetensors member"
    plain = [n for n in pool if not re.search(r"\d", posixpath.basename(n))]
    if len(plain) == 1:
        return plain[0], "only .safetensors member without a step number"
    return pool[-1], f"last of {len(pool)} .safetensors members"


def _from_tar(data: bytes, *, limit: int) -> tuple[bytes, str]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as archive:
        # Regular files only: symlinks, hard links and devices are never followed.
        members = {m.name: m for m in archive.getmembers() if m.isreg()}
        name, why = _choose(members)
        stream = archive.extractfile(members[name])
        if stream is None:  # pragma: no cover - isreg() members always have a stream
            raise WeightsNotFoundError(f"cannot read {name}", user_message=_USER_MESSAGE)
        with stream:
            return _read_capped(stream, limit=limit, what=name), f"tar member {name} ({why})"


def _from_zip(data: bytes, *, limit: int) -> tuple[bytes, str]:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        infos = {i.filename: i for i in archive.infolist() if not i.is_dir()}
        name, why = _choose(infos)
        info = infos[name]
        if info.flag_bits & 0x1:
            raise WeightsNotFoundError(f"{name} is encrypted", user_message=_USER_MESSAGE)
        with archive.open(info) as stream:
            return _read_capped(stream, limit=limit, what=name), f"zip member {name} ({why})"


def _decompress(data: bytes, *, limit: int) -> tuple[bytes, str] | None:
    """Undo a single-file gzip/bz2/xz wrapper (e.g. ``lora.safetensors.gz``), capped: the
    decompressors stop at ``limit + 1`` bytes, so a bomb costs no more than the cap."""
    decompressor: zlib._Decompress | bz2.BZ2Decompressor | lzma.LZMADecompressor
    if data.startswith(b"\x1f\x8b"):
        decompressor, wrapper = zlib.decompressobj(wbits=31), "gzip"
    elif data.startswith(b"BZh"):
        decompressor, wrapper = bz2.BZ2Decompressor(), "bz2"
    elif data.startswith(b"\xfd7zXZ\x00"):
        decompressor, wrapper = lzma.LZMADecompressor(), "xz"
    else:
        return None
    try:
        out = decompressor.decompress(data, limit + 1)
    except (zlib.error, OSError, lzma.LZMAError) as exc:
        raise WeightsNotFoundError(f"bad {wrapper} data: {exc}", user_message=_USER_MESSAGE) from exc
    if len(out) > limit:
        raise WeightsNotFoundError(
            f"{wrapper} content is larger than the {limit} byte cap", user_message=_USER_MESSAGE
        )
    return out, wrapper


def extract_safetensors(
    data: bytes, *, source_name: str, max_bytes: int = DEFAULT_MAX_WEIGHTS_BYTES
) -> tuple[bytes, str]:
    """Return ``(safetensors_bytes, detail)`` from a tar (any compression), a zip, a compressed
    single file or a direct ``.safetensors``. The format is read from the bytes, not from
    ``source_name`` (which only appears in messages). The result is always validated.
    """
    try:
        if is_safetensors(data):
            weights, detail = data, "direct safetensors"
        elif zipfile.is_zipfile(io.BytesIO(data)):
            weights, detail = _from_zip(data, limit=max_bytes)
        else:
            try:
                weights, detail = _from_tar(data, limit=max_bytes)
            except tarfile.TarError:
                unwrapped = _decompress(data, limit=max_bytes)
                if unwrapped is None:
                    raise WeightsNotFoundError(
                        f"{source_name} is neither a safetensors file nor an archive",
                        user_message=_USER_MESSAGE,
                    ) from None
                weights, wrapper = unwrapped
                detail = f"{wrapper}-compressed safetensors"
    except WeightsNotFoundError:
        raise
    except (OSError, EOFError, zipfile.BadZipFile, lzma.LZMAError, ValueError) as exc:
        raise WeightsNotFoundError(f"cannot read {source_name}: {exc}", user_message=_USER_MESSAGE) from exc
    try:
        _check_safetensors(weights, lora=True)
    except ValueError as exc:
        raise WeightsNotFoundError(
            f"{detail} in {source_name} is not a LoRA safetensors file: {exc}",
            user_message=_USER_MESSAGE,
        ) from exc
    return weights, detail
