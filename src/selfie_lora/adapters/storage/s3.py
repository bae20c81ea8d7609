"""A ``BlobStore`` on S3-compatible object storage (AWS S3, Cloudflare R2, Backblaze B2, Ceph,
Garage, MinIO...), through obstore.

Why obstore rather than boto3: it streams a file or an iterator into a multipart upload itself
(concurrent parts, aborted on failure), offers conditional puts (``mode="create"``, HTTP
``If-None-Match: *``) and presigned URLs, and is one small wheel (Rust's ``object_store``) that is
thread-safe with no session juggling; boto3 needs botocore's ~100 MB and hand-written multipart
code for the same.

Writes are atomic on S3 (an object appears whole or not at all). ``if_absent`` puts of small
blobs are conditional requests, so two writers cannot both win. A large blob is streamed in
multipart after a look (a GET): S3's multipart upload has no "create only" mode everywhere, and
the large blobs we write (weights, zips) are content-addressed, so a racing second writer can
only write the same bytes again.

An ``if_absent`` put that finds its blob makes it fresh (the garbage collector spares young
blobs). S3 refuses to copy an object onto itself unchanged, so the blob's own bytes are read
back and put again (streamed in parts when large): rare (a photo uploaded again, weights
identical to stored ones), and never a rewrite with other bytes.
"""

from __future__ import annotations

import hashlib
import hmac
import html
import logging
import os
import re
import tempfile
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, closing
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Literal
from urllib.parse import parse_qsl, quote, urlsplit, urlunsplit

from selfie_lora.adapters.storage.cache import TMP_PREFIX, BlobCache
from selfie_lora.adapters.storage.fs import check_key
from selfie_lora.domain.disposition import content_disposition
from selfie_lora.domain.storage_url import parse_storage_url
from selfie_lora.errors import (
    BlobMissingError,
    BlobStoreUnreachableError,
    ConfigError,
    StorageError,
    StorageSettingsError,
    describe,
)
from selfie_lora.services.layout import is_valid_key
from selfie_lora.services.ports import BlobInfo, BlobStream

if TYPE_CHECKING:
    from obstore import GetOptions
    from obstore.store import S3Config, S3Store

logger = logging.getLogger(__name__)

# Blobs up to this size are sent in one (conditional) PUT; larger ones stream in parts of
# PART_SIZE, a few at a time, so a 5 GB file needs MAX_PARTS_IN_FLIGHT x PART_SIZE of memory.
MULTIPART_THRESHOLD = 8 * 1024 * 1024
PART_SIZE = 8 * 1024 * 1024
MAX_PARTS_IN_FLIGHT = 4
READ_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str

    @classmethod
    def parse(cls, url: str) -> S3Location:
        try:
            bucket, prefix = parse_storage_url(url)
        except ValueError as exc:
            # Never the URL itself: it may hold a key (s3://KEY:SECRET@bucket).
            raise ConfigError(f"SELFIE_LORA_STORAGE_URL: {exc}") from None
        return cls(bucket=bucket, prefix=prefix)


# What S3 says went wrong is in the error's XML body, which obstore puts after the status line:
# AWS, MinIO and moto all start that body with an XML declaration and a newline, so the first
# line alone ("403 Forbidden: <?xml ...?>") never held it.
_STATUS = re.compile(r"status code: (\d{3})")
_CODE = re.compile(r"<Code>\s*([^<]*?)\s*</Code>")
_MESSAGE = re.compile(r"<Message>\s*([^<]*?)\s*</Message>", re.DOTALL)
_RETRIES = re.compile(r"after (\d+) retr(?:y|ies)")
# What an operator does about the codes that are theirs to fix.
_HINTS = {
    "InvalidAccessKeyId": "check AWS_ACCESS_KEY_ID or SELFIE_LORA_STORAGE_ACCESS_KEY_ID",
    "SignatureDoesNotMatch": ("check AWS_SECRET_ACCESS_KEY or "
                              "SELFIE_LORA_STORAGE_SECRET_ACCESS_KEY (and the region)"),
    "AccessDenied": "the keys may not do this in this bucket",
    "RequestTimeTooSkewed": "this machine's clock is off",
    "SlowDown": "throttled: the storage asks for fewer requests",
    "NoSuchBucket": "create it, or set SELFIE_LORA_STORAGE_URL to the bucket meant",
}
_MAX_MESSAGE = 300


