"""The whole photo intake: decode -> analyze -> set checks -> prepare the accepted photos.

Speed (CPU per 12 MP JPEG, ``bench/ingest.py --profile``, on the 2-core machine of 2026-12-04's
second session, README's issue-11 table):
decode at half size with JPEG draft mode ~47 ms (a full decode ~87 ms; ~1 photo in 6 is decoded
again in full for its training crop), face detection at 640 px ~42 ms, the identity embedding
~15 ms (dlib's ResNet in ONNX Runtime; ~130 ms in dlib's own code), 5-point landmarks <1 ms,
measurements ~10 ms, keypoints ~13 ms, the 1024 px training crop ~25 ms (Pillow's box filter
~15, JPEG ~10): ~190-210 ms a photo. These scale with the host: on the 2-core AMD EPYC host of
2026-12-07 a full decode took ~30 ms (~46-50 with the page faults of fresh memory) and the box
filter ~7-10 ms, a third to two-thirds of those; the other stages were not timed one by one
there, and the profile gives a host's own split. dlib holds the GIL (measured: two threads with two
detectors take as long as one thread doing both, 0.46 s vs
0.47 s; the same for embeddings, 1.33 s vs 1.33 s), and
``DlibFaceAnalyzer`` serialises its calls with a lock anyway, so threads cannot use a second core
for the face work. Pillow does release it (two threads decode 2x faster, resize 1.75x). Given an
analyzer factory (the wiring passes dlib's), the photos are therefore analysed in a pool of
worker processes (forkserver), each building its analyzer and loading the models once in its
initializer, kept for the life of the service: the first intake pays ~1.6 s to start them
(``warm_up`` moves that to service start). Without a factory (fakes) they run in threads.

Each photo's decode, analysis and training crop happen in one task: the decoded pixels never
cross a process boundary, only the analysis and the finished JPEG come back.
"""

from __future__ import annotations

import atexit
import dataclasses
import hashlib
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import (
    CancelledError,
    Executor,
    Future,
    ProcessPoolExecutor,
    ThreadPoolExecutor,
)
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing.process import BaseProcess

from selfie_lora.dataset.checks import (
    CheckPolicy,
    PhotoAnalysis,
    SetReport,
    TrainedPerson,
    analyze_photo,
    check_set,
)
from selfie_lora.dataset.decode import SHORT_OF_MEMORY, DecodedPhoto, decode_photo
from selfie_lora.dataset.limits import UploadedFile, UploadLimits
from selfie_lora.dataset.prepare import PreparedPhoto, prepare_photo, source_min_side
from selfie_lora.domain.entities import Finding
from selfie_lora.domain.faces import AnalyzerFactory, FaceAnalyzer
from selfie_lora.errors import ConfigError
from selfie_lora.lifeline import exit_with
from selfie_lora.logs import LogFormat, logging_setup, setup_logging

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class IntakeResult:
    images_total: int
    prepared: tuple[PreparedPhoto, ...]  # the accepted photos only, in upload order
    findings: tuple[Finding, ...]  # decoding findings first, then the report's
    report: SetReport
    analyses: tuple[PhotoAnalysis, ...] = ()
    seconds: float = 0.0  # wall time of the whole intake
    cpu_seconds: float = 0.0  # CPU time over all processes and threads (what 1 core would take)


@dataclass(frozen=True)
class PhotoOutcome:
    """One photo through decode, analysis and preparation (what a worker sends back)."""

    order: int
    name: str
    finding: Finding | None = None  # the photo could not be decoded (or analysed)
    analysis: PhotoAnalysis | None = None
    prepared: PreparedPhoto | None = None
    cpu_seconds: float = 0.0  # CPU time this photo took, wherever it ran


def decode_side(policy: CheckPolicy) -> int:
    """The short side photos are decoded at, at least (see ``CheckPolicy.decode_min_side``)."""
    return max(policy.resolution, policy.decode_min_side)


