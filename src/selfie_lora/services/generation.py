"""Generating pictures with a user's LoRA version at the model's (or the request's) scale."""

from __future__ import annotations

import hashlib
import logging
import math
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from selfie_lora.domain.entities import (
    Generation,
    GenerationPosition,
    Model,
    TrainingStatus,
    User,
    Version,
    names_no_row,
)
from selfie_lora.domain.plan import (
    check_version_fits_base_model,
    ensure_trigger_word,
    validate_lora_scale,
)
from selfie_lora.domain.text import bidi_control_in, character_name
from selfie_lora.domain.versions import find_version, no_such_version
from selfie_lora.errors import (
    NO_MODEL,
    BlobMissingError,
    ClientGoneError,
    ConflictError,
    ErrorCode,
    GenerationError,
    InvalidInputError,
    NoModelError,
    NotFoundError,
    RateLimitedError,
    SelfieLoraError,
    StorageError,
    WeightsDamagedError,
)
from selfie_lora.services.common import PAGE_MAX, PerUserSlots, new_id, page_limit, utcnow
from selfie_lora.services.layout import generation_image_key
from selfie_lora.services.ports import (
    MAX_SEED,
    BlobStore,
    GenerationJob,
    Generator,
    LoraHold,
    Repository,
    Telemetry,
    image_seed,
)
from selfie_lora.services.telemetry import NullTelemetry

logger = logging.getLogger(__name__)

# A backend as a user knows it, in the sentence of a server that cannot generate with it.
_BACKEND_NAMES = {"replicate": "Replicate"}

MAX_OUTPUTS = 4
# SELFIE_LORA_MAX_GENERATIONS_PER_USER and SELFIE_LORA_GENERATION_THREADS (config).
DEFAULT_MAX_PER_USER = 2
DEFAULT_THREADS = 8
# Retry-After of a refused generation before any has ended here, and the most it says.
_FIRST_RETRY_AFTER = 10
_MAX_RETRY_AFTER = 300
MAX_PROMPT_CHARS = 2000


@dataclass(frozen=True)
class NotReady:
    """Why a user cannot generate. ``reason``: ``"no_model"``, ``"activate"`` (versions, none
    active), ``"wait"`` (none yet, a training queued or running: ``training``) or ``"train"``
    (none, and nothing training). ``message`` is the API's words (API paths, the command that
    trains); each other front end words ``reason`` itself, as for ``ErasureBlockedError``:
    the Generate page showed 'POST /api/model/versions/{id}/activate' to web users, and the
    CLI names its own 'activate' command (``NoVersionError``)."""

    reason: Literal["no_model", "activate", "wait", "train"]
    training: Literal["queued", "running"] | None
    message: str


class NoVersionError(InvalidInputError):
    """``generate`` refused: the user's model has no active version (422 ``no_version``). The
    message is the API's words (``NotReady.message``); ``not_ready`` and ``user`` (the account's
    name) are the facts, so that a front end with commands of its own words it in them, as for
    ``NoModelError``: the CLI names 'selfie-lora activate', where the API names its route."""

    def __init__(self, not_ready: NotReady, *, user: str) -> None:
        super().__init__(not_ready.message, code=ErrorCode.NO_VERSION)
        self.not_ready = not_ready
        self.user = user


# Control characters but tab and line ends (a prompt typed in a text area has those): a NUL
# cannot be stored on PostgreSQL, and none of them means anything to the text encoder.
_PROMPT_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


# A whole number as the text fronts (the Generate form, the CLI) take it, by the API's rules for
# its JSON numbers: ASCII digits only. Python's int() also took "1_0" (10), "+5" and other
# scripts' digits ("٣"), and the CLI's option parser "1.0", so each front took its own set.
_WHOLE_NUMBER = re.compile(r"[0-9]+")
# More digits than any bound here has, however many leading zeros: too large, said as the
# service says it, before int() is asked (it refuses more than 4300 digits).
_MOST_DIGITS = 20


def _whole_number(text: str | None, *, name: str, code: ErrorCode, low: int,
                  high: int) -> int | None:
    if text is None or not text.strip():
        return None
    digits = text.strip()
    if not _WHOLE_NUMBER.fullmatch(digits):
        raise InvalidInputError(f"{name} must be a whole number {low} to {high}, written with "
                                f"the digits 0-9 only (not {text[:40]!r})", code=code)
    # Read without the zeros in front: they count towards int()'s limit too ("0" * 5000 + "7"
    # was a ValueError, a 500, where "007" is 7).
    significant = digits.lstrip("0") or "0"
    if len(significant) > _MOST_DIGITS:
        raise InvalidInputError(f"{name} must be {low} to {high}", code=code)
    return int(significant)


