"""Checkpoints of the local trainer, for real on the tiny FLUX: a run stopped at a random step and
resumed from its last checkpoint ends with the LoRA of a run never stopped, and a training child
killed mid-run is started again from its checkpoint and ends with the full step count.

The steps at which runs stop are drawn from a seed; try others with
``SELFIE_LORA_CHECKPOINT_SEED=<n>`` (a failure prints the seed it ran with).
"""

from __future__ import annotations

import errno
import io
import math
import os
import random
import re
import shutil
import signal
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest

from selfie_lora.domain.entities import Recipe, TrainingStatus
from selfie_lora.errors import (
    StorageError,
    TrainerError,
    TrainingCanceledError,
    TrainingInterruptedError,
)
from selfie_lora.services.ports import TrainingJob, TrainingResult
from tests.integration.test_local_backend import RECIPE, FakeSink, _job

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("peft")

from safetensors.torch import load_file  # noqa: E402

from selfie_lora.adapters.flux.checkpoints import step_of  # noqa: E402
from selfie_lora.adapters.flux.trainer import LocalTrainer  # noqa: E402

pytestmark = pytest.mark.slow

SEED = int(os.environ.get("SELFIE_LORA_CHECKPOINT_SEED", "20261204"))
SHORT = replace(RECIPE, steps=20, checkpoint_every=4)


@dataclass
class KeptCheckpoints:
    """A ``CheckpointStore`` that copies each checkpoint into a folder (the blob store's part)."""

    folder: Path
    steps: list[int] = field(default_factory=list)

    def save(self, path: Path, *, step: int) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, self.folder / path.name)
        self.steps.append(step)

    def newest(self) -> Path:
        return max(self.folder.iterdir(), key=lambda p: step_of(p) or 0)


def _trainer(cache_dir: Path, isolation: str) -> LocalTrainer:
    return LocalTrainer(base_model="tiny", cache_dir=cache_dir, isolation=isolation,  # type: ignore[arg-type]
                        device="cpu", num_threads=1, progress_interval_s=0.0)


def _close(a: Path, b: Path) -> None:
    first, second = load_file(str(a)), load_file(str(b))
    assert first.keys() == second.keys()
    for key in first:
        assert torch.allclose(first[key], second[key], rtol=1e-5, atol=1e-7), key