def process_photo(upload: UploadedFile, *, order: int, limits: UploadLimits, policy: CheckPolicy,
                  analyzer: FaceAnalyzer) -> PhotoOutcome:
    """Decode, analyse and (when the photo passes its own checks) prepare one photo."""
    # Per-thread CPU time: meaningful in a worker process and in a thread alike.
    cpu_start = time.thread_time()
    # Colours deferred: only the copies the checks and the training crop read are converted.
    decoded = decode_photo(upload, limits=limits, min_side=decode_side(policy), defer_colour=True)
    if isinstance(decoded, Finding):
        return PhotoOutcome(order=order, name=upload.name, finding=decoded,
                            cpu_seconds=time.thread_time() - cpu_start)
    analysis = analyze_photo(decoded, analyzer=analyzer, policy=policy, order=order)
    prepared = None
    if not analysis.rejected and analysis.main_face is not None:
        # Prepared now, before the set checks, so the pixels need not travel back; the few
        # photos the set checks reject (duplicates, strangers) are simply dropped.
        source: DecodedPhoto = decoded
        wanted = source_min_side(decoded, analysis, resolution=policy.resolution,
                                 aspect_buckets=policy.aspect_buckets)
        if wanted is not None:
            # The face-aware crop is smaller than the training resolution at this decode size
            # while the original has more pixels: decode again with enough of them.
            again = decode_photo(upload, limits=limits, min_side=wanted, defer_colour=True)
            if isinstance(again, DecodedPhoto):
                source = again
        prepared = prepare_photo(source, analysis, resolution=policy.resolution,
                                 aspect_buckets=policy.aspect_buckets)
    return PhotoOutcome(order=order, name=upload.name, analysis=analysis, prepared=prepared,
                        cpu_seconds=time.thread_time() - cpu_start)


# The finding of a photo whose analysis crashed (a bug, a native failure, a dead worker): not
# a property of the photo, so never remembered as its outcome (``OutcomeCache``).
ANALYSIS_FAILED = "analysis_failed"
# Findings about this server at that moment, not about the photo: the same bytes may fare
# otherwise next time, so ``OutcomeCache`` keeps none of them.
_NOT_THE_PHOTO = frozenset({ANALYSIS_FAILED, SHORT_OF_MEMORY})


def _failed(order: int, name: str) -> PhotoOutcome:
    return PhotoOutcome(order=order, name=name, finding=Finding(
        "reject", ANALYSIS_FAILED, f"{name} could not be analysed",
        "try another photo; if every photo fails, tell us", photo=name,
    ))


# --------------------------------------------------------------------------- worker processes


_worker_analyzer: FaceAnalyzer | None = None


def _init_worker(factory: AnalyzerFactory, service_pid: int,
                 log_setup: tuple[LogFormat, bool, bool] | None = None) -> None:
    # Ctrl-C at a terminal reaches these processes too: the service decides what stops (a
    # KeyboardInterrupt here only printed a traceback per process and broke the pool).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if log_setup is not None:
        # The service's log format: a line of this process (the lifeline's, after the service
        # was killed) was logging's bare fallback, plain text in a JSON log.
        setup_logging(log_format=log_setup[0], verbose=log_setup[1], quiet=log_setup[2])
    # Forked by the fork server, which lives as long as its children do: watch the service
    # itself, and end with it, even after kill -9.
    exit_with(service_pid)
    import imagehash
    import numpy as np
    from PIL import Image

    global _worker_analyzer
    analyzer = factory()
    # Load the models now, not in the first task.
    analyzer.detect(np.zeros((32, 32, 3), dtype=np.uint8), landmarks=False, embed=False)
    imagehash.dhash(Image.new("L", (32, 32)))
    # OpenCV (the keypoints of the near-duplicate check, the training crop): one thread per
    # worker process, the processes are the parallelism; and its first call's set-up now.
    import cv2

    cv2.setNumThreads(1)
    cv2.ORB.create().detectAndCompute(np.zeros((64, 64), dtype=np.uint8), None)
    _worker_analyzer = analyzer


def _work_in_worker(upload: UploadedFile, order: int, limits: UploadLimits,
                    policy: CheckPolicy) -> PhotoOutcome:
    if _worker_analyzer is None:  # pragma: no cover - the initializer always ran
        raise RuntimeError("worker process without an analyzer")
    return process_photo(upload, order=order, limits=limits, policy=policy,
                         analyzer=_worker_analyzer)


_pools: dict[tuple[int, AnalyzerFactory], ProcessPoolExecutor] = {}
_pools_lock = threading.Lock()
# The pools an intake has taken: a stop waits for their processes, so that the photos they are
# analysing are finished. A pool only the warm-up has used has no photo to finish, and its
# processes may still be loading their models (~0.5 s each, seconds on a loaded machine): a
# stop ends them rather than wait for that (``shutdown_pools``).
_used: set[ProcessPoolExecutor] = set()


