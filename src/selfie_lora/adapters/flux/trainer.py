"""The local training backend: diffusers + peft on this machine (see ``flux_lora_train``).

With ``isolation="process"`` the training loop runs in a child process (forked from the training
fork server, ``forkserver``): a crash (or the kernel's OOM killer) takes down only the child, GPU
memory is returned when it exits, and a cancel simply terminates it. The parent never imports
torch. ``isolation="inline"`` runs the same loop in the calling thread (tests, and a worker that
wants torch loaded once).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import multiprocessing
import os
import pickle
import queue
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from selfie_lora.adapters.flux.checkpoints import latest_checkpoint
from selfie_lora.adapters.flux.forkserver import (
    ServerUse,
    TrainingProcess,
    kill_server_for,
    server_exit_code,
)
from selfie_lora.adapters.flux.generator import release_device_pipelines
from selfie_lora.adapters.flux.memory import MemoryModeSetting
from selfie_lora.adapters.flux.runtime import FAILED_MESSAGE, missing_module_error
from selfie_lora.disk_space import is_full_error, is_quota_error, machine_disk_words
from selfie_lora.domain.entities import Recipe, TrainingStatus
from selfie_lora.errors import (
    ConfigError,
    SelfieLoraError,
    StorageError,
    StorageFullError,
    TrainerError,
    TrainerUnavailableError,
    TrainingCanceledError,
    TrainingFailedError,
    TrainingInterruptedError,
    describe,
)
from selfie_lora.lifeline import exit_with
from selfie_lora.logs import LogFormat, setup_logging, training_context
from selfie_lora.services.ports import (
    CheckpointStore,
    ProgressSink,
    SampleStore,
    Telemetry,
    TrainingJob,
    TrainingPhoto,
    TrainingResult,
)
from selfie_lora.services.private_files import private_folders
from selfie_lora.services.telemetry import NullTelemetry

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "lora.safetensors"
WEIGHTS_METHOD = "local:file"
CHECKPOINT_DIR = "checkpoints"
SAMPLE_DIR = "samples"

_CANCELED_MESSAGE = "The training was canceled."
_STALLED_MESSAGE = "Training stopped responding on this server; try again."
# What reading a message half-written by a child that was killed can raise.
_BROKEN_PIPE_ERRORS = (EOFError, OSError, pickle.UnpicklingError)


# How long a child killed by SIGTERM/SIGINT waits for its worker's own stop to be seen: both are
# signalled at once by systemd's stop or a terminal's Ctrl-C, in no set order.
_STOP_SIGNAL_GRACE_S = 1.0


class _ChildDiedError(Exception):
    """The training child exited without sending a result (killed, or crashed in native code)."""

    def __init__(self, exitcode: int | None) -> None:
        super().__init__(f"exit code {exitcode}")
        self.exitcode = exitcode


class _Keeper:
    """Hands each checkpoint (or sample image) the loop writes to the job's store (when it has
    one). The child keeps only its two newest checkpoint files, so one announced earlier may be
    gone by the time the parent reads the message: a newer one follows, and that one is kept
    instead."""

    def __init__(self, store: CheckpointStore | SampleStore | None, *,
                 what: str = "checkpoint") -> None:
        self._store = store
        self._what = what

    def save(self, path: Path, step: int) -> None:
        if self._store is None:
            return
        try:
            self._store.save(path, step=step)
        except FileNotFoundError:
            logger.debug("%s %s already replaced by a newer one", self._what, path)


@dataclass(frozen=True)
class _Keepers:
    checkpoints: _Keeper
    samples: _Keeper


@dataclass(frozen=True)
class _TrainRequest:
    """Everything the training loop needs; picklable, so it can cross into a spawned child."""

    pipeline_source: str
    cache_dir: Path
    # The job's photos as they are (name, bytes, caption, face box): one record per photo, so
    # nothing has to be kept aligned on the way to the child.
    photos: tuple[TrainingPhoto, ...]
    recipe: Recipe
    out_path: Path
    device: str
    num_threads: int | None
    seed: int
    extra_metadata: dict[str, str]
    log_format: LogFormat = "text"
    memory_mode: MemoryModeSetting = "auto"
    checkpoint_dir: Path | None = None
    resume_from: Path | None = None
    sample_dir: Path | None = None


def _run(
    request: _TrainRequest,
    on_step: Callable[[int, int, float], bool],
    on_checkpoint: Callable[[Path, int], None] | None = None,
    on_sample: Callable[[Path, int], None] | None = None,
) -> dict[str, Any]:
    from selfie_lora.adapters.flux.train_loop import train_flux_lora

    return train_flux_lora(
        pipeline_source=request.pipeline_source,
        cache_dir=request.cache_dir,
        photos=[(photo.data, photo.caption) for photo in request.photos],
        photo_names=[photo.name for photo in request.photos],
        face_boxes=[photo.face_box for photo in request.photos],
        recipe=request.recipe,
        out_path=request.out_path,
        on_step=on_step,
        device=request.device,
        num_threads=request.num_threads,
        seed=request.seed,
        extra_metadata=request.extra_metadata,
        memory_mode=request.memory_mode,
        checkpoint_dir=request.checkpoint_dir,
        resume_from=request.resume_from,
        on_checkpoint=on_checkpoint,
        sample_dir=request.sample_dir,
        on_sample=on_sample,
    )


def _child_main(request: _TrainRequest, events: Any, stop: Any, parent_pid: int) -> None:
    """Entry point of the spawned child: stream steps, then one "done" or "error" message.
    ``stop`` (an Event) set by the parent: checkpoint the steps so far and stop. ``parent_pid``:
    the worker's pid, as the worker read it."""
    # Ctrl-C at a terminal reaches the whole foreground group, this child too: the parent
    # decides (a worker's stop sets ``stop``, and the steps so far are checkpointed), where a
    # KeyboardInterrupt here would fail the training and lose its checkpoints.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Likewise SIGTERM: systemd's stop (and ``kill`` of a process group) signals every process
    # of the worker, this child too, and a child that died of it failed the training for good
    # where the worker meant to hand it back; the worker's unit sets KillMode=mixed as well.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # The training's id on every line (as in the worker itself), the lifeline's too: its
    # thread starts with a copy of this context.
    with training_context(request.extra_metadata.get("training_id")):
        # A worker killed with -9 cannot stop its child: the child stops itself.
        exit_with(parent_pid)
        # The worker's log format.
        setup_logging(log_format=request.log_format)
        _child_train(request, events, stop)