@pytest.fixture(scope="module")
def uninterrupted(shared_model_cache: Path,
                  tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The reference: one inline run of SHORT, never stopped."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    kept = KeptCheckpoints(tmp / "kept")
    sink = FakeSink()
    result = _trainer(shared_model_cache, "inline").train(
        replace(_job(tmp, SHORT), checkpoints=kept), sink=sink)
    return {"result": result, "sink": sink, "kept": kept}


def test_an_uninterrupted_run_checkpoints_every_n_steps_but_the_last(
        uninterrupted: dict[str, Any]) -> None:
    assert uninterrupted["kept"].steps == [4, 8, 12, 16]
    assert uninterrupted["result"].metrics["resumed_from_step"] == 0
    assert uninterrupted["result"].metrics["steps_run"] == SHORT.steps
    # The loop keeps its two newest files only.
    work = uninterrupted["result"].weights_path.parent / "checkpoints"
    assert sorted(p.name for p in work.iterdir()) == ["step-00000012.ckpt", "step-00000016.ckpt"]


def stopped_and_resumed(trainer: LocalTrainer, job: Callable[[Path], TrainingJob], *,
                        recipe: Recipe, tmp_path: Path) -> tuple[TrainingResult, FakeSink, int]:
    """Run ``job`` until a seeded random step after its first checkpoint, then resume it from its
    newest checkpoint in a fresh work dir: (the result, the resumed run's sink, its start)."""
    stop_at = random.Random(SEED).randrange(recipe.checkpoint_every + 1, recipe.steps)
    kept = KeptCheckpoints(tmp_path / "kept")
    with pytest.raises(TrainingInterruptedError):
        trainer.train(replace(job(tmp_path / "first"), checkpoints=kept),
                      sink=FakeSink(interrupt_after=stop_at))
    newest = kept.newest()
    at = step_of(newest)
    # Stopped between two checkpoints, it first checkpointed the steps since the last one.
    assert at == stop_at, f"seed {SEED}"

    # Another machine: a fresh work dir, only the kept checkpoint.
    sink = FakeSink()
    result = trainer.train(replace(job(tmp_path / "second"), resume_from=newest), sink=sink)
    assert result.metrics["resumed_from_step"] == at
    # Its seconds are for the steps it made, not the training's (old code: no steps_run, and
    # the figures read 'steps 20' beside the time of 20 - at).
    assert result.metrics["steps_run"] == recipe.steps - at
    return result, sink, at


def test_a_run_resumed_from_its_checkpoint_ends_as_if_never_stopped(
        shared_model_cache: Path, tmp_path: Path, uninterrupted: dict[str, Any]) -> None:
    result, sink, at = stopped_and_resumed(
        _trainer(shared_model_cache, "inline"), lambda path: _job(path, SHORT), recipe=SHORT,
        tmp_path=tmp_path)
    assert result.metrics["steps"] == SHORT.steps
    steps = [step for _, step, _, _ in sink.steps]
    assert steps == list(range(at, SHORT.steps + 1)), f"seed {SEED}"
    # The losses of the resumed steps are the uninterrupted run's, step for step.
    reference = {step: loss for _, step, _, loss in uninterrupted["sink"].steps}
    for _, step, _, loss in sink.steps[1:]:
        assert math.isclose(loss, reference[step], rel_tol=1e-5), (step, f"seed {SEED}")
    _close(result.weights_path, uninterrupted["result"].weights_path)
    assert result.metrics["first_loss"] == uninterrupted["result"].metrics["first_loss"]


def test_a_checkpoint_of_another_run_is_ignored(
        shared_model_cache: Path, tmp_path: Path, uninterrupted: dict[str, Any]) -> None:
    newest = uninterrupted["kept"].newest()
    other = replace(SHORT, learning_rate=SHORT.learning_rate / 2)
    sink = FakeSink()
    result = _trainer(shared_model_cache, "inline").train(
        replace(_job(tmp_path, other), resume_from=newest), sink=sink)
    assert result.metrics["resumed_from_step"] == 0  # started over
    assert sink.steps[0][1] == 0


def test_a_checkpoint_made_on_another_base_is_ignored(
        shared_model_cache: Path, tmp_path: Path, uninterrupted: dict[str, Any],
        caplog: pytest.LogCaptureFixture) -> None:
    """The LoRA's shapes are the same, but its steps are not: a checkpoint made on the
    unquantized tiny base is not resumed on an nf4 one (``auto`` may choose another mode on
    another attempt), nor on another base model folder with the same layout."""
    pytest.importorskip("torchao")
    from selfie_lora.adapters.flux import tiny

    newest = uninterrupted["kept"].newest()
    assert uninterrupted["result"].metrics["memory_mode"] == "bf16"
    nf4 = LocalTrainer(base_model="tiny", cache_dir=shared_model_cache, isolation="inline",
                       device="cpu", num_threads=1, progress_interval_s=0.0, memory_mode="nf4")
    with caplog.at_level("WARNING", logger="selfie_lora.adapters.flux.checkpoints"):
        result = nf4.train(replace(_job(tmp_path / "nf4", SHORT), resume_from=newest),
                           sink=FakeSink())
    assert result.metrics["resumed_from_step"] == 0  # started over
    assert result.metrics["memory_mode"] == "nf4"
    assert "memory_mode: 'bf16', not 'nf4'" in caplog.text

    other = tmp_path / "other-base"
    tiny.build_tiny_pipeline(seed=tiny.TINY_SEED + 1).save_pretrained(str(other))
    caplog.clear()
    with caplog.at_level("WARNING", logger="selfie_lora.adapters.flux.checkpoints"):
        result = LocalTrainer(base_model=str(other), cache_dir=shared_model_cache,
                              isolation="inline", device="cpu", num_threads=1,
                              progress_interval_s=0.0).train(
            replace(_job(tmp_path / "other", SHORT), resume_from=newest), sink=FakeSink())
    assert result.metrics["resumed_from_step"] == 0
    assert "base_model: 'tiny-flux-v1', not 'sha256:" in caplog.text


class KillingSink(FakeSink):
    """Kills the training child (SIGKILL) once the parent hears of step ``kill_at``."""

    def __init__(self, kill_at: int) -> None:
        super().__init__()
        self.kill_at = kill_at
        self.killed: int | None = None

    def progress(self, *, status: TrainingStatus, step: int, total: int,
                 loss: float | None = None) -> None:
        super().progress(status=status, step=step, total=total, loss=loss)
        if self.killed is None and step >= self.kill_at:
            import multiprocessing

            (child,) = [p for p in multiprocessing.active_children()
                        if p.name.startswith("selfie-lora-train-")]
            assert child.pid is not None
            os.kill(child.pid, signal.SIGKILL)
            self.killed = child.pid


def test_a_killed_training_child_restarts_from_its_last_checkpoint(
        shared_model_cache: Path, tmp_path: Path, uninterrupted: dict[str, Any]) -> None:
    kill_at = random.Random(SEED + 1).randrange(SHORT.checkpoint_every + 1, SHORT.steps)
    kept = KeptCheckpoints(tmp_path / "kept")
    sink = KillingSink(kill_at)
    result = _trainer(shared_model_cache, "process").train(
        replace(_job(tmp_path, SHORT), checkpoints=kept), sink=sink)
    assert sink.killed is not None, f"seed {SEED}"
    resumed = result.metrics["resumed_from_step"]
    assert SHORT.checkpoint_every <= resumed < SHORT.steps, f"seed {SEED}"
    assert resumed % SHORT.checkpoint_every == 0
    steps = [step for _, step, _, _ in sink.steps]
    assert steps == sorted(set(steps))
    assert steps[-1] == SHORT.steps
    assert result.metrics["steps"] == SHORT.steps
    _close(result.weights_path, uninterrupted["result"].weights_path)
    assert kept.steps[-1] == 16  # the restarted child went on checkpointing


def test_a_canceled_training_child_checkpoints_its_steps_before_it_stops(
        shared_model_cache: Path, tmp_path: Path, uninterrupted: dict[str, Any]) -> None:
    """A cancel between two checkpoints loses no steps: the child checkpoints the steps since
    its last checkpoint and stops, and a resume from it ends as the uninterrupted run."""
    cancel_at = random.Random(SEED + 2).randrange(SHORT.checkpoint_every + 1, SHORT.steps)
    if cancel_at % SHORT.checkpoint_every == 0:
        cancel_at += 1
    kept = KeptCheckpoints(tmp_path / "kept")
    sink = FakeSink(cancel_after=cancel_at)
    with pytest.raises(TrainingCanceledError):
        _trainer(shared_model_cache, "process").train(
            replace(_job(tmp_path / "first", SHORT), checkpoints=kept), sink=sink)
    # The parent sees the cancel a step or two after the child reports cancel_at.
    stopped = kept.steps[-1]
    assert cancel_at <= stopped < SHORT.steps, f"seed {SEED}"
    resumed = _trainer(shared_model_cache, "inline").train(
        replace(_job(tmp_path / "second", SHORT), resume_from=kept.newest()), sink=FakeSink())
    assert resumed.metrics["resumed_from_step"] == stopped
    _close(resumed.weights_path, uninterrupted["result"].weights_path)


@pytest.mark.parametrize("isolation", ["inline", "process"])
@pytest.mark.parametrize("stop", ["interrupt", "cancel"])
def test_a_stop_at_the_last_step_keeps_the_finished_run(
        shared_model_cache: Path, tmp_path: Path, uninterrupted: dict[str, Any],
        isolation: str, stop: str) -> None:
    """Asked to stop after the last step (inline: on_step(total) says so; a child: the parent
    hears of it while the child evaluates and saves), the run is done: it ends with its LoRA, and
    no attempt trains its steps since the last checkpoint again."""
    sink = (FakeSink(interrupt_after=SHORT.steps) if stop == "interrupt"
            else FakeSink(cancel_after=SHORT.steps))
    kept = KeptCheckpoints(tmp_path / "kept")
    result = _trainer(shared_model_cache, isolation).train(
        replace(_job(tmp_path, SHORT), checkpoints=kept), sink=sink)
    assert result.weights_path.is_file()
    assert result.metrics["steps"] == SHORT.steps
    assert result.metrics["resumed_from_step"] == 0
    assert kept.steps == [4, 8, 12, 16]  # no checkpoint at the last step: the LoRA is the result
    _close(result.weights_path, uninterrupted["result"].weights_path)


def test_a_run_on_a_quantized_base_resumes_as_well(shared_model_cache: Path,
                                                   tmp_path: Path) -> None:
    """The checkpoint holds the LoRA and the optimizer only: on an int8 base (a 24 GB card's
    mode) a resumed run ends as the uninterrupted one too."""
    pytest.importorskip("torchao")
    recipe = replace(SHORT, steps=10)
    trainer = LocalTrainer(base_model="tiny", cache_dir=shared_model_cache, isolation="inline",
                           device="cpu", num_threads=1, progress_interval_s=0.0,
                           memory_mode="int8")
    whole = trainer.train(_job(tmp_path / "whole", recipe), sink=FakeSink())
    kept = KeptCheckpoints(tmp_path / "kept")
    with pytest.raises(TrainingInterruptedError):
        trainer.train(replace(_job(tmp_path / "first", recipe), checkpoints=kept),
                      sink=FakeSink(interrupt_after=6))
    resumed = trainer.train(replace(_job(tmp_path / "second", recipe), resume_from=kept.newest()),
                            sink=FakeSink())
    # Handed back after step 6: the checkpoint of step 4 and the one it made of steps 5 and 6.
    assert kept.steps == [4, 6]
    assert resumed.metrics["resumed_from_step"] == 6
    assert resumed.metrics["memory_mode"] == "int8"
    _close(resumed.weights_path, whole.weights_path)


def _no_space(path: Path) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


@dataclass
class KeptSamples:
    steps: list[int] = field(default_factory=list)

    def save(self, path: Path, *, step: int) -> None:
        assert path.is_file()
        self.steps.append(step)


class _FullAfter(io.RawIOBase):
    """A file on a disk with ``room`` bytes free: the write past it fails with ENOSPC, as a
    filling disk's does (torch's zip writer swallows that OSError and reports an unexpected
    position)."""

    def __init__(self, room: int) -> None:
        self.room, self.pos = room, 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        if self.pos + len(data) > self.room:
            raise _no_space(Path("full"))
        self.pos += len(data)
        return len(data)

    def tell(self) -> int:
        return self.pos


@pytest.mark.parametrize("room", [0, 100, 2000])
def test_a_checkpoint_write_the_disk_refuses_is_an_os_error_from_the_real_torch_writer(
        room: int) -> None:
    """torch.save into a file that runs out of room raises RuntimeError('unexpected pos ...')
    mid-record (OSError only at the first write): both reach the caller as OSError."""
    import torch

    from selfie_lora.adapters.flux.checkpoints import write_payload

    with pytest.raises(OSError, match=r"No space left on device|write failed \(.*unexpected pos"):
        write_payload({"a": torch.zeros(1000)}, _FullAfter(room))


class _RefusedAs(io.RawIOBase):
    """A file whose writes are refused with a RuntimeError in a library's words (``said``), as
    a wrapper (a FUSE or fsspec file, Rust's io::Error) may say the disk's error."""

    def __init__(self, said: str) -> None:
        self.said = said

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        raise RuntimeError(self.said)


# Old code: a quota's words were not among the marks of a refused write, so the RuntimeError went
# on past the training loop's handler of a checkpoint's OSError (which skips that checkpoint);
# and a mark found was always said as ENOSPC, a quota (EDQUOT) as a full disk.
@pytest.mark.parametrize(("said", "code"), [
    ("I/O error: No space left on device (os error 28)", errno.ENOSPC),
    ("write failed: [Errno 28] No space left on device", errno.ENOSPC),
    ("I/O error: Disk quota exceeded (os error 122)", errno.EDQUOT),
    ("write failed: [Errno 122] Disk quota exceeded", errno.EDQUOT),
])
def test_a_checkpoint_write_refused_in_a_library_s_words_is_the_disk_s_os_error(
        said: str, code: int) -> None:
    from selfie_lora.adapters.flux.checkpoints import write_payload
    from selfie_lora.disk_space import is_full_error, is_quota_error

    with pytest.raises(OSError, match=re.escape(f"the write failed ({said})")) as raised:
        write_payload({"a": torch.zeros(1000)}, _RefusedAs(said))
    assert raised.value.errno == code
    assert is_full_error(raised.value)
    assert is_quota_error(raised.value) is (code == errno.EDQUOT)


def test_a_fault_of_the_payload_stays_a_runtime_error() -> None:
    from selfie_lora.adapters.flux.checkpoints import write_payload

    class Broken:
        def __reduce__(self) -> Any:
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom") as raised:
        write_payload({"a": Broken()}, io.BytesIO())
    assert not isinstance(raised.value, OSError)


def test_a_checkpoint_or_sample_the_disk_cannot_take_is_skipped_and_the_training_goes_on(
        shared_model_cache: Path, tmp_path: Path, uninterrupted: dict[str, Any],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The work dir's disk full at one checkpoint (the real torch writer into a file that runs
    out of room) and one sample: each is skipped with a warning, and the run goes on to the
    LoRA an uninterrupted run makes (a full disk at step 750 of a FLUX run used to fail the
    training and drop every stored checkpoint)."""
    from selfie_lora.adapters.flux import checkpoints as flux_checkpoints
    from selfie_lora.adapters.flux.samples import Sampler

    fdopen, write_sample = os.fdopen, Sampler.write
    opened: list[int] = []

    def full_at_8(handle: int, mode: str) -> Any:
        # The checkpoints' only: samples are written through os.fdopen too (0600, mkstemp).
        # Staged as .step-NNNNNNNN.ckpt.<random>.tmp (private_replacement).
        if ".ckpt." not in Path(os.readlink(f"/proc/self/fd/{handle}")).name:
            return fdopen(handle, mode)
        opened.append(handle)
        if len(opened) == 2:  # the checkpoint of step 8
            os.close(handle)
            return io.BufferedWriter(_FullAfter(room=1000))
        return fdopen(handle, mode)

    def full_at_12(self: Sampler, transformer: Any, step: int) -> Path:
        if step == 12:
            raise _no_space(self.folder / "sample.jpg")
        return write_sample(self, transformer, step)

    monkeypatch.setattr(flux_checkpoints.os, "fdopen", full_at_8)
    monkeypatch.setattr(Sampler, "write", full_at_12)
    kept, samples = KeptCheckpoints(tmp_path / "kept"), KeptSamples()
    result = _trainer(shared_model_cache, "inline").train(
        replace(_job(tmp_path, replace(SHORT, sample_every=4)), checkpoints=kept,
                samples=samples), sink=FakeSink())
    assert kept.steps == [4, 12, 16]
    assert samples.steps == [4, 8, 16]
    assert result.metrics["steps"] == SHORT.steps
    _close(result.weights_path, uninterrupted["result"].weights_path)


def test_a_lora_the_disk_cannot_take_is_a_storage_error_not_a_failed_training(
        shared_model_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The final LoRA's write on a full disk (its file runs out of room after 1000 bytes): a
    StorageError naming the LoRA and the disk's error (the worker steps away with the stored
    checkpoints kept), not a TrainingFailedError telling the user to contact the operator
    (safetensors' own file writer raised SafetensorError there)."""
    from selfie_lora.services import private_files

    real_fdopen = os.fdopen

    def on_a_full_disk(fd: int, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        # The LoRA is staged 0600 as .lora.safetensors.<random>.tmp (private_replacement).
        if "w" in mode and Path(os.readlink(f"/proc/self/fd/{fd}")).name.startswith(
                ".lora.safetensors."):
            os.close(fd)
            return io.BufferedWriter(_FullAfter(room=1000))
        return real_fdopen(fd, mode, *args, **kwargs)

    monkeypatch.setattr(private_files.os, "fdopen", on_a_full_disk)
    kept = KeptCheckpoints(tmp_path / "kept")
    with pytest.raises(StorageError) as raised:
        _trainer(shared_model_cache, "inline").train(
            replace(_job(tmp_path, SHORT), checkpoints=kept), sink=FakeSink())
    assert not isinstance(raised.value, TrainerError)
    assert "the trained LoRA cannot be written to" in raised.value.message
    assert "No space left on device" in raised.value.message
    assert kept.steps == [4, 8, 12, 16]


def test_a_childs_storage_error_reads_as_the_same_error_inline() -> None:
    error = LocalTrainer._child_error(
        ("error", "StorageError", "the trained LoRA cannot be written to /w/lora.safetensors: "
         "No space left on device", None, "Traceback ..."))
    assert isinstance(error, StorageError)
    assert not isinstance(error, TrainerError)
    assert error.message.endswith("No space left on device")


@pytest.mark.parametrize("stop", ["cancel", "interrupt"])
def test_a_stopped_training_child_reports_the_step_of_the_checkpoint_it_kept(
        shared_model_cache: Path, tmp_path: Path, stop: str) -> None:
    """The steps the child makes between the stop being asked and its checkpoint are reported:
    the row ends at the checkpoint's step (old code: they were dropped, so a cancel read
    'canceled | step 15/40' with step-00000019.ckpt stored and 'Resume from step 19')."""
    sink = FakeSink(cancel_after=7) if stop == "cancel" else FakeSink(interrupt_after=7)
    kept = KeptCheckpoints(tmp_path / "kept")
    with pytest.raises((TrainingCanceledError, TrainingInterruptedError)):
        _trainer(shared_model_cache, "process").train(
            replace(_job(tmp_path, SHORT), checkpoints=kept), sink=sink)
    assert kept.steps[0] == 4
    assert kept.steps[-1] > 7  # the child made a step or more after the one the stop followed
    assert sink.steps[-1][1] == kept.steps[-1]


class _Progress:
    def __init__(self) -> None:
        self.steps: list[int] = []

    def progress(self, *, status: TrainingStatus, step: int, total: int,
                 loss: float | None = None) -> None:
        self.steps.append(step)


def test_a_flush_reports_the_newest_step_the_interval_held_back() -> None:
    from selfie_lora.adapters.flux.trainer import _Reporter

    sink = _Progress()
    reporter = _Reporter(sink, interval=3600.0)  # type: ignore[arg-type]
    for step in range(6):
        reporter.step(step, 20, 0.5)
    assert sink.steps == [0]
    reporter.flush()
    reporter.flush()
    assert sink.steps == [0, 5]



@dataclass(frozen=True)
class _Restartable:
    checkpoint_dir: Path
    resume_from: Path | None = None


def test_a_restarted_child_s_cancel_flushes_its_own_step_not_the_dead_child_s(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Child 1 held back step 7 and died (SIGKILL) with its newest checkpoint at 4; child 2
    resumed at 4 and was canceled at 5, keeping checkpoint 5: the wind-down's flush reported
    child 1's step 7, past the checkpoint kept (review daydiff2 reporter_restart.py). Now the
    restart drops it (child 2's steps behind the row's are not reported: it never goes back)."""
    from selfie_lora.adapters.flux import trainer as flux_trainer
    from selfie_lora.adapters.flux.trainer import _ChildDiedError, _Reporter

    class Sink(_Progress):
        def interrupted(self) -> bool:
            return False

    clock = [0.0]
    monkeypatch.setattr(flux_trainer.time, "monotonic", lambda: clock[0])
    sink = Sink()
    reporter = _Reporter(sink, interval=0.5)  # type: ignore[arg-type]
    children: list[Path | None] = []

    def steps(numbers: range, *, at: float) -> None:
        for step in numbers:  # one every 0.2 s
            clock[0] = at + 0.2 * step
            reporter.step(step, 40, 0.5)

    def child(request: _Restartable, reporter: _Reporter, keep: Any, *, job_id: str) -> Any:
        children.append(request.resume_from)
        if len(children) == 1:
            steps(range(8), at=10.0)  # reports 0, 3, 6 and holds back 7
            (request.checkpoint_dir / "step-00000004.ckpt").write_bytes(b"kept")
            raise _ChildDiedError(-signal.SIGKILL)
        steps(range(4, 6), at=30.0)
        reporter.flush()  # canceled at 5: the wind-down reports the step it stopped at
        raise TrainingCanceledError("canceled at step 5/40")

    trainer = _trainer(tmp_path / "cache", "process")
    monkeypatch.setattr(trainer, "_train_in_child", child)
    with pytest.raises(TrainingCanceledError):
        trainer._train_restarting(_Restartable(tmp_path), reporter, None, job_id="t")  # type: ignore[arg-type]
    assert children == [None, tmp_path / "step-00000004.ckpt"]
    assert sink.steps == [0, 3, 6]  # old code: [0, 3, 6, 7], the dead child's held-back step