def _new_pool(workers: int, factory: AnalyzerFactory) -> ProcessPoolExecutor:
    # forkserver: children are forked from a clean single-threaded server, never from this
    # (threaded) service process.
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    context = multiprocessing.get_context(method)
    if method == "forkserver":
        # The server imports these once; each worker forks with them loaded (~0.5 s less per
        # worker start). No effect if the server already runs.
        preload = list(getattr(factory, "preload", ()))
        context.set_forkserver_preload([__name__, "imagehash", "cv2", *preload])
    return ProcessPoolExecutor(max_workers=workers, mp_context=context,
                               initializer=_init_worker,
                               initargs=(factory, os.getpid(), logging_setup()))


def _process_pool(workers: int, factory: AnalyzerFactory, *,
                  intake: bool = False) -> ProcessPoolExecutor:
    """``intake``: mark the pool as an intake's (``_used``) in the step that looks it up."""
    key = (workers, factory)
    with _pools_lock:
        pool = _pools.get(key)
        if pool is None:
            pool = _new_pool(workers, factory)
            _pools[key] = pool
            logger.info("started %d face-analysis worker process(es)", workers)
        if intake:
            # Under the same lock as the look-up: a stop in between took the pool for one no
            # intake had used and ended the processes analysing this intake's photos.
            _used.add(pool)
        return pool


def _intake_pool(workers: int, factory: AnalyzerFactory) -> ProcessPoolExecutor:
    """The pool an intake analyses its photos in, marked as used (a stop waits for it)."""
    return _process_pool(workers, factory, intake=True)


def _drop_pool(workers: int, factory: AnalyzerFactory, pool: ProcessPoolExecutor) -> None:
    with _pools_lock:
        if _pools.get((workers, factory)) is pool:
            del _pools[(workers, factory)]
        _used.discard(pool)
    pool.shutdown(wait=False, cancel_futures=True)


# How many times ``shutdown_pools`` ran: a warm-up is quiet about a refused or cancelled task
# only when this moved. Whether its pool is still in ``_pools`` says nothing: an intake drops a
# broken pool too (``_drop_pool``), and a pool that cannot start its workers is a fault to tell.
_stops = 0


def stop_count() -> int:
    """How many times ``shutdown_pools`` ran in this process (``warm_up``'s ``since``)."""
    with _pools_lock:
        return _stops


def shutdown_pools() -> None:
    """Stop the worker processes (they are otherwise kept for the next intake)."""
    global _stops
    with _pools_lock:
        _stops += 1
        pools = [(pool, pool in _used) for pool in _pools.values()]
        _pools.clear()
        _used.clear()
    for pool, used in pools:
        # Each pool on its own: one that fails to stop must not leave the others' processes
        # running, nor raise out of the service's stop (whose next step closes the services).
        try:
            if used:
                pool.shutdown(wait=True, cancel_futures=True)
            else:
                _end_unused(pool)
        except Exception:
            logger.exception("could not stop a pool of face-analysis processes")


# How long a stop waits for the processes it has SIGTERMed before it SIGKILLs them (a handler of
# SIGTERM, a read stuck in the kernel): a stop that ends processes must not wait for ever.
_PROCESS_END_S = 5.0
_MISSING = object()


def _end_unused(pool: ProcessPoolExecutor) -> None:
    """Stop a pool no intake has used: its processes are ended, not waited for (still loading
    their models, they would keep the service's stop waiting for seconds, for nothing). Its
    only tasks are the warm-up's, which then ends quietly (``warm_up``: a stop)."""
    # Read before the shutdown, which drops them: the pool's own map, to which a process the
    # warm-up is starting now is added before the shutdown can go on (it takes the same lock).
    # The manager thread is made by the first submit: one under way now may make it after this
    # read; not joined then, it ends by itself once the processes are gone.
    # CPython's private names (3.11-3.13): a Python without them gets the stop of before,
    # which waits for the processes.
    processes = getattr(pool, "_processes", _MISSING)
    manager = getattr(pool, "_executor_manager_thread", None)
    if processes is _MISSING or not isinstance(processes, dict | None):
        logger.debug("this Python's process pool keeps no _processes: waiting for it instead")
        pool.shutdown(wait=True, cancel_futures=True)
        return
    try:
        pool.shutdown(wait=False, cancel_futures=True)  # no process is started after this
    finally:
        # Also when the shutdown raised (the stop logs it): its processes are ended all the same.
        _end_processes(list((processes or {}).values()))
    if isinstance(manager, threading.Thread):  # none before the pool's first task
        # It sees the ended processes, fails the warm-up's tasks and closes the pool's queues.
        manager.join(_PROCESS_END_S)


