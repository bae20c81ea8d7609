"""A likeness scoring loads its version's LoRA once for all its probes (``LoraHold``): the local
generator loaded it into the shared pipeline and unloaded it again for every probe (a third of a
tiny CPU scoring's CPU time, more for a FLUX.1 LoRA's hundreds of layers). What the hold keeps
loaded is never seen by any other job, and a failed probe, a canceled scoring or a closed hold
leave the pipeline without it, as before."""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import save

from selfie_lora.adapters.flux import generator as flux_generator
from selfie_lora.adapters.flux.generator import LocalGenerator
from selfie_lora.adapters.storage.cache import BlobCache
from selfie_lora.errors import GenerationError, TrainingInterruptedError
from selfie_lora.services.ports import GenerationJob, LoraHold
from tests.support.likeness import Rig, photo_generator, same_person
from tests.support.pipes import GatedPipe, pipeline_of


@dataclass
class CountingPipe(GatedPipe):
    """A pipeline that counts its LoRA loads and unloads, and records, for each picture, the
    adapters loaded while it was made; ``fail_at`` (a picture's number, from 1) raises there."""

    loads: list[str] = field(default_factory=list)
    unloads: int = 0
    loaded: list[str] = field(default_factory=list)
    seen: list[tuple[str, ...]] = field(default_factory=list)
    fail_at: int | None = None
    during: Callable[[], None] | None = None  # called while a picture is made
    unload_fails: bool = False

    def __post_init__(self) -> None:
        self.gate.set()

    def __call__(self, **kwargs: Any) -> Any:
        self.seen.append(tuple(self.loaded))
        if self.during is not None:
            self.during()
        if self.fail_at == len(self.seen):
            raise RuntimeError("a device error in the middle of a picture")
        return super().__call__(**kwargs)

    def load_lora_weights(self, path: str, *, adapter_name: str) -> None:
        self.loads.append(Path(path).name)
        self.loaded.append(adapter_name)

    def unload_lora_weights(self) -> None:
        self.unloads += 1
        if self.unload_fails:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        self.loaded.clear()


@pytest.fixture
def generator(tmp_path: Path) -> LocalGenerator:
    return LocalGenerator(base_model="tiny", cache_dir=tmp_path, device="cpu",
                          num_inference_steps=2)


@pytest.fixture
def pipe(generator: LocalGenerator, monkeypatch: pytest.MonkeyPatch) -> Iterator[CountingPipe]:
    with pipeline_of(generator, CountingPipe(), monkeypatch) as counting:
        yield counting


def _lora(alpha: float = 1.0) -> bytes:
    import torch

    # No LoRA layer the fake transformer would be asked for (the generator's misfit check).
    return save({"transformer.x.alpha": torch.full((), alpha)})


def _weights(tmp_path: Path, name: str = "v1.safetensors", *, alpha: float = 1.0) -> Path:
    path = tmp_path / name
    path.write_bytes(_lora(alpha))
    return path


def _job(weights: Path | None, hold: LoraHold | None, *, index: int = 0) -> GenerationJob:
    # The content's id, as ``GenerationService.render`` passes the sha256 it checked.
    weights_id = hashlib.sha256(weights.read_bytes()).hexdigest() if weights else None
    return GenerationJob(prompt=f"probe {index}", num_outputs=1, seed=7 + index, lora_scale=1.0,
                         trainer_version="local-tiny-v2", weights_path=weights,
                         weights_id=weights_id, lora_hold=hold)


def test_the_jobs_of_one_hold_load_their_lora_once(
        generator: LocalGenerator, pipe: CountingPipe, tmp_path: Path) -> None:
    weights = _weights(tmp_path)
    hold = LoraHold()
    for index in range(4):
        assert len(generator.generate(_job(weights, hold, index=index))) == 1
    assert pipe.loads == ["v1.safetensors"]  # old code: one load per probe
    assert pipe.unloads == 0
    assert len(pipe.seen) == 4
    assert all(len(adapters) == 1 for adapters in pipe.seen)
    assert len(set(pipe.seen)) == 1  # the one adapter throughout
    hold.close()
    assert (pipe.unloads, pipe.loaded) == (1, [])  # closed: the pipeline as it was