# The request field each refusal of its values is about: a form marks that field, its
# message beside it (the Generate page), rather than a page of its own.
_FIELD_AT_FAULT = {ErrorCode.EMPTY_PROMPT: "prompt", ErrorCode.PROMPT_TOO_LONG: "prompt",
                   ErrorCode.INVALID_PROMPT: "prompt", ErrorCode.INVALID_SEED: "seed",
                   ErrorCode.INVALID_NUM_OUTPUTS: "num_outputs"}


def field_at_fault(error: InvalidInputError) -> str | None:
    """The field (``prompt``, ``seed``, ``num_outputs``) a refused generation's ``error`` is
    about; None for another refusal (a version, ...)."""
    return _FIELD_AT_FAULT.get(error.code)


def seed_from_text(text: str | None) -> int | None:
    """The seed a text front was given (None: empty, a seed is drawn), by the API's rules; one
    out of range is refused by ``generate`` with the API's words."""
    return _whole_number(text, name="the seed", code=ErrorCode.INVALID_SEED, low=0,
                         high=MAX_SEED)


# What the text fronts call num_outputs: the Generate page's "Pictures", the CLI's -n. The API
# keeps its JSON field's name; "num_outputs must be 1 to 4" named nothing these users typed.
_NUMBER_OF_PICTURES = "the number of pictures"


def num_outputs_from_text(text: str | None) -> int:
    """The number of pictures a text front was given (empty: 1, ``GenerationRequest``'s and the
    API's default), as ``seed_from_text`` reads a seed; one out of range is refused here, in
    the fronts' words, not later by ``generate`` in the API's."""
    count = _whole_number(text, name=_NUMBER_OF_PICTURES, code=ErrorCode.INVALID_NUM_OUTPUTS,
                          low=1, high=MAX_OUTPUTS)
    if count is None:
        return 1
    if not 1 <= count <= MAX_OUTPUTS:
        raise InvalidInputError(f"{_NUMBER_OF_PICTURES} must be 1 to {MAX_OUTPUTS}",
                                code=ErrorCode.INVALID_NUM_OUTPUTS)
    return count


def generates_from_stored_weights(backend: str) -> bool:
    """Whether ``backend``'s generator loads a version's stored weights file (the local one);
    Replicate's generates with the version it published, whatever the storage holds."""
    return backend == "local"


def weights_missing_error(version: Version, *, so: str = "it cannot make pictures",
                          instead: str = "activate another version") -> ConflictError:
    """What a user is told when ``version``'s weights file is gone from the storage (to generate
    with it by default; ``so`` and ``instead`` say it for another use): nothing they retry
    brings it back, another version does."""
    return ConflictError(
        f"version {version.number}'s weights are missing from the storage, so {so}; "
        f"{instead} (or train again)", code=ErrorCode.WEIGHTS_MISSING)


def one_line_break(text: str) -> str:
    """``text`` with its CRLF and lone CR line breaks as LF."""
    return text.replace("\r\n", "\n").replace("\r", "\n")


def weights_damaged_error(version: Version) -> WeightsDamagedError:
    """What a user is told when ``version``'s weights file is in the storage but cannot be read
    or is not the file the version stored: as for a missing one, no retry mends it."""
    return WeightsDamagedError(
        f"version {version.number}'s weights file is damaged in the storage, so it cannot make "
        "pictures and retrying will not help; activate another version (or train again)")


@dataclass(frozen=True)
class Picture:
    """A picture of a generation's batch: its number (1-based) and the seed that makes it alone
    (None for a generation stored without its seed)."""

    number: int
    seed: int | None


def stored_pictures(generation: Generation) -> list[Picture]:
    """The pictures of ``generation`` that came, ``image_keys``' order: each with its place's
    seed, the one that makes it again alone (the batch's seed makes only the first)."""
    return _pictures(generation, generation.pictures())


def withheld_pictures(generation: Generation) -> list[Picture]:
    """The pictures of ``generation`` its generator withheld (Replicate's safety checker)."""
    return _pictures(generation, generation.withheld)


def _pictures(generation: Generation, places: Iterable[int]) -> list[Picture]:
    """The pictures at ``places`` (0-based) of ``generation``'s batch, each with its seed."""
    return [Picture(number=place + 1, seed=None if generation.seed is None
                    else image_seed(seed=generation.seed, index=place))
            for place in places]