def s3_reason(exc: BaseException) -> str:
    """What S3 answered, in one line: ``403 InvalidAccessKeyId: <its message> (hint)``; the
    error's first line (``describe``) when its text holds no S3 error code."""
    text = str(exc)
    code = _CODE.search(text)
    if code is None:
        return describe(exc)
    status = _STATUS.search(text)
    message = _MESSAGE.search(text)
    retries = _RETRIES.search(text)
    said = " ".join(html.unescape(message[1]).split())[:_MAX_MESSAGE] if message else ""
    reason = " ".join(part for part in (status[1] if status else "", code[1]) if part)
    if said:
        reason = f"{reason}: {said}"
    if (hint := _HINTS.get(code[1])) is not None:
        reason = f"{reason} ({hint})"
    if retries is not None:
        reason = f"{reason} (after {retries[1]} retries)"
    return reason


def _no_such_bucket(exc: BaseException) -> bool:
    code = _CODE.search(str(exc))
    return code is not None and code[1] == "NoSuchBucket"


# The statuses of a store that is away for now (a 5xx but 501, which says it will never do what
# was asked; 429, throttled: SlowDown as many S3-compatible stores send it), and those of
# settings to fix (301: the wrong region; 501: a store without conditional puts).
_OUTAGE_STATUSES = frozenset({429, 500, 502, 503, 504})
_SETTINGS_STATUSES = frozenset({301, 501})
# With no status: the network failures that pass (refused, reset, closed, timed out). Not "dns
# error" (a host that does not resolve), a TLS failure (https against http), a redirect (the
# wrong region) nor an answer that is not S3's: settings to fix, which no wait mends. A text
# with words of both is neither (a plain ``StorageError``, counted).
_PASSING = re.compile(r"ConnectionRefused|ConnectionReset|ConnectionAborted|BrokenPipe|"
                      r"UnexpectedEof|TimedOut|kind: Timeout|kind: Interrupted|timed out|"
                      r"connection closed|IncompleteMessage")
_SETTINGS = re.compile(r"dns error|InvalidContentType|InvalidCertificate|certificate|"
                       r"BareRedirect|incorrectly configured region|MissingEtag|"
                       r"Unable to extract metadata")
# libc's EAI_AGAIN: the resolver is away for a moment, a "dns error" that passes.
_RESOLVER_AWAY = "Temporary failure in name resolution"


def _fault(exc: BaseException) -> Literal["outage", "settings"] | None:
    """What ``exc`` says of the storage: ``"outage"``, it is away for now (no answer: refused,
    reset, timed out, its resolver away; a 500, 502, 503 or 504; a 429, throttled);
    ``"settings"``, they are wrong (SELFIE_LORA_STORAGE_ENDPOINT's host does not resolve, its
    scheme is not the server's, AWS_REGION is not the bucket's, the endpoint is not S3, a store
    without conditional puts: a ``config_error``, never waited out); None, it refused the
    request (403 keys, 404, 400) or said nothing we know. obstore says all of them as a
    ``GenericError``."""
    from obstore.exceptions import GenericError

    if type(exc) is not GenericError:  # NotFound, PermissionDenied, Unauthenticated, ...
        return None
    text = str(exc)
    status = _STATUS.search(text)
    if status is not None:
        code = int(status[1])
        return ("outage" if code in _OUTAGE_STATUSES
                else "settings" if code in _SETTINGS_STATUSES else None)
    if _RESOLVER_AWAY in text:
        return "outage"
    passing = _PASSING.search(text) is not None
    settings = _SETTINGS.search(text) is not None
    if passing == settings:  # neither, or words of both
        return None
    return "outage" if passing else "settings"