def test_jobs_without_a_hold_still_load_and_unload_each_time(
        generator: LocalGenerator, pipe: CountingPipe, tmp_path: Path) -> None:
    weights = _weights(tmp_path)
    for index in range(2):
        generator.generate(_job(weights, None, index=index))
    assert len(pipe.loads) == 2
    assert (pipe.unloads, pipe.loaded) == (2, [])


def test_another_job_between_two_of_a_hold_never_sees_its_lora(
        generator: LocalGenerator, pipe: CountingPipe, tmp_path: Path) -> None:
    weights, other = _weights(tmp_path), _weights(tmp_path, "v2.safetensors")
    hold = LoraHold()
    generator.generate(_job(weights, hold))
    generator.generate(_job(None, None, index=1))  # a user's picture without a LoRA
    generator.generate(_job(other, None, index=2))  # and one with another version's
    generator.generate(_job(weights, LoraHold(), index=3))  # another scoring of the same file
    generator.generate(_job(weights, hold, index=4))
    hold.close()
    assert pipe.seen[1] == ()
    assert len(pipe.seen[2]) == 1
    assert pipe.seen[2] != pipe.seen[0]
    assert pipe.loads == ["v1.safetensors", "v2.safetensors", "v1.safetensors",
                          "v1.safetensors"]
    assert pipe.loaded == []


def test_a_weights_file_of_other_content_under_a_hold_is_loaded_again(
        generator: LocalGenerator, pipe: CountingPipe, tmp_path: Path) -> None:
    """Another content at the same path (a copy fetched again) is another LoRA."""
    weights = _weights(tmp_path)
    hold = LoraHold()
    generator.generate(_job(weights, hold))
    _weights(tmp_path, alpha=2.0)
    generator.generate(_job(weights, hold, index=1))
    hold.close()
    assert pipe.loads == ["v1.safetensors", "v1.safetensors"]
    assert pipe.loaded == []


def test_the_object_store_s_cached_copy_touched_at_each_use_is_loaded_once(
        generator: LocalGenerator, pipe: CountingPipe, tmp_path: Path) -> None:
    """The S3 store hands out its copies through a ``BlobCache``, which marks a copy used (its
    modification time) at every hit: the same content is the same LoRA all the same, and
    another content under the key (the copy forgotten and fetched again) is loaded again."""
    cache = BlobCache(tmp_path / "cache", max_bytes=1 << 30)
    stored = {"content": _lora()}

    def probe(hold: LoraHold, index: int) -> None:
        with cache.copy("weights/v1.safetensors",
                        lambda fh: fh.write(stored["content"])) as path:
            generator.generate(_job(path, hold, index=index))

    hold = LoraHold()
    mtimes = []
    for index in range(3):
        probe(hold, index)
        mtimes.append((tmp_path / "cache" / "weights" / "v1.safetensors").stat().st_mtime_ns)
        time.sleep(0.01)
    assert len(set(mtimes)) == 3  # the cache did touch it at each use
    assert pipe.loads == ["v1.safetensors"]  # old code: 3, one per touched copy
    stored["content"] = _lora(2.0)
    assert cache.forget("weights/v1.safetensors")
    probe(hold, 3)
    assert pipe.loads == ["v1.safetensors", "v1.safetensors"]
    assert pipe.unloads == 1  # the first content's, before the second was loaded
    hold.close()
    assert (pipe.unloads, pipe.loaded) == (2, [])


def test_a_failed_job_of_a_hold_leaves_no_lora_and_the_next_loads_it_again(
        generator: LocalGenerator, pipe: CountingPipe, tmp_path: Path) -> None:
    weights = _weights(tmp_path)
    hold = LoraHold()
    pipe.fail_at = 2
    generator.generate(_job(weights, hold))
    with pytest.raises(GenerationError):
        generator.generate(_job(weights, hold, index=1))
    assert (pipe.unloads, pipe.loaded) == (1, [])
    generator.generate(_job(weights, hold, index=2))
    assert len(pipe.loads) == 2
    hold.close()
    assert (pipe.unloads, pipe.loaded) == (2, [])


def test_a_closed_hold_keeps_nothing(
        generator: LocalGenerator, pipe: CountingPipe, tmp_path: Path) -> None:
    weights = _weights(tmp_path)
    hold = LoraHold()
    hold.close()
    generator.generate(_job(weights, hold))
    assert (len(pipe.loads), pipe.unloads, pipe.loaded) == (1, 1, [])