def _child_train(request: _TrainRequest, events: Any, stop: Any) -> None:
    def on_step(step: int, total: int, loss: float) -> bool:
        events.put(("step", step, total, loss))
        # The loop checkpoints the steps since its last checkpoint, then raises "canceled";
        # a child that does not get there in time is terminated.
        return bool(stop.is_set())

    def on_checkpoint(path: Path, step: int) -> None:
        events.put(("checkpoint", step, str(path)))

    def on_sample(path: Path, step: int) -> None:
        events.put(("sample", step, str(path)))

    try:
        metrics = _run(request, on_step, on_checkpoint, on_sample)
    except BaseException as exc:
        if isinstance(exc, StorageFullError) or is_full_error(exc):
            # A full disk: the worker waits for room and says so once; a traceback of it at
            # every try said nothing more, so one line, with no traceback; a vendor's error in
            # the words inline isolation gives it (a quota said as one).
            full = exc if isinstance(exc, StorageFullError) else _full_disk_error(
                exc, folder=request.out_path.parent)
            # A quota in the user_message slot (the worker says a quota, not a full disk): the
            # name stays "StorageFullError", which a parent of the previous release (the fork
            # server runs new code under an old parent during an upgrade) maps to a full disk
            # ignoring that slot; a name it did not know failed the training for good.
            events.put(("error", "StorageFullError", full.message,
                        _QUOTA_USED_UP if full.quota else None, ""))
            raise SystemExit(1) from None
        user_message = exc.user_message if isinstance(exc, TrainerError) else None
        events.put(("error", type(exc).__name__, str(exc), user_message, traceback.format_exc()))
        raise SystemExit(1) from None
    events.put(("done", metrics))


_ERRORS: dict[str, type[TrainerError]] = {
    "TrainingFailedError": TrainingFailedError,
    "TrainingCanceledError": TrainingCanceledError,
    "TrainerUnavailableError": TrainerUnavailableError,
    "WeightsNotFoundError": TrainingFailedError,
}