def _modified(value: object) -> datetime:
    # A store that sends no date: taken as now, which keeps the blob from being collected.
    return value.astimezone(UTC) if isinstance(value, datetime) else datetime.now(UTC)


# How obstore names a key it cannot take as a path (object_store's EmptySegment and BadSegment).
_INVALID_PATH = re.compile(r'Path "(?P<path>.*?)"(?: contained empty path segment|: )', re.DOTALL)


def _resume_after(key: str) -> str | None:
    """Where a listing goes on after ``key``, which obstore cannot take as a path: the smallest
    key it can take that comes after every key sharing ``key``'s first bad part (an empty
    segment, a ``.`` or ``..`` segment, an ASCII control character). None when ``key`` shows
    none of them."""
    start = 0
    for segment in key.split("/"):
        end = start + len(segment)
        if segment in ("", ".", ".."):
            # Every key going on with "/" here is bad alike; "0" is the character after "/".
            return f"{key[:end]}0"
        for i, char in enumerate(segment):
            if char.isascii() and not char.isprintable():
                # Control characters (0x00-0x1f, 0x7f): the next that is not one.
                return f"{key[:start + i]}{' ' if char < ' ' else chr(0x80)}"
        start = end + 1
    return None


class S3BlobStore:
    def __init__(
        self, *, url: str, cache_dir: Path, endpoint: str | None = None,
        region: str | None = None, access_key_id: str | None = None,
        secret_access_key: str | None = None, allow_http: bool | None = None,
        cache_max_bytes: int = 20 * 10**9, connect_timeout: float = 5.0,
        timeout: float = 30.0, retry_timeout: float = 15.0, max_retries: int = 3,
        name_downloads: bool = True,
    ) -> None:
        try:
            from obstore.store import S3Store
        except ImportError:  # pragma: no cover - depends on the install
            raise ConfigError("S3 storage needs obstore: pip install 'selfie-lora[s3]'") from None
        self.location = S3Location.parse(url)
        config: S3Config = {}
        if endpoint:
            config["endpoint"] = endpoint
        if region:
            config["region"] = region
        if access_key_id:
            config["access_key_id"] = access_key_id
        if secret_access_key:
            config["secret_access_key"] = secret_access_key
        # For a presigned download's file name (``download_url``): the secret obstore signs
        # with, where it is a static one (its setting, else the environment's, as obstore reads
        # it); obstore keeps it to itself.
        self._signing_secret = secret_access_key or os.environ.get("AWS_SECRET_ACCESS_KEY")
        # Whether the WARNING of an unnamed download was said: read and set under the lock, as
        # two downloads at once (request threads) could both find it unset and both warn.
        self._said_unnamed = False
        self._said_lock = threading.Lock()
        # Off (SELFIE_LORA_DOWNLOAD_URL_NAMES=false) for a storage that refuses the parameter.
        self._name_downloads = name_downloads
        if allow_http is None:
            allow_http = bool(endpoint and endpoint.startswith("http://"))
        self._store: S3Store = S3Store(
            self.location.bucket, prefix=self.location.prefix or None, config=config,
            client_options={"allow_http": allow_http,
                            "connect_timeout": timedelta(seconds=connect_timeout),
                            "timeout": timedelta(seconds=timeout)},
            # Bounded: obstore's defaults retry for up to 3 minutes, a thread held that long
            # per call on an endpoint that accepts connections and never answers.
            retry_config={"max_retries": max_retries,
                          "retry_timeout": timedelta(seconds=retry_timeout)},
        )
        self.cache_dir = cache_dir
        self._bucket_seen = False  # a LIST has answered: a HEAD's 404 is a missing blob
        self._cache = BlobCache(cache_dir, max_bytes=cache_max_bytes)
        self.description = f"s3://{self.location.bucket}/{self.location.prefix}"

    # -- writes

    def put(self, key: str, data: bytes, *, if_absent: bool = False) -> bool:
        import obstore
        from obstore.exceptions import AlreadyExistsError

        check_key(key)
        try:
            obstore.put(self._store, key, data, mode="create" if if_absent else "overwrite",
                        use_multipart=False)
        except AlreadyExistsError:
            if self._refresh(key):
                return False
            return self.put(key, data, if_absent=True)  # deleted since: written again
        except Exception as exc:
            raise self._error("write", key, exc) from exc
        return True

    def put_file(self, key: str, path: Path, *, if_absent: bool = False) -> bool:
        import obstore

        check_key(key)
        size = path.stat().st_size
        if size <= MULTIPART_THRESHOLD:
            return self.put(key, path.read_bytes(), if_absent=if_absent)
        if if_absent and self._refresh(key):
            return False
        try:
            # obstore reads the file part by part: never the whole file in memory.
            obstore.put(self._store, key, path, use_multipart=True, chunk_size=PART_SIZE,
                        max_concurrency=MAX_PARTS_IN_FLIGHT)
        except Exception as exc:
            raise self._error("write", key, exc) from exc
        return True

    def _refresh(self, key: str) -> bool:
        """Put the blob again with its own bytes, which makes it fresh; False when there is
        none."""
        import obstore

        try:
            result = obstore.get(self._store, key)
        except FileNotFoundError as exc:
            if _no_such_bucket(exc):
                raise self._no_bucket() from None
            return False
        except Exception as exc:
            raise self._error("read", key, exc) from exc
        try:
            if int(result.meta["size"]) <= MULTIPART_THRESHOLD:
                obstore.put(self._store, key, result.bytes().to_bytes(), use_multipart=False)
            else:
                # Through a file, never whole in memory (obstore cannot put from one of its own
                # streams: both would need its runtime). Named as the cache's fetches are, so
                # one a crash leaves is removed like theirs.
                self.cache_dir.mkdir(parents=True, exist_ok=True)
                fd, name = tempfile.mkstemp(dir=self.cache_dir, prefix=f"{TMP_PREFIX}refresh-")
                try:
                    with os.fdopen(fd, "wb") as fh:
                        for chunk in result.stream(min_chunk_size=READ_CHUNK):
                            fh.write(chunk)
                    obstore.put(self._store, key, Path(name), use_multipart=True,
                                chunk_size=PART_SIZE, max_concurrency=MAX_PARTS_IN_FLIGHT)
                finally:
                    Path(name).unlink(missing_ok=True)
        except Exception as exc:
            raise self._error("make fresh", key, exc) from exc
        return True

    def delete(self, key: str) -> None:
        import obstore

        check_key(key)
        try:
            obstore.delete(self._store, key)
        except FileNotFoundError as exc:
            if _no_such_bucket(exc):
                raise self._no_bucket() from None
        except Exception as exc:
            raise self._error("delete", key, exc) from exc
        # A deleted blob (a user's erasure) keeps no copy on this machine either.
        self._cache.drop(key)

    def forget_deleted_local_copies(self) -> int:
        # A file there under a key we never write is not ours to judge: eviction's.
        return self._cache.drop_missing(
            lambda key: not is_valid_key(key) or self._info(key) is not None)

    def remove_leftovers(self) -> int:
        # A multipart upload killed midway leaves its parts, billed and invisible to listings.
        # obstore can neither list nor abort other processes' uploads: the bucket's lifecycle
        # rule (AbortIncompleteMultipartUpload, README "Garbage collection") removes them.
        return 0

    # -- reads

    def get(self, key: str) -> bytes:
        import obstore

        check_key(key)
        try:
            return obstore.get(self._store, key).bytes().to_bytes()
        except FileNotFoundError as exc:
            raise self._not_found(key, exc) from None
        except Exception as exc:
            raise self._error("read", key, exc) from exc

    def open(self, key: str, *, start: int = 0, end: int | None = None) -> BlobStream:
        import obstore

        check_key(key)
        options: GetOptions = {}
        if end is not None:
            # A ranged GET: only these bytes leave the bucket (a resumed download of a large
            # LoRA pulled the whole file to drop all but its end).
            options["range"] = (start, end)
        elif start:
            options["range"] = {"offset": start}
        try:
            result = obstore.get(self._store, key, options=options)
        except FileNotFoundError as exc:
            raise self._not_found(key, exc) from None
        except Exception as exc:
            raise self._error("read", key, exc) from exc

        def chunks() -> Iterator[bytes]:
            try:
                for chunk in result.stream(min_chunk_size=READ_CHUNK):
                    yield bytes(chunk)
            except Exception as exc:
                raise self._error("read", key, exc) from exc

        return BlobStream(size=int(result.meta["size"]), chunks=chunks())

    def _not_found(self, key: str, exc: FileNotFoundError) -> StorageError:
        # S3 answers 404 to a GET of a bucket that is not there too: that is the settings'
        # fault, not a blob gone, and a training must not be failed as if its photos were
        # (a HEAD's 404 has no body to tell them apart, so exists() cannot).
        if _no_such_bucket(exc):
            return self._no_bucket()
        return BlobMissingError(f"blob {key!r} is missing")

    def _confirm_bucket(self) -> None:
        """Raises the settings' error when the bucket does not exist (one LIST of one key, on
        the first 404 of a HEAD only: a bucket seen once is taken to stay)."""
        import obstore
        from obstore.exceptions import InvalidPathError

        if self._bucket_seen:
            return
        try:
            next(iter(obstore.list(self._store, chunk_size=1)), None)
        except InvalidPathError:
            pass  # a key obstore cannot name (``list``): the bucket answered all the same
        except Exception as exc:
            raise self._error("list", self.description, exc) from exc
        self._bucket_seen = True

    def _error(self, action: str, key: str, exc: Exception) -> StorageError:
        # Vendor errors stop here: the services see StorageError only. A missing bucket is said
        # as the settings' fault whatever the call (a put's 404 read as a missing object).
        if _no_such_bucket(exc):
            return self._no_bucket()
        said = f"object storage could not {action} {key!r}: {s3_reason(exc)}"
        fault = _fault(exc)
        if fault == "settings":
            return StorageSettingsError(
                f"{said} (check SELFIE_LORA_STORAGE_ENDPOINT, its http/https, AWS_REGION, and "
                "that the endpoint is S3 with conditional puts)")
        if fault == "outage":
            return BlobStoreUnreachableError(said)
        return StorageError(said)

    def _no_bucket(self) -> StorageError:
        # What to do either way: "check the setting" alone left an operator who had set it
        # right (a new deployment, the bucket never made) looking for a typo.
        return StorageSettingsError(f"object storage has no bucket {self.location.bucket!r}: create it, "
                            "or set SELFIE_LORA_STORAGE_URL to the bucket meant")

    def exists(self, key: str) -> bool:
        check_key(key)
        return self._info(key) is not None

    def modified(self, key: str) -> datetime | None:
        check_key(key)
        info = self._info(key)
        return info.modified if info is not None else None

    def list(self, prefix: str) -> Iterator[BlobInfo]:
        """Every blob under ``prefix``, and as well every key there that obstore cannot name
        (``photos//x.jpg``, put by another tool): yielded with that key, which no store takes,
        so the collector keeps it and names it in a note (``services.gc._refused``).

        obstore refuses a whole listing page (up to 1000 keys) for one such key, and the
        listing ends there: the page is listed again from just past the keys that share its
        bad part (S3's StartAfter). The keys before it in that page are not listed while it
        is there, which keeps them: the note asks for it to go."""
        import obstore
        from obstore.exceptions import InvalidPathError

        check_key(prefix)
        offset: str | None = None
        while True:
            refused: InvalidPathError | None = None
            try:
                for batch in obstore.list(self._store, prefix=f"{prefix}/", offset=offset):
                    for meta in batch:
                        yield BlobInfo(key=meta["path"], size=int(meta["size"]),
                                       modified=_modified(meta["last_modified"]))
            except InvalidPathError as exc:
                refused = exc
            except Exception as exc:
                raise self._error("list", prefix, exc) from exc
            if refused is None:
                return
            foreign = self._unnamed_key(refused)
            resume = _resume_after(foreign) if foreign is not None else None
            if foreign is None or resume is None or (offset is not None and resume <= offset):
                raise self._error("list", prefix, refused) from refused
            # Never deleted whatever its date: its key is one no store takes.
            yield BlobInfo(key=foreign, size=0, modified=datetime.now(UTC))
            # StartAfter skips the resume key itself: a blob of that very name is looked up.
            if (found := self._info(resume)) is not None:
                yield found
            offset = resume

    def _unnamed_key(self, exc: Exception) -> str | None:
        """The key (below this store's prefix) that obstore's error names, None when its words
        do not say (another release of obstore)."""
        match = _INVALID_PATH.search(str(exc))
        if match is None:
            return None
        path = match["path"]
        if self.location.prefix:
            if not path.startswith(f"{self.location.prefix}/"):
                return None
            path = path.removeprefix(f"{self.location.prefix}/")
        return path

    def _info(self, key: str) -> BlobInfo | None:
        """The blob's size and date (one HEAD); None when there is none. The key is not checked
        here: the listing looks up the key it resumes after, which need not be one we write."""
        import obstore

        try:
            meta = obstore.head(self._store, key)
        except FileNotFoundError:
            # A HEAD's 404 has no body: a bucket that is not there answers it too, which
            # would read as every blob gone (a version refused as 'weights missing').
            self._confirm_bucket()
            return None
        except Exception as exc:
            raise self._error("look up", key, exc) from exc
        return BlobInfo(key=key, size=int(meta["size"]), modified=_modified(meta["last_modified"]))

    def local_copy(self, key: str) -> AbstractContextManager[Path]:
        """A copy in the cache folder, fetched once (the blobs asked for never change) and held
        while the context lasts; the folder keeps the most recently used copies within its
        bound (``storage.cache``)."""
        check_key(key)

        def fetch(fh: BinaryIO) -> None:
            written = 0
            # Closed however the copy ends: a write to a full disk would otherwise hold the
            # response body open for as long as the error's traceback keeps the stream alive.
            with closing(self.open(key)) as stream:
                for chunk in stream.chunks:
                    fh.write(chunk)
                    written += len(chunk)
            # A stream cut short without an error would otherwise become a copy served for ever.
            if written != stream.size:
                raise StorageError(f"object storage sent {written} bytes of {key!r}, which "
                                   f"holds {stream.size}")

        return self._cache.copy(key, fetch)

    def forget_local_copy(self, key: str) -> bool:
        check_key(key)
        return self._cache.forget(key)

    def download_url(self, key: str, *, expires: timedelta,
                     filename: str | None = None) -> str | None:
        import obstore

        check_key(key)
        try:
            url = obstore.sign(self._store, "GET", key, expires)
        except Exception as exc:
            raise self._error("sign a URL for", key, exc) from exc
        if filename is None or not self._name_downloads:
            return url
        # The storage's answer names the file (``response-content-disposition``, which S3 and
        # its kin answer with as Content-Disposition): a browser saved it under the object's
        # own name (``<sha256>.safetensors``), not the one the API's 307 said. obstore signs no
        # query of ours, so the URL is signed again with it, by the same secret.
        named = _signed_with(url, {"response-content-disposition":
                                   content_disposition(filename)},
                             secret=self._signing_secret)
        if isinstance(named, _Unsigned):
            with self._said_lock:
                first = not self._said_unnamed
                self._said_unnamed = True
            if first:
                logger.warning("presigned downloads are saved under the stored object's name, "
                               "not the version's: %s", named.why)
            return url
        return named

    def check(self) -> None:
        import obstore

        try:
            # One page of one key: answers only when the endpoint, the credentials and the
            # bucket are all right.
            next(iter(obstore.list(self._store, chunk_size=1)), None)
        except Exception as exc:
            raise self._error("list", self.description, exc) from exc