# The gallery's page (the Generate page, GET /api/generations), and the most one page holds.
HISTORY_PAGE = 50
HISTORY_MAX_PAGE = PAGE_MAX  # as every paged list's


@dataclass(frozen=True)
class GenerationPage:
    """A page of a user's generations, newest first. ``older``: the cursor (the last one's
    position) to ask the next page ``before`` (None: this page holds the oldest). Before
    pages, only the 50 newest were ever listed and the older pictures, still stored, could
    not be found."""

    generations: Sequence[Generation]
    older: str | None


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    num_outputs: int = 1
    seed: int | None = None
    lora_scale: float | None = None
    version_id: str | None = None
    # The id the generation is stored under (None: a new one). The CLI names it first, so that,
    # interrupted, it can tell whether the pictures were stored (``find``). It must be new (a
    # fresh ``new_id()``): one already stored is refused before anything is made or written.
    generation_id: str | None = None


@dataclass(frozen=True)
class Rendered:
    prompt: str  # as sent to the generator: it holds the trigger word
    lora_scale: float
    images: list[bytes]  # PNG bytes, one per picture that came, in the batch's order
    # The batch places (0-based) of the pictures the generator withheld; the others are
    # ``images``. Never all of them: a batch withheld whole fails.
    withheld: tuple[int, ...] = ()


# The backend label of a generation refused before its model was found.
_NO_BACKEND = "none"


@dataclass
class _Attempt:
    """What ``_make`` tells ``_generate``: the model's backend, once the request was accepted
    and the generator is about to be asked."""

    backend: str | None = None