def _end_processes(ending: list[BaseProcess]) -> None:
    """SIGTERM, then SIGKILL what outlives it by ``_PROCESS_END_S``."""
    for process in ending:
        process.terminate()
    deadline = time.monotonic() + _PROCESS_END_S
    for process in ending:
        process.join(max(0.0, deadline - time.monotonic()))
    for process in ending:
        if process.is_alive():
            logger.warning("a face-analysis process outlived its SIGTERM: killed")
            process.kill()
            process.join()


atexit.register(shutdown_pools)


def warm_up(factory: AnalyzerFactory | None, *, workers: int = 2, since: int | None = None) -> bool:
    """Start the worker processes now (service start) so the first upload does not wait for
    them. A no-op without a factory (analyzers that run in threads). False when
    ``shutdown_pools`` ran after ``since`` (a ``stop_count()`` read at the service's start;
    None: now), that is the service is stopping: then no worker process is started."""
    if factory is None or workers <= 1:
        return True
    if since is None:
        since = stop_count()
    elif stop_count() != since:
        return False  # stopped before this thread got here: start nothing during the stop
    pool = _process_pool(workers, factory)
    if stop_count() != since:
        # The stop came while the pool was made: no task submitted, so no process started;
        # the pool, if still registered, goes with the process (atexit).
        return False
    try:
        # One trivial task per worker makes each run its initializer.
        futures = [pool.submit(time.sleep, 0) for _ in range(workers)]
        for future in futures:
            future.result()
    except (RuntimeError, CancelledError):
        # A stop (SIGTERM, Ctrl-C) during the warm-up shut the pool down: submit refuses
        # ("cannot schedule new futures after shutdown") or the queued tasks are cancelled.
        # Nothing is wrong then. Without a stop it is a fault (BrokenProcessPool is a
        # RuntimeError: workers that cannot start), told as such.
        if stop_count() != since:
            return False
        raise
    return True


# --------------------------------------------------------------------------- earlier outcomes


class OutcomeCache:
    """Photos analysed by earlier intakes of this process, by name, bytes, policy, limits and
    analyzer, the most recently used kept within ``max_bytes``: a retraining that brings the
    same photos with one more, or a check followed by the upload, analyses each photo once.
    A photo's outcome depends on nothing else (the set checks, which compare photos, always run
    again), its name included: findings name the photo. Failures that may not happen again (a
    worker that died, a decode short of memory) are not kept. Thread-safe: request threads share one.

    Each entry is one user's (``scope``, the user's id): shared, a user sending another
    account's exact file got its answer from the cache, in milliseconds where an analysis takes
    half a second (and ``verdict.seconds`` said so), which told them that someone else had
    uploaded that photo. Scoped, one user's uploads never change how another's is answered."""

    def __init__(self, *, max_bytes: int = 64 * 1024 * 1024) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple[object, ...], tuple[PhotoOutcome, int]] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()
        self.hits = 0

    @staticmethod
    def key(upload: UploadedFile, *, scope: str | None, policy: CheckPolicy,
            limits: UploadLimits, analyzer: FaceAnalyzer) -> tuple[object, ...]:
        """``scope``: whose intake it is (a user's id; None: no user's, ``selfie-lora check``)."""
        return (scope, upload.name, hashlib.sha256(upload.data).digest(), policy, limits,
                analyzer.model_name, id(analyzer))

    def get(self, key: tuple[object, ...], *, order: int) -> PhotoOutcome | None:
        """The outcome stored under ``key``, placed at ``order`` (None: not analysed yet)."""
        with self._lock:
            found = self._items.get(key)
            if found is None:
                return None
            self._items.move_to_end(key)
            self.hits += 1
        outcome = found[0]
        analysis = (dataclasses.replace(outcome.analysis, order=order)
                    if outcome.analysis is not None else None)
        # No CPU spent on it this time.
        return dataclasses.replace(outcome, order=order, analysis=analysis, cpu_seconds=0.0)

    def put(self, key: tuple[object, ...], outcome: PhotoOutcome) -> None:
        if outcome.finding is not None and outcome.finding.code in _NOT_THE_PHOTO:
            return
        size = _outcome_size(outcome)
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._size -= old[1]
            self._items[key] = (outcome, size)
            self._size += size
            while self._size > self.max_bytes:
                _key, (_outcome, dropped) = self._items.popitem(last=False)
                self._size -= dropped