@dataclass(frozen=True)
class _Unsigned:
    """Why a presigned URL was not signed again (said once, in a WARNING): the keys and the
    URL's form are told apart, as each sends an operator to look at another thing."""

    why: str


def _unread(what: str) -> _Unsigned:
    return _Unsigned(f"obstore's presigned URL is not in the form this process signs again "
                     f"({what}; another obstore release, say)")


def _signed_with(url: str, extra: dict[str, str], *, secret: str | None) -> str | _Unsigned:
    """``url``, a GET presigned by obstore (AWS Signature V4 in the query), with the query
    parameters ``extra`` added and signed again by ``secret``; else why not (``_Unsigned``):
    no secret given, a URL this does not read, or ``secret`` not the one the URL was signed
    with (the signature does not come out the same), as a URL with a wrong signature would be
    refused by the storage."""
    if not secret:
        return _Unsigned("no secret key is known to this process (the storage's credentials "
                         "an instance role's, say), so obstore's URL cannot be signed again")
    parts = urlsplit(url)
    params = parse_qsl(parts.query, keep_blank_values=True)
    given = [value for name, value in params if name == "X-Amz-Signature"]
    kept = [(name, value) for name, value in params if name != "X-Amz-Signature"]
    fields = dict(kept)
    if len(given) != 1:
        return _unread(f"{len(given)} X-Amz-Signature")
    for name, value in (("X-Amz-Algorithm", "AWS4-HMAC-SHA256"), ("X-Amz-SignedHeaders", "host")):
        if fields.get(name) != value:
            return _unread(f"{name} {fields.get(name)!r}, not {value!r}")
    try:
        # The scope is the credential's last four parts: the key id before it may hold a '/'
        # (MinIO takes free-form access keys).
        _key_id, day, region, service, end = fields["X-Amz-Credential"].rsplit("/", 4)
        stamp = fields["X-Amz-Date"]
    except KeyError as exc:
        return _unread(f"no {exc.args[0]}")
    except ValueError:
        return _unread("an X-Amz-Credential without its scope")
    scope = f"{day}/{region}/{service}/{end}"

    def signature(query: str) -> str:
        # The canonical request as object_store builds it: the path as it is in the URL (S3
        # encodes it once), the query sorted and encoded, the host alone signed, no payload.
        request = "\n".join(("GET", parts.path or "/", query, f"host:{parts.netloc}\n",
                             "host", "UNSIGNED-PAYLOAD"))
        to_sign = "\n".join(("AWS4-HMAC-SHA256", stamp, scope,
                             hashlib.sha256(request.encode()).hexdigest()))
        key = f"AWS4{secret}".encode()
        for part in (day, region, service, "aws4_request"):
            key = hmac.new(key, part.encode(), hashlib.sha256).digest()
        return hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()

    if not hmac.compare_digest(signature(_canonical_query(kept)), given[0]):
        return _Unsigned(
            "the secret key this process knows (SELFIE_LORA_STORAGE_SECRET_ACCESS_KEY, else "
            "AWS_SECRET_ACCESS_KEY) does not reproduce obstore's signature: obstore signs with "
            "other credentials (an instance role's, say), or its URLs changed form")
    query = _canonical_query([*kept, *extra.items()])
    return urlunsplit(parts._replace(query=f"{query}&X-Amz-Signature={signature(query)}"))


def _canonical_query(params: list[tuple[str, str]]) -> str:
    """Signature V4's canonical query: each name and value encoded (all but ``A-Za-z0-9-_.~``),
    sorted by name, then value."""
    encoded = sorted((quote(name, safe="~"), quote(value, safe="~")) for name, value in params)
    return "&".join(f"{name}={value}" for name, value in encoded)