class GenerationService:
    """Generations run on the service's own threads (``threads`` of them; those beyond wait in
    its queue, holding no thread), so a server's other routes never wait behind them, and a user
    has at most ``max_per_user`` generations submitted and not ended in this process: a local
    generation waits for the one pipeline, and one user's queue would delay everyone's."""

    def __init__(
        self, *, repo: Repository, blobs: BlobStore, generators: Mapping[str, Generator],
        max_per_user: int = DEFAULT_MAX_PER_USER, threads: int = DEFAULT_THREADS,
        base_model: str | None = None, telemetry: Telemetry | None = None,
    ) -> None:
        self._repo = repo
        self._telemetry: Telemetry = telemetry or NullTelemetry()
        # The local generator's base model (SELFIE_LORA_BASE_MODEL): a local version trained for
        # another is refused before its weights are loaded. None: not checked.
        self._base_model = base_model
        self._blobs = blobs
        self._generators = dict(generators)
        self._in_flight = PerUserSlots(max_per_user, refused=self._too_many)
        # What the last generation took: how long a user told to wait waits, about.
        self._last_seconds = float(_FIRST_RETRY_AFTER)
        self._executor = ThreadPoolExecutor(max_workers=threads,
                                            thread_name_prefix="generation")
        # The local copies of weights whose sha256 was found to be their version's: (path,
        # sha256, size, mtime) once, not hashed again for every picture of a gallery.
        self._sound: set[tuple[str, str, int, int]] = set()

    def close(self) -> None:
        """Drop the queued generations and let the running ones end (a process shutting down)."""
        self._executor.shutdown(wait=False, cancel_futures=True)

    def submit(self, *, user: User, request: GenerationRequest,
               client_gone: threading.Event | None = None) -> Future[Generation]:
        """``generate`` on the service's threads: its future. Refused at once, before anything
        queues, with a 429 ``too_many_generations`` when the user has ``max_per_user``
        generations in flight here. Once ``client_gone`` is set, a generation not yet made
        (taken by a thread but waiting for the local pipeline, or between pictures) is dropped:
        ``ClientGoneError``, nothing stored, and its slot is free as it ends."""
        self._take(lambda: self._in_flight.take(user.id))
        try:
            future = self._executor.submit(self._generate_timed, user=user, request=request,
                                           client_gone=client_gone)
        except BaseException:
            self._in_flight.release(user.id)
            raise
        # Also when the future is canceled while queued (its client went away).
        future.add_done_callback(lambda _done: self._in_flight.release(user.id))
        return future

    def _too_many(self, held: int) -> RateLimitedError:
        wait = max(1, min(_MAX_RETRY_AFTER, math.ceil(self._last_seconds)))
        return RateLimitedError(
            f"you already have {held} generation{'s' if held != 1 else ''} in "
            f"progress, the most at once; wait for one to finish, then retry (in about "
            f"{wait} s)", retry_after=wait, code=ErrorCode.TOO_MANY_GENERATIONS)

    def _take(self, take: Callable[[], object]) -> None:
        """A slot of ``_in_flight``; a user over the limit is a refused generation."""
        try:
            take()
        except RateLimitedError:
            self._telemetry.generation_ended(backend=_NO_BACKEND, status="refused",
                                             seconds=None)
            raise

    def _generate_timed(self, *, user: User, request: GenerationRequest,
                        client_gone: threading.Event | None = None) -> Generation:
        started = time.monotonic()
        generation = self._generate(user=user, request=request, client_gone=client_gone)
        self._last_seconds = time.monotonic() - started
        return generation

    def _generate(self, *, user: User, request: GenerationRequest,
                  client_gone: threading.Event | None = None) -> Generation:
        """``_make``, counted and timed by how it ended (``Telemetry.generation_ended``)."""
        started = time.monotonic()
        attempt = _Attempt()
        try:
            generation = self._make(user=user, request=request, client_gone=client_gone,
                                    attempt=attempt)
        except BaseException as exc:
            # Counted by how it ended (``ports.GENERATION_OUTCOMES``): a refusal before the
            # generator was asked is not timed, every other ending is.
            seconds = time.monotonic() - started
            if isinstance(exc, ClientGoneError):
                status = "abandoned"
            elif attempt.backend is None and isinstance(exc, SelfieLoraError) \
                    and exc.http_status < 500:
                status = "refused"
            else:
                status = "failed"
            self._telemetry.generation_ended(
                backend=attempt.backend or _NO_BACKEND, status=status,
                seconds=None if status == "refused" else seconds)
            raise
        self._telemetry.generation_ended(
            backend=attempt.backend or _NO_BACKEND,
            status="withheld" if generation.withheld else "made",
            seconds=time.monotonic() - started)
        return generation

    def render(
        self,
        *,
        model: Model,
        version: Version,
        prompt: str,
        seed: int | None,
        num_outputs: int = 1,
        lora_scale: float | None = None,
        size: int | None = None,
        client_gone: threading.Event | None = None,
        stop: Callable[[], None] | None = None,
        lora_hold: LoraHold | None = None,
    ) -> Rendered:
        """Images of ``version`` through the model's generator, at the model's LoRA scale unless
        one is given. The one code path of user generations and likeness probes. ``stop``
        (``GenerationJob.stop``) is called while they are made, and raises to stop them;
        renders of one ``lora_hold`` (``GenerationJob.lora_hold``) may share one load of the
        version's LoRA."""
        if version.version_mismatch:
            # The trainer published this training's LoRA as another destination's Replicate
            # version (replicate-python #419): generating with it would make that model's
            # pictures, not this user's. Which of the destination's versions is this training's
            # cannot be told safely (others may have been pushed since), so none is guessed.
            raise InvalidInputError(
                f"version {version.number} cannot generate: Replicate published it to another "
                f"model than yours ({model.destination}), so its pictures would not be of you. "
                "Retrain, or generate with another of your versions.",
                code=ErrorCode.VERSION_MISMATCH)
        check_version_fits_base_model(backend=model.backend, version=version,
                                      base_model=self._base_model)
        scale = validate_lora_scale(lora_scale) if lora_scale is not None else model.lora_scale
        generator = self._generators.get(model.backend)
        if generator is None:
            # The operator's setting (a Replicate model on a server without REPLICATE_API_TOKEN),
            # as the local generator's misconfiguration answers: a 502 that says whom to ask,
            # not a 500 "not set up for that yet" the user cannot tell from a crash.
            backend = _BACKEND_NAMES.get(model.backend, f"the '{model.backend}' backend")
            raise GenerationError(
                f"no '{model.backend}' generator is configured on this server"
                + (": set REPLICATE_API_TOKEN (or SELFIE_LORA_REPLICATE_API_TOKEN)"
                   if model.backend == "replicate" else ""),
                user_message=f"This server cannot generate with your model: it is trained on "
                             f"{backend}, which this server is not set up to use; contact the "
                             "operator.")
        final_prompt = ensure_trigger_word(prompt, model.trigger_word)
        stored = generates_from_stored_weights(model.backend)
        # A copy found damaged (its hash, or the generator unable to read it) may be only this
        # machine's cached copy of a sound object, or one fetched before the operator restored
        # it: dropped and fetched once more, and refused only if the fresh copy is wrong too.
        # Each check fetches again once; the copy fetched again for the generator is a new
        # one, so its hash check has its once again.
        refetched: set[Literal["hash", "generator"]] = set()
        while True:
            found: str | None = None  # the hash of a copy that is not the stored file
            damaged: WeightsDamagedError | None = None
            with ExitStack() as stack:
                weights_path = (self._local_weights(stack, model=model, version=version)
                                if stored else None)
                if weights_path is not None:
                    found = self._weights_hash(version=version, path=weights_path)
                if found is None:
                    job = GenerationJob(
                        prompt=final_prompt, num_outputs=num_outputs, seed=seed,
                        lora_scale=scale, trainer_version=version.trainer_version,
                        weights_path=weights_path, remote_version=version.remote_version,
                        weights_id=((version.weights_sha256 or version.weights_key)
                                    if weights_path is not None else None),
                        width=size, height=size, client_gone=client_gone, stop=stop,
                        lora_hold=lora_hold,
                    )
                    try:
                        pictures = generator.generate(job)
                    except WeightsDamagedError as exc:
                        damaged = exc
            # The copy is released (the stack closed) before it is dropped.
            if found is None and damaged is None:
                break
            # ``damaged`` is None when the hash check found the copy wrong (no generation ran).
            check: Literal["hash", "generator"] = "hash" if damaged is None else "generator"
            if (weights_path is not None and check not in refetched
                    and self._blobs.forget_local_copy(version.weights_key)):
                if damaged is None:
                    logger.warning("version %s (model %s): this machine's copy of %s hashes to "
                                   "%s, not the stored %s; fetched again", version.id, model.id,
                                   version.weights_key, found, version.weights_sha256)
                    refetched.add("hash")
                else:
                    logger.warning("version %s (model %s): the generator could not read this "
                                   "machine's copy of %s (%s); fetched again", version.id,
                                   model.id, version.weights_key, damaged.message)
                    refetched = {"generator"}
                continue
            if damaged is None:
                logger.error("version %s (model %s) cannot generate: its weights %s hash to %s, "
                             "not the stored %s (%s)", version.id, model.id, version.weights_key,
                             found, version.weights_sha256,
                             "fetched again from the storage" if "hash" in refetched
                             else "the stored file")
                raise weights_damaged_error(version)
            # The generator could not read the file (its sha256 matched, or was not known):
            # the version's, so the user is told which and what to do, the operator the key.
            logger.error("version %s (model %s, weights %s) cannot generate: %s",
                         version.id, model.id, version.weights_key, damaged.message)
            raise weights_damaged_error(version) from damaged
        if all(png is None for png in pictures):
            # The generator's contract is to raise then (naming what was withheld); a batch of
            # nothing is never stored as a generation.
            raise GenerationError(
                "every picture was withheld by the generator's safety checker; change the "
                "prompt or the seed and try again",
                user_message="Every picture was withheld by the safety checker. Change the "
                             "prompt or the seed and try again.")
        return Rendered(prompt=final_prompt, lora_scale=scale,
                        images=[png for png in pictures if png is not None],
                        withheld=tuple(i for i, png in enumerate(pictures) if png is None))

    def _local_weights(self, stack: ExitStack, *, model: Model, version: Version) -> Path:
        """A local copy of ``version``'s weights, held until ``stack`` closes: the file stays on
        this machine until the generation ends (a local generator may wait behind others,
        minutes each, before it loads it, and meanwhile another process's fetch may evict
        whatever copy nobody holds). ``render`` checks it is the stored file."""
        try:
            return stack.enter_context(self._blobs.local_copy(version.weights_key))
        except BlobMissingError as exc:
            # Not the server failing (a 500 the user can only retry): this version cannot
            # generate until its file is restored, and another version can. The operator
            # gets the key to look for.
            logger.error("version %s (model %s) cannot generate: %s", version.id, model.id,
                         exc.message)
            raise weights_missing_error(version) from exc

    def _weights_hash(self, *, version: Version, path: Path) -> str | None:
        """None when the copy at ``path`` is the file ``version`` stored (its sha256, the
        content-addressed key's), else the hash it has: a cut-short or garbled blob was a 500
        "please retry" on every generation. Each copy is hashed once (streamed)."""
        if not version.weights_sha256:
            return None  # no hash was recorded: nothing to compare with
        stat = path.stat()
        seen = (str(path), version.weights_sha256, stat.st_size, stat.st_mtime_ns)
        if seen in self._sound:
            return None
        with path.open("rb") as fh:
            found = hashlib.file_digest(fh, "sha256").hexdigest()
        if found != version.weights_sha256:
            return found
        self._sound.add(seen)
        return None

    def generate(self, *, user: User, request: GenerationRequest) -> Generation:
        """A user's pictures, made and stored in the caller's thread, under ``submit``'s limit.
        Not ``submit`` waited for: Ctrl-C (the CLI, the demo) would interrupt only the wait,
        and the generation would run on in the executor's thread until the process exits."""
        with ExitStack() as slot:
            self._take(lambda: slot.enter_context(self._in_flight.hold(user.id)))
            return self._generate_timed(user=user, request=request)

    def _no_version(self, model_id: str) -> NotReady:
        """What to do about a model with no active version: with versions (each held back: the
        likeness gate, a cancel), activating one helps at once, whatever its trainings do;
        without, waiting helps only while a training is queued or running; after none, or a
        failed or canceled one, it never would."""
        active = [t for t in self._repo.list_trainings(model_id) if t.status.is_active]
        state: Literal["queued", "running"] | None = None
        if active:
            state = "queued" if active[0].status is TrainingStatus.QUEUED else "running"
        if self._repo.list_versions(model_id):
            activate = ("your model has no active version: activate one (the Versions page or "
                        "POST /api/model/versions/{id}/activate)")
            return NotReady(reason="activate", training=state,
                            message=f"{activate}; a training is {state} too" if state
                            else f"{activate} or train again")
        if state:
            return NotReady(reason="wait", training=state,
                            message=f"your model has no trained version yet: its training is "
                                    f"{state}; wait for it to finish")
        return NotReady(reason="train", training=None,
                        message="your model has no trained version yet: train it (the Train "
                                "page, POST /api/training/start or selfie-lora train)")

    def _make(self, *, user: User, request: GenerationRequest,
              client_gone: threading.Event | None = None,
              attempt: _Attempt) -> Generation:
        # One line break is one character, as a text area counts it (its maxlength is the
        # limit's): a browser sends each as CRLF, and a 1999-character prompt of five lines
        # was refused as longer than 2000 (and stored with its CRs). The API's and the CLI's
        # prompts are counted the same way.
        request = replace(request, prompt=one_line_break(request.prompt))
        if not request.prompt.strip():
            raise InvalidInputError("the prompt is empty", code=ErrorCode.EMPTY_PROMPT)
        if len(request.prompt) > MAX_PROMPT_CHARS:
            raise InvalidInputError(f"the prompt is longer than {MAX_PROMPT_CHARS} characters",
                                    code=ErrorCode.PROMPT_TOO_LONG)
        # Before anything is generated: the pictures of a prompt that cannot be saved were
        # made and stored for nothing.
        if _PROMPT_CONTROL.search(request.prompt):
            raise InvalidInputError("the prompt holds a control character (such as NUL, 0x00); "
                                    "remove it", code=ErrorCode.INVALID_PROMPT)
        # Shown again on the Generate page (as text, alt text, a button's label) and in
        # 'generations list': an override reversed what came after it there, the date too.
        if (bidi := bidi_control_in(request.prompt)) is not None:
            raise InvalidInputError(f"the prompt holds {character_name(bidi)}, which reorders "
                                    "the text after it; remove it", code=ErrorCode.INVALID_PROMPT)
        if request.seed is not None and not 0 <= request.seed <= MAX_SEED:
            raise InvalidInputError(f"the seed must be 0 to {MAX_SEED}", code=ErrorCode.INVALID_SEED)
        if not 1 <= request.num_outputs <= MAX_OUTPUTS:
            raise InvalidInputError(f"num_outputs must be 1 to {MAX_OUTPUTS}",
                                    code=ErrorCode.INVALID_NUM_OUTPUTS)
        # Before the generator is paid for.
        self._refuse_stored_id(request.generation_id, made=False)
        model = self._repo.get_model_for_user(user.id)
        if model is None:
            raise NoModelError(user=user.name)
        ref = request.version_id or model.active_version_id
        if ref is None:
            raise NoVersionError(self._no_version(model.id), user=user.name)
        version = find_version(self._repo.list_versions(model.id), ref)
        if version is None:
            raise no_such_version(ref)
        # A seed is drawn here, not by the generator, so that the generation records the seed
        # that made its pictures (the answer, the stored row, the gallery) and can be made again.
        seed = request.seed if request.seed is not None else secrets.randbelow(MAX_SEED + 1)
        attempt.backend = model.backend  # from here, what goes wrong is a failure, not a refusal
        rendered = self.render(model=model, version=version, prompt=request.prompt, seed=seed,
                               num_outputs=request.num_outputs, lora_scale=request.lora_scale,
                               client_gone=client_gone)
        # Again before the first put: one stored under it during the render would have its
        # pictures (keyed by the id) overwritten, the row insert failing only after.
        self._refuse_stored_id(request.generation_id, made=True)
        generation_id = request.generation_id or new_id()
        places = [i for i in range(len(rendered.images) + len(rendered.withheld))
                  if i not in rendered.withheld]
        keys: list[str] = []
        for place, png in zip(places, rendered.images, strict=True):
            # Named by its place in the batch, the seed's offset. Only if absent: two
            # generations made at once under one caller-chosen id both pass the check above,
            # and the second to write a place would replace the first's picture (the one
            # stored could show the other's). Written in the places' order, so one of them
            # always writes all its own.
            key = generation_image_key(generation_id, place)
            if not self._blobs.put(key, png, if_absent=True):
                self._drop_pictures(generation_id, keys)
                raise self._stored_id_error(generation_id, made=True)
            keys.append(key)
        generation = Generation(
            id=generation_id, user_id=user.id, model_id=model.id, version_id=version.id,
            prompt=rendered.prompt, lora_scale=rendered.lora_scale, seed=seed,
            image_keys=tuple(keys), created_at=utcnow(), withheld=rendered.withheld,
        )
        try:
            self._repo.add_generation(generation)
        except ConflictError:
            if self._repo.get_generation(generation_id) is None:
                raise  # another conflict than the id's
            # The other one's pictures had other places (withheld ones), so no put met: the
            # row decides. These are this one's only, and the garbage collection would keep
            # them (they are under a stored generation's id).
            self._drop_pictures(generation_id, keys)
            raise self._stored_id_error(generation_id, made=True) from None
        logger.info("generation %s: %d image(s) with version %d at scale %.2f, seed %d",
                    generation_id, len(keys), version.number, rendered.lora_scale, seed)
        if rendered.withheld:
            # Kept and paid for: the user is told which are missing (withheld_pictures).
            logger.warning("generation %s: the generator withheld picture(s) %s of %d",
                           generation_id, [i + 1 for i in rendered.withheld],
                           len(keys) + len(rendered.withheld))
        return generation

    def _refuse_stored_id(self, generation_id: str | None, *, made: bool) -> None:
        """Refuse a caller-chosen ``generation_id`` already stored (any user's): its pictures
        are keyed by the id, so writing this generation's would replace that one's."""
        if generation_id is None or self._repo.get_generation(generation_id) is None:
            return
        raise self._stored_id_error(generation_id, made=made)

    @staticmethod
    def _stored_id_error(generation_id: str, *, made: bool) -> ConflictError:
        return ConflictError(
            f"a generation is already stored under the id {generation_id[:64]}: each "
            f"generation needs a new one; nothing was stored"
            f"{' (the pictures made are dropped)' if made else ', nothing generated'}",
            code=ErrorCode.WRITE_CONFLICT)

    def _drop_pictures(self, generation_id: str, keys: Sequence[str]) -> None:
        """Deletes the pictures this attempt wrote under an id another generation holds."""
        for key in keys:
            try:
                self._blobs.delete(key)
            except SelfieLoraError as exc:
                logger.warning("generation %s: picture %s of a generation refused for its id "
                               "not deleted: %s", generation_id, key, exc.message,
                               exc_info=not isinstance(exc, StorageError))

    def find(self, *, user: User, generation_id: str) -> Generation | None:
        """One of the user's generations; None when none is stored under that id (or it is
        another user's)."""
        generation = self._repo.get_generation(generation_id)
        return generation if generation is not None and generation.user_id == user.id else None

    def image(self, *, user: User, generation_id: str, index: int) -> bytes:
        generation = self._repo.get_generation(generation_id)
        if generation is None or generation.user_id != user.id:
            raise NotFoundError("no such image")
        if not 0 <= index < len(generation.image_keys):
            raise NotFoundError("no such image")
        key = generation.image_keys[index]
        try:
            return self._blobs.get(key)
        except BlobMissingError as exc:
            if self._repo.get_generation(generation_id) is None:
                # Deleted between the row's read and the file's (a Delete in another tab while
                # the gallery loads): the 404 of a read after the Delete, nothing for the
                # operator to look for.
                raise NotFoundError("no such image") from exc
            # Not the server failing (a 500 the user can only retry): the file is gone (a
            # restore without the blobs, a collection that removed it first) and stays gone.
            # The operator gets the key to look for.
            logger.error("generation %s: picture %d is missing from the storage (%s)",
                         generation.id, index, key)
            raise NotFoundError(f"picture {index} of this generation is no longer stored; "
                                "generate it again to have it") from exc

    def delete(self, *, user: User, generation_id: str) -> Generation:
        """Delete one of the user's generations: its row first (gone from every list and its
        pictures 404 at once), then its pictures. A picture whose delete fails is an orphan
        under generations/, which the garbage collection removes (as after a crash). A 404
        for a generation that is not the user's."""
        generation = self._repo.delete_generation(generation_id, user_id=user.id)
        if generation is None:
            raise NotFoundError("no such generation")
        for key in generation.image_keys:
            try:
                self._blobs.delete(key)
            except SelfieLoraError as exc:
                # The storage's error in its one line; a traceback only for what was not one.
                logger.warning("generation %s: picture %s not deleted, left to the garbage "
                               "collection: %s", generation.id, key, exc.message,
                               exc_info=not isinstance(exc, StorageError))
        logger.info("generation %s deleted by its owner (%d picture(s))", generation.id,
                    len(generation.image_keys))
        return generation

    def not_ready(self, *, user: User) -> NotReady | None:
        """Why the user cannot generate now (the reason ``generate`` would refuse for, with its
        words for the API and the CLI; the Generate page words the reason itself), or None
        when they can."""
        model = self._repo.get_model_for_user(user.id)
        if model is None:
            return NotReady(reason="no_model", training=None, message=NO_MODEL)
        if model.active_version_id is None:
            return self._no_version(model.id)
        return None

    def versions(self, *, user: User) -> Sequence[Version]:
        """The versions of the user's model ``generate`` takes as ``version_id`` (the Generate
        page's choice), newest first: any of them, not active or held back by the likeness gate
        included, as the API takes them, but those it refuses whatever is retried (published to
        another model, trained for another base model than this server's)."""
        model = self._repo.get_model_for_user(user.id)
        if model is None:
            return []
        usable = []
        for version in self._repo.list_versions(model.id):
            if version.version_mismatch:
                continue
            try:
                check_version_fits_base_model(backend=model.backend, version=version,
                                              base_model=self._base_model)
            except ConflictError:
                continue
            usable.append(version)
        return usable

    def history(self, *, user: User, limit: int = 50) -> Sequence[Generation]:
        """The user's generations, newest first (the gallery's first page)."""
        return self.page(user=user, limit=max(1, min(limit, HISTORY_MAX_PAGE))).generations

    def page(self, *, user: User, limit: int = HISTORY_PAGE,
             before: str | None = None) -> GenerationPage:
        """A page of the user's generations, newest first: the ``limit`` (1 to
        ``HISTORY_MAX_PAGE``) below the position ``before`` (the ``older`` of the page before:
        ``GenerationPosition.cursor``), or the newest (``before`` None or empty). The position
        holds even when the generation it was taken from has been deleted since. A bare
        generation id (the cursor before positions, a bookmarked page) is looked up: a 404 for
        one that is not the user's (now or any more), as for a cursor that is neither."""
        page_limit(limit)
        cursor = None
        # An empty ``before`` is the first page, as the Generate page's ``?before=`` is: a script
        # passing the last page's ``older`` on (``--before "$older"``, ``?before=$older``)
        # starts with none, and was told "no such generation".
        if before:
            if names_no_row(before):  # before the lookup: PostgreSQL refuses a NUL in it
                raise NotFoundError("no such generation")
            cursor = GenerationPosition.parse(before)
            if cursor is None:
                found = self._repo.get_generation(before)
                if found is None or found.user_id != user.id:
                    raise NotFoundError("no such generation")
                cursor = GenerationPosition.of(found)
        # One more than shown: whether there are older ones, without counting them all. The
        # listing is the user's only, so another user's position reveals nothing.
        rows = list(self._repo.list_generations(user.id, limit=limit + 1, before=cursor))
        shown = rows[:limit]
        return GenerationPage(
            generations=shown,
            older=GenerationPosition.of(shown[-1]).cursor() if len(rows) > limit else None)