def _outcome_size(outcome: PhotoOutcome) -> int:
    """Roughly what an outcome holds in memory: its training JPEG and its keypoints dominate."""
    size = 4096
    if outcome.prepared is not None:
        size += len(outcome.prepared.data)
    analysis = outcome.analysis
    if analysis is not None and analysis.keypoints is not None:
        points = analysis.keypoints
        size += (len(points.points) + len(points.descriptors) + len(points.mirror_points)
                 + len(points.mirror_descriptors))
    if analysis is not None and analysis.face_patch is not None:
        size += len(analysis.face_patch.pixels)
    return size


# --------------------------------------------------------------------------- the intake


def _run_tasks(executor: Executor, jobs: Sequence[tuple[int, UploadedFile]],
               submit: Callable[[Executor, int, UploadedFile], Future[PhotoOutcome]]
               ) -> tuple[dict[int, PhotoOutcome], list[tuple[int, UploadedFile]]]:
    """Outcomes by order, and the jobs lost to a broken process pool (a worker died, now or
    before this intake: then ``submit`` itself fails)."""
    futures: dict[int, Future[PhotoOutcome]] = {}
    lost: list[tuple[int, UploadedFile]] = []
    for order, upload in jobs:
        try:
            futures[order] = submit(executor, order, upload)
        except BrokenProcessPool:
            lost.append((order, upload))
    done: dict[int, PhotoOutcome] = {}
    uploads = dict(jobs)
    for order, future in futures.items():
        try:
            done[order] = future.result()
        except BrokenProcessPool:
            lost.append((order, uploads[order]))
        except ConfigError:
            raise  # the set-up, not the photo: one clear error for the whole intake
        except Exception:
            # A bug or a native failure on one photo must not fail the whole upload.
            logger.exception("analysing %s failed", uploads[order].name)
            done[order] = _failed(order, uploads[order].name)
    return done, lost


def _process_inline(upload: UploadedFile, *, order: int, limits: UploadLimits,
                    policy: CheckPolicy, analyzer: FaceAnalyzer) -> PhotoOutcome:
    try:
        return process_photo(upload, order=order, limits=limits, policy=policy,
                             analyzer=analyzer)
    except ConfigError:
        raise  # the set-up, not the photo: one clear error for the whole intake
    except Exception:
        # The same rule as in the pools: one photo's failure is a finding about it.
        logger.exception("analysing %s failed", upload.name)
        return _failed(order, upload.name)


def _inline(workers: int, files: Sequence[object]) -> bool:
    return workers <= 1 or len(files) <= 1


def _analyse_all(todo: Sequence[tuple[int, UploadedFile]], *, limits: UploadLimits,
                 policy: CheckPolicy, analyzer: FaceAnalyzer, factory: AnalyzerFactory | None,
                 workers: int) -> list[PhotoOutcome]:
    # Largest files first: the long tasks start early and the workers finish together.
    jobs = sorted(todo, key=lambda job: -len(job[1].data))
    if not jobs:
        return []
    if _inline(workers, jobs):
        return [_process_inline(upload, order=order, limits=limits, policy=policy,
                                analyzer=analyzer) for order, upload in jobs]
    if factory is None:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="intake") as threads:
            outcomes, _ = _run_tasks(threads, jobs, lambda ex, order, upload: ex.submit(
                process_photo, upload, order=order, limits=limits, policy=policy,
                analyzer=analyzer))
        return list(outcomes.values())

    def submit(ex: Executor, order: int, upload: UploadedFile) -> Future[PhotoOutcome]:
        return ex.submit(_work_in_worker, upload, order, limits, policy)

    outcomes = {}
    pending = list(jobs)
    for attempt in range(2):
        pool = _intake_pool(workers, factory)
        done, pending = _run_tasks(pool, pending, submit)
        outcomes.update(done)
        if not pending:
            break
        # A worker died (killed, or a native crash on some photo, maybe another upload's: the
        # pool is shared, and a dead worker fails every photo not finished): start a fresh pool
        # and try the unfinished photos once more.
        logger.warning("face-analysis worker died (attempt %d); %d photo(s) unfinished",
                       attempt + 1, len(pending))
        _drop_pool(workers, factory, pool)
    if pending:
        outcomes.update(_each_alone(pending, factory=factory, submit=submit))
    return list(outcomes.values())