# The user_message slot of a child's "StorageFullError" message for a quota (``quota``), which
# its text alone does not carry.
_QUOTA_USED_UP = "quota"


def _full_disk_error(exc: BaseException, *, folder: Path) -> StorageFullError:
    """A vendor's full-disk error ``exc`` (a quota said as one, on the disk of the file it
    names, else of ``folder``, the job's work folder)."""
    return StorageFullError(f"{machine_disk_words(exc, folder)}: {describe(exc)}",
                            quota=is_quota_error(exc))


def _unmapped_error(exc: BaseException, *, folder: Path) -> TrainerError | StorageFullError:
    """A vendor error that reached the trainer's boundary in inline isolation, mapped as
    ``_child_error`` maps the one a child reports; ``folder``: the job's work folder."""
    if is_full_error(exc):
        return _full_disk_error(exc, folder=folder)
    if isinstance(exc, ImportError):
        return _config_error(missing_module_error(describe(exc)))
    return TrainingFailedError(f"local training failed: {describe(exc)}",
                               user_message=FAILED_MESSAGE)


def _config_error(exc: ConfigError) -> TrainerUnavailableError:
    return TrainerUnavailableError(
        f"local trainer misconfigured: {exc.message}",
        user_message="The local trainer is not set up correctly on this server; "
        "contact the operator.",
    )


_DEV = Path("/dev")


def _fork_server_fits(device: str) -> bool:
    """Whether a training child comes from the training fork server: under Linux, training on
    the CPU. Elsewhere it is spawned and imports torch itself: a CUDA child forked from a process
    that imported torch is unchecked (a CUDA query there, ``torch.cuda.is_available()`` among
    them, leaves forks that cannot initialize CUDA), and macOS forks badly."""
    if not sys.platform.startswith("linux"):
        return False
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return False
    if device == "cpu":
        return True
    # NVIDIA's, ROCm's, and WSL2's (CUDA under WSL2 has no /dev/nvidia<N>). Nodes that the
    # driver makes only at a first CUDA use (no persistence daemon) are missed: the server's
    # preload queries CUDA through NVML only (``preload``), which leaves its forks usable.
    gpus = [*_DEV.glob("nvidia[0-9]*"), _DEV / "kfd", _DEV / "dxg"]
    return device == "auto" and not any(path.exists() for path in gpus)


class _Reporter:
    """Forwards steps to the sink, at most every ``interval`` seconds (plus the first and last),
    and asks the sink about cancellation at the same pace (each may cost a database round trip)."""

    def __init__(self, sink: ProgressSink, *, interval: float) -> None:
        self._sink = sink
        self._interval = interval
        self._last_report = -math.inf
        self._last_step = -1
        self._last_cancel_check = -math.inf
        # The newest step not reported yet (held back by the interval): what ``flush`` sends.
        self._pending: tuple[int, int, float] | None = None

    def step(self, step: int, total: int, loss: float) -> None:
        now = time.monotonic()
        if step <= self._last_step:
            return  # never report backwards
        due = now - self._last_report >= self._interval
        if due or step in (0, total):
            self._report(step, total, loss)
            self._last_report = now
        else:
            self._pending = (step, total, loss)

    def flush(self) -> None:
        """Report the newest step held back, if any: a run that stops (canceled, handed back)
        shows the step it stopped at, which is the step of the checkpoint it kept."""
        if self._pending is not None and self._pending[0] > self._last_step:
            self._report(*self._pending)

    def restarted(self) -> None:
        """A new child resumes from the newest checkpoint, behind the steps the dead one made:
        the step the dead one held back is dropped, so a later ``flush`` never reports a step
        that no living child made (past the checkpoint the new child keeps). The steps already
        reported stay: the row's step never goes back."""
        self._pending = None

    def _report(self, step: int, total: int, loss: float) -> None:
        self._sink.progress(
            status=TrainingStatus.PROCESSING,
            step=step,
            total=total,
            loss=None if math.isnan(loss) else loss,
        )
        self._last_step = step
        self._pending = None

    def interrupted(self) -> bool:
        return self._sink.interrupted()  # a flag in memory: cheap, asked every poll

    def cancel_requested(self, *, force: bool = False) -> bool:
        now = time.monotonic()
        if not force and now - self._last_cancel_check < self._interval:
            return False
        self._last_cancel_check = now
        return self._sink.cancel_requested()