def _close_from_another_thread(hold: LoraHold) -> None:
    closing = threading.Thread(target=hold.close)
    closing.start()
    closing.join(timeout=10)
    assert not closing.is_alive()  # close() never waits for the pipeline


def test_a_hold_closed_during_one_of_its_reused_jobs_leaves_no_lora(
        generator: LocalGenerator, pipe: CountingPipe, tmp_path: Path) -> None:
    """close() finds the pipeline busy with the hold's own job, which reused the LoRA: that
    job unloads it as it ends."""
    weights = _weights(tmp_path)
    hold = LoraHold()
    generator.generate(_job(weights, hold))
    pipe.during = lambda: _close_from_another_thread(hold)
    generator.generate(_job(weights, hold, index=1))
    assert len(pipe.seen) == 2
    assert len(pipe.seen[1]) == 1  # made with the kept LoRA
    assert pipe.loads == ["v1.safetensors"]
    assert (pipe.unloads, pipe.loaded) == (1, [])  # old code: (0, ['gen_…'])


class ClosedAsItKeeps(LoraHold):
    """Closed from another thread just after the generator kept its LoRA, while the job still
    has the pipeline."""

    def keep(self, release: Callable[[], None]) -> bool:
        kept = super().keep(release)
        _close_from_another_thread(self)
        return kept


def test_a_hold_closed_as_its_first_job_keeps_the_lora_leaves_no_lora(
        generator: LocalGenerator, pipe: CountingPipe, tmp_path: Path) -> None:
    weights = _weights(tmp_path)
    generator.generate(_job(weights, ClosedAsItKeeps()))
    assert pipe.loads == ["v1.safetensors"]
    assert (pipe.unloads, pipe.loaded) == (1, [])  # old code: (0, ['gen_…'])


@pytest.fixture
def fresh_pipes(monkeypatch: pytest.MonkeyPatch) -> list[CountingPipe]:
    """The base pipelines loaded anew (a dropped one), each a new ``CountingPipe``."""
    loaded: list[CountingPipe] = []

    def load(*_args: Any, **_kwargs: Any) -> CountingPipe:
        loaded.append(CountingPipe())
        return loaded[-1]

    monkeypatch.setattr(flux_generator, "_load_for_generation", load)
    return loaded


def test_a_kept_lora_that_cannot_be_unloaded_fails_the_next_job_as_a_generation_error(
        generator: LocalGenerator, pipe: CountingPipe, tmp_path: Path,
        fresh_pipes: list[CountingPipe]) -> None:
    """Another user's job that finds a scoring's LoRA and cannot unload it: a GenerationError
    (the API's mapped answer, not a 500), and the pipeline, which may still hold the LoRA's
    layers, is dropped: the next job runs on a clean one loaded anew."""
    weights = _weights(tmp_path)
    hold = LoraHold()
    generator.generate(_job(weights, hold))
    pipe.unload_fails = True
    with pytest.raises(GenerationError, match="illegal memory access"):
        generator.generate(_job(None, None, index=1))  # old code: a raw RuntimeError
    assert len(pipe.seen) == 1  # nothing made on the polluted pipeline
    assert generator.generate(_job(None, None, index=2))
    assert len(fresh_pipes) == 1  # old code: the next job ran on the polluted pipeline
    assert fresh_pipes[0].seen == [()]
    hold.close()  # its LoRA went with the old pipeline: nothing to do, nothing raised
    assert pipe.unloads == 1
    assert len(pipe.seen) == 1  # the dropped pipeline never used again


def test_a_hold_whose_lora_cannot_be_unloaded_closes_without_raising(
        generator: LocalGenerator, pipe: CountingPipe, tmp_path: Path,
        fresh_pipes: list[CountingPipe]) -> None:
    """close() runs in the scoring's ``finally``: it never replaces the scoring's result or
    error, and the pipeline it could not clean is dropped."""
    weights = _weights(tmp_path)
    hold = LoraHold()
    generator.generate(_job(weights, hold))
    pipe.unload_fails = True
    hold.close()  # old code: raised the RuntimeError
    assert pipe.unloads == 1
    generator.generate(_job(None, None, index=1))
    assert len(fresh_pipes) == 1  # old code: the next job ran on the polluted pipeline
    assert fresh_pipes[0].seen == [()]
    assert len(pipe.seen) == 1