def _each_alone(jobs: Sequence[tuple[int, UploadedFile]], *, factory: AnalyzerFactory,
                submit: Callable[[Executor, int, UploadedFile], Future[PhotoOutcome]]
                ) -> dict[int, PhotoOutcome]:
    """Photos whose worker died twice: one of them (or another upload's photo) may crash every
    process it is analysed in. Each is analysed alone in a process of its own, one after the
    other, so a photo is reported as failed only when it killed a process it had to itself,
    and the others are analysed as usual. Slower (one process, and a fresh one after each
    crash), but only ever after two crashes."""
    outcomes: dict[int, PhotoOutcome] = {}
    pool: ProcessPoolExecutor | None = None
    try:
        for order, upload in jobs:
            if pool is None:
                pool = _new_pool(1, factory)
            done, lost = _run_tasks(pool, [(order, upload)], submit)
            outcomes.update(done)
            if lost:
                logger.warning("%s crashed the process analysing it alone: reported as not "
                               "analysed", upload.name)
                outcomes[order] = _failed(order, upload.name)
                pool.shutdown(wait=False, cancel_futures=True)
                pool = None
    finally:
        if pool is not None:
            pool.shutdown(wait=True)
    return outcomes


def run_intake(files: Sequence[UploadedFile], *, limits: UploadLimits, policy: CheckPolicy,
               analyzer: FaceAnalyzer, factory: AnalyzerFactory | None = None,
               workers: int = 2, cache: OutcomeCache | None = None,
               cache_scope: str | None = None,
               trained: TrainedPerson | None = None) -> IntakeResult:
    """Judge and prepare a set of uploaded photos. Nothing is stored: the caller stores
    ``prepared`` when ``report.trainable``. With a ``factory`` the photos are analysed in
    worker processes, each with the analyzer it builds; else in threads with ``analyzer``.
    With a ``cache``, a photo analysed before (same name, bytes, policy, limits and analyzer)
    is not analysed again, if it was analysed for the same ``cache_scope`` (the user's id:
    one user never gets another's answer, see ``OutcomeCache``); the set checks always run.
    ``trained``: the person the user's model was trained on, whom the set is compared with.
    ``ConfigError`` (the face tools are not
    installed, say) stops the whole intake."""
    analyzer.ready()
    started = time.perf_counter()
    cpu_start = time.thread_time()
    # A file refused while reading the upload (too large for a photo, an archive) has its
    # finding already: neither analysed nor remembered (its ``data`` is empty, so its key would
    # be that of any such file of the same name).
    known: list[PhotoOutcome | None] = [
        PhotoOutcome(order=i, name=f.name, finding=f.refused) if f.refused is not None else None
        for i, f in enumerate(files)]
    keys: list[tuple[object, ...]] = []
    if cache is not None:
        keys = [cache.key(f, scope=cache_scope, policy=policy, limits=limits,
                          analyzer=analyzer) for f in files]
        known = [known[i] or cache.get(key, order=i) for i, key in enumerate(keys)]
    todo = [(i, f) for i, f in enumerate(files) if known[i] is None]
    fresh = _analyse_all(todo, limits=limits, policy=policy, analyzer=analyzer,
                         factory=factory, workers=workers)
    if cache is not None:
        for outcome in fresh:
            cache.put(keys[outcome.order], outcome)
    outcomes = sorted([*fresh, *(o for o in known if o is not None)], key=lambda o: o.order)
    failed = [o.finding for o in outcomes if o.finding is not None]
    analyses = [o.analysis for o in outcomes if o.analysis is not None]
    report = check_set(analyses, policy=policy, unreadable=len(failed), trained=trained)
    accepted = set(report.accepted)
    prepared = tuple(o.prepared for o in outcomes
                     if o.analysis is not None and o.analysis.name in accepted
                     and o.prepared is not None)
    seconds = time.perf_counter() - started
    cpu = time.thread_time() - cpu_start  # inline: everything; else submitting and set checks
    if not _inline(workers, todo):
        cpu += sum(o.cpu_seconds for o in outcomes)
    logger.info("intake of %d photo(s): %d prepared in %.2f s (%.2f s CPU)", len(files),
                len(prepared), seconds, cpu)
    return IntakeResult(images_total=len(files), prepared=prepared,
                        findings=(*failed, *report.findings), report=report,
                        analyses=tuple(analyses), seconds=seconds, cpu_seconds=cpu)


__all__ = ["ANALYSIS_FAILED", "IntakeResult", "OutcomeCache", "PhotoOutcome", "decode_side",
           "process_photo", "run_intake", "shutdown_pools", "warm_up"]