class LocalTrainer:
    """Trains a FLUX LoRA with diffusers + peft on this machine (``backend = "local"``).

    ``base_model`` is ``"tiny"`` or a FLUX.1 diffusers folder; the tiny model is built under
    ``cache_dir``. ``device`` "auto" picks CUDA when present. ``num_threads`` caps torch's CPU
    threads. Progress and cancel checks go to the sink at most every ``progress_interval_s``.
    ``memory_mode`` (``auto``, ``bf16``, ``int8``, ``nf4``): how the frozen base is stored.

    Checkpoints (every ``recipe.checkpoint_every`` steps) are written under the job's work dir and
    handed to ``job.checkpoints``; a job with ``resume_from`` continues from that checkpoint. A
    training child that dies after a new checkpoint is started again from it, at most
    ``max_restarts`` times. A canceled training, or one handed back by a stopping worker, first
    checkpoints the steps since its last checkpoint (the child gets ``stop_grace_s`` for it).
    A child that sends nothing (no step, checkpoint or sample) for ``stall_timeout_s`` is stuck
    (I/O on a model folder that does not answer, a driver deadlock): it is wound down like a
    canceled one and the training fails; in ``inline`` isolation nothing can watch the loop.
    """

    backend = "local"

    def __init__(
        self,
        *,
        base_model: str,
        cache_dir: Path,
        isolation: Literal["process", "inline"] = "process",
        device: str = "auto",
        num_threads: int | None = None,
        progress_interval_s: float = 0.5,
        poll_interval_s: float = 0.1,
        log_format: LogFormat = "text",
        memory_mode: MemoryModeSetting = "auto",
        max_restarts: int = 3,
        stop_grace_s: float = 30.0,
        stall_timeout_s: float = 1800.0,
        telemetry: Telemetry | None = None,
    ) -> None:
        if isolation not in ("process", "inline"):
            raise ConfigError(f"isolation must be 'process' or 'inline', not {isolation!r}")
        self.base_model = base_model
        self.cache_dir = cache_dir
        self.isolation = isolation
        self.device = device
        self.num_threads = num_threads
        self.progress_interval_s = progress_interval_s
        self.poll_interval_s = poll_interval_s
        self.log_format: LogFormat = log_format
        self.memory_mode: MemoryModeSetting = memory_mode
        self.max_restarts = max_restarts
        self.stop_grace_s = stop_grace_s
        self.stall_timeout_s = stall_timeout_s
        # Counts each child started again (an operator's alert on children dying, before
        # trainings fail of it).
        self._telemetry: Telemetry = telemetry or NullTelemetry()

    def cancel_remote(self, remote_id: str) -> None:
        """Nothing runs remotely: a training's child process ends with its worker."""
        del remote_id

    def find_remote(
        self, *, training_id: str, destination: str, marker: str | None = None
    ) -> str | None:
        """Nothing runs remotely: there is never a run to find."""
        del training_id, destination, marker
        return None

    def train(self, job: TrainingJob, *, sink: ProgressSink) -> TrainingResult:
        private_folders(job.work_dir)
        out_path = job.work_dir / WEIGHTS_FILE
        checkpoint_dir = job.work_dir / CHECKPOINT_DIR
        request = _TrainRequest(
            pipeline_source=self.base_model,
            cache_dir=self.cache_dir,
            photos=job.photos,
            recipe=job.recipe,
            out_path=out_path,
            device=self.device,
            num_threads=self.num_threads,
            seed=job.recipe.seed,
            extra_metadata={
                "trainer_version": job.trainer_version,
                "trigger_word": job.trigger_word,
                "training_id": job.training_id,
            },
            log_format=self.log_format,
            memory_mode=self.memory_mode,
            checkpoint_dir=checkpoint_dir,
            resume_from=job.resume_from or latest_checkpoint(checkpoint_dir),
            # Samples only for a job that keeps them: nobody would see them otherwise.
            sample_dir=job.work_dir / SAMPLE_DIR if job.samples is not None else None,
        )
        # Memory modes: the generator's GPU pipeline (this process) makes room for the training;
        # the next generation reloads it.
        release_device_pipelines()
        sink.started(remote_id=None)
        reporter = _Reporter(sink, interval=self.progress_interval_s)
        logger.info(
            "local training %s: %d photos, recipe %s, %s isolation",
            job.training_id,
            len(job.photos),
            job.recipe.name,
            self.isolation,
        )
        keep = _Keepers(checkpoints=_Keeper(job.checkpoints),
                        samples=_Keeper(job.samples, what="sample"))
        if self.isolation == "inline":
            metrics = self._train_inline(request, reporter, keep)
        else:
            metrics = self._train_restarting(request, reporter, keep, job_id=job.training_id)
        if not out_path.is_file():
            raise TrainingFailedError(
                f"training {job.training_id} ended without writing {out_path}",
                user_message="Training finished but produced no model; try again.",
            )
        return TrainingResult(
            weights_path=out_path,
            weights_method=WEIGHTS_METHOD,
            metrics={
                key: metrics[key]
                for key in (
                    "first_loss",
                    "final_loss",
                    "steps",
                    "steps_run",
                    "seconds",
                    "device",
                    "step_seconds",
                    "eval_loss_before",
                    "eval_loss_after",
                    "resolution",
                    "buckets",
                    "memory_mode",
                    "resumed_from_step",
                )
                if key in metrics
            },
        )

    # ------------------------------------------------------------------ inline

    def _train_inline(
        self, request: _TrainRequest, reporter: _Reporter, keep: _Keepers
    ) -> dict[str, Any]:
        def on_step(step: int, total: int, loss: float) -> bool:
            reporter.step(step, total, loss)
            return reporter.interrupted() or reporter.cancel_requested(force=step == 0)

        try:
            return _run(request, on_step, keep.checkpoints.save, keep.samples.save)
        except ConfigError as exc:
            raise _config_error(exc) from exc
        except TrainingCanceledError:
            reporter.flush()  # the step it stopped at: that of the checkpoint it kept
            if reporter.interrupted():  # stopped for the worker's sake, not the user's
                raise TrainingInterruptedError("the worker stops; training handed back") from None
            raise
        except SelfieLoraError:
            raise
        except Exception as exc:
            # The loop maps what torch, diffusers and peft raise; what escapes it (importing the
            # loop itself) is mapped here as the child's error is in process isolation, so that
            # the worker never sees a vendor error.
            raise _unmapped_error(exc, folder=request.out_path.parent) from exc

    # ------------------------------------------------------------------ child process

    def _train_restarting(
        self, request: _TrainRequest, reporter: _Reporter, keep: _Keepers, *, job_id: str
    ) -> dict[str, Any]:
        """Run the child; when it dies without a word (killed, a crash in native code) after
        writing a checkpoint newer than the one it started from, start a new child from that
        checkpoint, at most ``max_restarts`` times. A child that dies before making progress
        is not restarted: it would most likely die the same way again."""
        restarts = 0
        while True:
            try:
                return self._train_in_child(request, reporter, keep, job_id=job_id)
            except _ChildDiedError as died:
                if self._stopping(reporter, died):
                    # Never failed, nor started again, while the worker stops: handed back,
                    # the next attempt resumes from the newest checkpoint kept.
                    raise TrainingInterruptedError(
                        f"training {job_id}: its process ended (exit code {died.exitcode}) "
                        "while the worker stops") from None
                newest = (latest_checkpoint(request.checkpoint_dir)
                          if request.checkpoint_dir is not None else None)
                if (restarts >= self.max_restarts or newest is None
                        or newest == request.resume_from):
                    raise TrainingFailedError(
                        f"training process for {job_id} exited with code {died.exitcode} "
                        "without a result",
                        user_message="Training stopped unexpectedly on this server (it may have "
                        "run out of memory); try again.",
                    ) from None
                restarts += 1
                self._telemetry.trainer_restarted(backend=self.backend)
                logger.warning("training %s: its process died (exit code %s); restarting it "
                               "from %s (restart %d of %d)", job_id, died.exitcode, newest.name,
                               restarts, self.max_restarts)
                request = dataclasses.replace(request, resume_from=newest)
                reporter.restarted()

    @staticmethod
    def _stopping(reporter: _Reporter, died: _ChildDiedError) -> bool:
        """Whether the worker stops, the child's death being part of that stop. A child killed
        by SIGTERM or SIGINT (before it could ignore them, or sent by hand) while the worker's
        own signal is still on its way: that signal is given a moment to land."""
        if reporter.interrupted():
            return True
        if died.exitcode not in (-signal.SIGTERM, -signal.SIGINT):
            return False
        deadline = time.monotonic() + _STOP_SIGNAL_GRACE_S
        while time.monotonic() < deadline:
            time.sleep(0.05)
            if reporter.interrupted():
                return True
        return False

    def _train_in_child(
        self, request: _TrainRequest, reporter: _Reporter, keep: _Keepers, *, job_id: str
    ) -> dict[str, Any]:
        # Not a fork of this process, which may hold threads (and, in a worker, a loaded torch
        # or CUDA context): a fork of the clean single-threaded training fork server, torch and
        # the rest imported there once; or spawned, importing them itself (_fork_server_fits).
        context: Any
        if _fork_server_fits(self.device):
            context = multiprocessing.get_context("forkserver")  # its queues and events
            make: Any = TrainingProcess
        else:
            context = multiprocessing.get_context("spawn")
            make = context.Process
        events: Any = context.Queue()
        stop: Any = context.Event()
        process = make(
            target=_child_main,
            args=(request, events, stop, os.getpid()),
            name=f"selfie-lora-train-{job_id}",
            # Never outlive the worker; but a daemonic worker process may not have daemonic
            # children, and there the finally clause below is what stops the child.
            daemon=not multiprocessing.current_process().daemon,
        )
        use = ServerUse() if make is TrainingProcess else None

        def release() -> None:
            events.close()
            if use is not None:
                use.release()

        self._start(process, reporter, use=use, job_id=job_id, release=release)
        logger.info("training %s runs in child process %s", job_id, process.pid)
        # The heartbeat renews the worker's lease for as long as this loop runs, so a child that
        # is alive but stuck would hold the training (and the worker) forever: what it last sent
        # is the only sign of progress there is.
        last_heard = time.monotonic()
        # Whether the child reported a step (its first, once the model is loaded): before
        # that a stop has nothing to checkpoint and does not wait for the child.
        stepped = False
        try:
            while True:
                message = self._next_message(events, process)
                if message is not None:
                    last_heard = time.monotonic()
                    kind = message[0]
                    if kind == "step":
                        _, step, total, loss = message
                        stepped = True
                        reporter.step(step, total, loss)
                    elif kind == "checkpoint":
                        _, step, path = message
                        keep.checkpoints.save(Path(path), step)
                    elif kind == "sample":
                        _, step, path = message
                        keep.samples.save(Path(path), step)
                    elif kind == "done":
                        done: dict[str, Any] = message[1]
                        return done
                    elif kind == "error":
                        raise self._child_error(message)
                elif not process.is_alive():
                    process.join()
                    raise _ChildDiedError(process.exitcode)
                elif time.monotonic() - last_heard > self.stall_timeout_s:
                    logger.warning("training %s: child %s sent nothing for %.0f s; stopping it",
                                   job_id, process.pid, self.stall_timeout_s)
                    # Asked to stop as a canceled one is: a child slow rather than stuck may
                    # still checkpoint, or finish (its LoRA is then kept, not thrown away).
                    finished = self._wind_down(events, process, stop, keep, reporter,
                                               stepped=stepped)
                    if finished is not None:
                        return finished
                    raise TrainingFailedError(
                        f"training {job_id}: its process {process.pid} made no progress for "
                        f"{self.stall_timeout_s:.0f} s (SELFIE_LORA_LOCAL_STALL_SECONDS)",
                        user_message=_STALLED_MESSAGE)
                if reporter.interrupted():
                    logger.info("training %s handed back: stopping child %s", job_id,
                                process.pid)
                    finished = self._wind_down(events, process, stop, keep, reporter,
                                               stepped=stepped)
                    if finished is not None:
                        return finished
                    raise TrainingInterruptedError(f"training {job_id}: the worker stops")
                if reporter.cancel_requested():
                    logger.info("training %s canceled: stopping child %s", job_id, process.pid)
                    finished = self._wind_down(events, process, stop, keep, reporter,
                                               stepped=stepped)
                    if finished is not None:
                        return finished
                    raise TrainingCanceledError(
                        f"training {job_id} canceled", user_message=_CANCELED_MESSAGE
                    )
        finally:
            self._stop(process)
            release()

    def _start(self, process: Any, reporter: _Reporter, *, use: ServerUse | None, job_id: str,
               release: Callable[[], None]) -> None:
        """Start the child. The fork server's first start waits for its preload (tens of
        seconds; for ever, should an import hang), so the start runs in a thread of its own
        while the worker's stop, a cancel and the stall timeout are watched as during the
        training. Any of them kills the server, which ends the start, when no other training
        uses it (``use``: forked from it; None: spawned); otherwise the start is left to end in
        the background, where the child it forks is stopped. On an error ``release`` is called
        (closing the child's queue, ending the ``use``), once the start has ended."""
        failed: list[BaseException] = []
        lock = threading.Lock()
        abandoned = ended = False

        def start() -> None:
            nonlocal ended
            try:
                process.start()
            except BaseException as exc:  # handed to the training's thread
                failed.append(exc)
            if use is not None and not failed:
                use.started()
            with lock:
                ended = True
                if not abandoned:
                    return
            if not failed:
                self._stop(process)
            release()

        starter = threading.Thread(target=start, name=f"start-{job_id}", daemon=True)
        began = time.monotonic()
        starter.start()
        error: SelfieLoraError | None = None
        stalled: str | None = None
        try:
            while starter.is_alive():
                starter.join(timeout=self.poll_interval_s)
                if not starter.is_alive():
                    break
                if error is None:
                    if reporter.interrupted():
                        error = TrainingInterruptedError(
                            f"training {job_id}: the worker stops while its process starts")
                    elif reporter.cancel_requested():
                        error = TrainingCanceledError(f"training {job_id} canceled",
                                                      user_message=_CANCELED_MESSAGE)
                    elif time.monotonic() - began > self.stall_timeout_s:
                        stalled = (f"training {job_id}: its process did not start within "
                                   f"{self.stall_timeout_s:.0f} s "
                                   "(SELFIE_LORA_LOCAL_STALL_SECONDS)")
                        error = TrainingFailedError(stalled, user_message=_STALLED_MESSAGE)
                    if error is not None and use is not None:
                        logger.warning("training %s: its process is still starting: %s", job_id,
                                       error)
                if error is None or use is None:
                    continue
                # Again at every poll until the start ends: a kill before the start had started
                # the server (or while it replaced a dead one) missed it, and waiting on without
                # another left the worker's thread waiting for ever on a hung preload.
                if kill_server_for(use, stalled=stalled):
                    continue
                with lock:
                    abandoned = not ended
                if abandoned:
                    break
        except BaseException:  # this thread's own (a KeyboardInterrupt): as an abandon
            with lock:
                abandoned = not ended
            if abandoned and use is not None:
                use.abandon()
            elif not abandoned:
                if not failed:
                    self._stop(process)
                release()
            raise
        if abandoned and use is not None and error is not None:
            use.abandon()
            logger.warning("training %s: the training fork server is shared with other "
                           "trainings: its start is left to end on its own", job_id)
            raise error
        if error is not None:
            if not failed:
                self._stop(process)  # forked just before the server was killed
            release()
            raise error
        if not failed:
            return
        release()
        exc = failed[0]
        if not isinstance(exc, (EOFError, OSError)):
            raise exc
        if use is not None and use.killed_for is not None:
            # Another training's start stalled on the same preload and killed the server.
            raise TrainingFailedError(f"training {job_id}: its process did not start: "
                                      f"{use.killed_for}", user_message=_STALLED_MESSAGE)
        # The fork server died before it forked the child (during its preload: the OOM
        # killer, a crash in a native import, a signal): the child died, as a spawned one
        # that died in its imports did, and is handed back when the worker stops.
        exitcode = server_exit_code() if use is not None else None
        logger.warning("training %s: its process could not start (%s: %s; fork server's "
                       "exit code %s)", job_id, type(exc).__name__, exc, exitcode)
        raise _ChildDiedError(exitcode) from None

    def _wind_down(self, events: Any, process: Any, stop: Any, keep: _Keepers,
                   reporter: _Reporter, *, stepped: bool = True) -> dict[str, Any] | None:
        """Ask the child to stop at its next step, keeping the checkpoint it writes of the steps
        since its last one, for up to ``stop_grace_s``; the caller then kills it (a child
        still loading the model, or stuck, loses only what a kill would have lost).

        Returns the child's metrics when it finished instead (asked at its last step, or while
        it evaluated and saved the LoRA): the run is done and its LoRA written, and throwing it
        away would make the next attempt train again from the last checkpoint.

        The steps the child makes meanwhile are reported, the last one whatever the interval:
        the row then shows the step it stopped at, the checkpoint's, not one some steps before.

        A child that has not ``stepped`` yet is still loading the model (minutes for FLUX.1):
        it has nothing to checkpoint, so it is not waited for: the caller's ``_stop`` kills it
        at once (SIGKILL: it ignores SIGTERM, which the worker's stop sends its whole group)."""
        if not stepped:
            logger.info("training child %s is still loading the model: nothing to keep, "
                        "ending it now", process.pid)
            return None
        stop.set()
        try:
            return self._await_stop(events, process, keep, reporter)
        finally:
            reporter.flush()

    def _await_stop(self, events: Any, process: Any, keep: _Keepers,
                    reporter: _Reporter) -> dict[str, Any] | None:
        deadline = time.monotonic() + self.stop_grace_s
        while time.monotonic() < deadline:
            message = self._next_message(events, process)
            if message is None:
                if not process.is_alive():
                    return None
                continue
            if message[0] == "step":
                _, step, total, loss = message
                reporter.step(step, total, loss)
            elif message[0] == "checkpoint":
                _, step, path = message
                keep.checkpoints.save(Path(path), step)
            elif message[0] == "done":
                logger.info("training child %s finished before it could stop", process.pid)
                done: dict[str, Any] = message[1]
                return done
            elif message[0] == "error":
                return None  # stopped ("canceled"), or failed: nothing more will come
        logger.warning("training child %s did not stop within %.0f s: killing it",
                       process.pid, self.stop_grace_s)
        return None

    def _next_message(self, events: Any, process: Any) -> tuple[Any, ...] | None:
        try:
            message: tuple[Any, ...] = events.get(timeout=self.poll_interval_s)
        except queue.Empty:
            if process.is_alive():
                return None
            # The child is gone: whatever it sent is already in the pipe, give it a moment.
            try:
                message = events.get(timeout=1.0)
            except queue.Empty:
                return None
            except _BROKEN_PIPE_ERRORS:
                return None  # killed mid-message: reported as a crash by the caller
        except _BROKEN_PIPE_ERRORS:
            return None
        return message

    @staticmethod
    def _child_error(message: tuple[Any, ...]) -> TrainerError | StorageError:
        _, name, text, user_message, child_traceback = message
        if name == "StorageFullError":
            # The worker says a full disk once an outage, not at every try: one line here.
            logger.debug("training child stopped, its disk full (or its quota used up): %s", text)
            return StorageFullError(text, quota=user_message == _QUOTA_USED_UP)
        logger.warning("training child failed: %s: %s\n%s", name, text, child_traceback)
        if name == "StorageError":
            # This machine's disk (the LoRA could not be written): raised as it is inline, so
            # the worker steps away with the training's checkpoints kept.
            return StorageError(text)
        if name == "ConfigError":
            return _config_error(ConfigError(text))
        if name in ("ImportError", "ModuleNotFoundError"):
            return _config_error(missing_module_error(f"{name}: {text}"))
        # One of ours already says what failed, as the same error does inline; only another
        # error's text needs its kind in front ("KeyError: 'x'").
        if name not in _ERRORS:
            return TrainingFailedError(f"local training failed: {name}: {text}",
                                       user_message=user_message or FAILED_MESSAGE)
        return _ERRORS[name](text, user_message=user_message or FAILED_MESSAGE)

    @staticmethod
    def _stop(process: Any) -> None:
        # Straight to SIGKILL: the child ignores SIGTERM (``_child_main``), so a terminate()
        # only added a 10 s wait to every stop. By here the child has ended, or was given its
        # chance to stop at a step and checkpoint (``_wind_down``).
        if process.is_alive():
            process.kill()
        process.join(timeout=10)