@pytest.mark.parametrize("closed", [False, True], ids=["no hold", "a closed hold"])
def test_a_job_whose_own_lora_cannot_be_unloaded_keeps_its_pictures(
        generator: LocalGenerator, pipe: CountingPipe, tmp_path: Path,
        fresh_pipes: list[CountingPipe], caplog: pytest.LogCaptureFixture,
        closed: bool) -> None:
    """A job's own LoRA (nothing kept: no hold, or a closed one) is unloaded as the job ends,
    outside the mapping of its body: the unload's RuntimeError escaped raw (a 500 with a
    traceback), and the pipeline, which may still hold the LoRA's layers, stayed for the next
    job, another user's. The pipeline is dropped now, and the unload's failure is logged: the
    pictures were made (finished PNGs), so they are the job's answer ("a generation whose last
    picture is made is stored"), not a 502 for a good result."""
    hold = None
    if closed:
        hold = LoraHold()
        hold.close()
    pipe.unload_fails = True
    with caplog.at_level(logging.ERROR, logger=flux_generator.__name__):
        # old code: a raw RuntimeError (then a GenerationError)
        pictures = generator.generate(_job(_weights(tmp_path), hold))
    assert len(pictures) == 1
    assert pictures[0].startswith(b"\x89PNG\r\n\x1a\n")
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR
            and "illegal memory access" in r.getMessage()
            and "its pictures are kept" in r.getMessage()], caplog.text
    assert pipe.unloads == 1
    assert generator.generate(_job(None, None, index=1))
    assert len(fresh_pipes) == 1  # old code: the next job ran on the polluted pipeline
    assert fresh_pipes[0].seen == [()]
    assert len(pipe.seen) == 1


def test_a_failed_job_whose_lora_cannot_be_unloaded_keeps_its_own_error(
        generator: LocalGenerator, pipe: CountingPipe, tmp_path: Path,
        fresh_pipes: list[CountingPipe], caplog: pytest.LogCaptureFixture) -> None:
    """The job's own failure is what its caller is told (the unload's replaced it, raw); the
    unload's is logged and the pipeline dropped."""
    pipe.fail_at = 1
    pipe.unload_fails = True
    with pytest.raises(GenerationError, match="in the middle of a picture"):
        generator.generate(_job(_weights(tmp_path), None))
    assert "illegal memory access" in caplog.text
    generator.generate(_job(None, None, index=1))
    assert len(fresh_pipes) == 1
    assert fresh_pipes[0].seen == [()]


# --------------------------------------------------------------------------- the scoring


@pytest.fixture
def rig(tmp_path: Path, generator: LocalGenerator, pipe: CountingPipe) -> Iterator[Rig]:
    r = Rig(root=tmp_path, generator=generator)
    yield r
    r.close()


def test_a_scoring_loads_its_version_s_lora_once_for_all_its_probes(
        rig: Rig, pipe: CountingPipe) -> None:
    ann = rig.user()
    version = rig.train(ann)
    record = rig.likeness.score(version.id)
    assert len(record.probes) == rig.probe_count == 4
    assert len(pipe.seen) == 4
    assert all(len(adapters) == 1 for adapters in pipe.seen)
    assert len(pipe.loads) == 1  # old code: 4, one per probe
    assert (pipe.unloads, pipe.loaded) == (1, [])  # nothing left once it is scored


class CanceledError(TrainingInterruptedError):
    pass


def test_a_scoring_canceled_between_probes_leaves_no_lora_behind(
        rig: Rig, pipe: CountingPipe) -> None:
    ann = rig.user()
    rig.dying.inner = photo_generator(same_person())  # the training's own scoring: not counted
    version = rig.train(ann)
    rig.dying.inner = rig.generator
    scored = rig.repo.get_likeness(version.id)
    assert scored is not None
    for probe in scored.probes:  # made again by the scoring below
        assert probe.image_key is not None
        rig.blobs.delete(probe.image_key)

    def checkpoint() -> None:
        if len(pipe.seen) == 2:
            raise CanceledError("canceled by its user")

    with pytest.raises(CanceledError):
        rig.likeness.score(version.id, force=True, checkpoint=checkpoint)
    assert len(pipe.seen) == 2
    assert len(pipe.loads) == 1
    assert (pipe.unloads, pipe.loaded) == (1, [])
