"""The local trainer when its base folder is broken: what the user is told, inline and in the
child process alike. Each case is a real folder (the tiny FLUX's, or a model_index.json alone)
made wrong the way an operator's copy of FLUX.1 can be, not a vendor function replaced."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import pytest

from selfie_lora.domain.entities import TrainingStatus
from selfie_lora.domain.recipes import get_recipe
from selfie_lora.errors import (
    ConfigError,
    TrainerError,
    TrainerUnavailableError,
    TrainingFailedError,
)
from selfie_lora.services.ports import TrainingJob, TrainingPhoto
from tests.support.photos import synthetic_photo

pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("peft")

from selfie_lora.adapters.flux import loader as flux_loader
from selfie_lora.adapters.flux.tiny import tiny_pipeline_dir
from selfie_lora.adapters.flux.trainer import LocalTrainer

pytestmark = pytest.mark.slow

RECIPE = get_recipe("local-tiny-v1")
MISCONFIGURED = "The local trainer is not set up correctly on this server; contact the operator."
Isolation = Literal["inline", "process"]


class Sink:
    def __init__(self) -> None:
        self.steps: list[int] = []

    def started(self, *, remote_id: str | None) -> None:
        del remote_id

    def progress(self, *, status: TrainingStatus, step: int, total: int,
                 loss: float | None = None) -> None:
        self.steps.append(step)

    def cancel_requested(self) -> bool:
        return False

    def interrupted(self) -> bool:
        return False


def _job(work: Path, recipe: Any = RECIPE) -> TrainingJob:
    return TrainingJob(
        training_id="tr_faults", trigger_word="TOK", destination="local/tok",
        trainer_version=recipe.name, recipe=recipe,
        photos=tuple(TrainingPhoto(name=f"p{i}.jpg", data=synthetic_photo(i, size=64),
                                   caption="a photo of TOK person") for i in range(2)),
        work_dir=work)


def _trainer(base: str, cache_dir: Path, isolation: Isolation, **kwargs: Any) -> LocalTrainer:
    return LocalTrainer(base_model=base, cache_dir=cache_dir, isolation=isolation, device="cpu",
                        num_threads=1, **kwargs)


def _train_error(trainer: LocalTrainer, job: TrainingJob) -> TrainerError:
    with pytest.raises(TrainerError) as raised:
        trainer.train(job, sink=Sink())
    return raised.value


# --------------------------------------------------------------------------- model_index.json

MODEL_INDEXES = {
    "a-list": [],
    "a-null-component": {"_class_name": "FluxPipeline", "transformer": None},
}


def _base_with_index(tmp_path: Path, index: Any) -> Path:
    base = tmp_path / "base"
    base.mkdir()
    (base / "model_index.json").write_text(json.dumps(index))
    return base


@pytest.mark.parametrize("index", MODEL_INDEXES.values(), ids=MODEL_INDEXES.keys())
def test_a_malformed_model_index_is_a_configuration_error(tmp_path: Path, index: Any) -> None:
    base = _base_with_index(tmp_path, index)
    with pytest.raises(ConfigError, match=str(base)):
        flux_loader.load_pipeline(str(base), cache_dir=tmp_path, device="cpu")


@pytest.mark.parametrize("isolation", ["inline", "process"])
@pytest.mark.parametrize("index", MODEL_INDEXES.values(), ids=MODEL_INDEXES.keys())
def test_a_malformed_model_index_tells_the_user_the_server_is_misconfigured(
        tmp_path: Path, shared_model_cache: Path, index: Any, isolation: Isolation) -> None:
    """Not 'Training failed; try again': trying again cannot help, the operator must act."""
    base = _base_with_index(tmp_path, index)
    error = _train_error(_trainer(str(base), shared_model_cache, isolation), _job(tmp_path / "w"))
    assert isinstance(error, TrainerUnavailableError)
    assert error.user_message == MISCONFIGURED
    assert error.message.startswith("local trainer misconfigured: ")


def test_a_childs_error_reads_as_the_same_error_inline(tmp_path: Path,
                                                      shared_model_cache: Path) -> None:
    """The child sends its error's class and text: the parent's error must not say the class
    twice ('TrainingFailedError: TrainingFailedError: ...')."""
    job = _job(tmp_path / "w", replace(RECIPE, steps=0))  # refused before torch is imported
    inline = _train_error(_trainer("tiny", shared_model_cache, "inline"), job)
    child = _train_error(_trainer("tiny", shared_model_cache, "process"), job)
    assert type(child) is type(inline)
    assert (child.message, child.user_message) == (inline.message, inline.user_message)
    assert "Error:" not in child.message


# --------------------------------------------------------------------------- vendor errors


def _tiny_copy(tmp_path: Path, cache_dir: Path, **components: list[str]) -> Path:
    """The tiny FLUX's folder, some components declared as another class."""
    base = tmp_path / "base"
    shutil.copytree(tiny_pipeline_dir(cache_dir), base)
    index = json.loads((base / "model_index.json").read_text())
    (base / "model_index.json").write_text(json.dumps({**index, **components}))
    return base


def test_a_vendor_error_in_the_loop_fails_the_training_alike_inline_and_in_the_child(
        tmp_path: Path, shared_model_cache: Path) -> None:
    """A T5 tokenizer swapped for CLIP's loads, then the T5 encoder indexes past its table:
    torch raises an IndexError, which inline isolation let out of LocalTrainer.train as it was
    (the worker failed the training as an internal error) while the child reported it."""
    base = _tiny_copy(tmp_path, shared_model_cache, tokenizer_2=["transformers", "CLIPTokenizer"])
    inline = _train_error(_trainer(str(base), shared_model_cache, "inline"), _job(tmp_path / "i"))
    child = _train_error(_trainer(str(base), shared_model_cache, "process"), _job(tmp_path / "p"))
    assert isinstance(inline, TrainingFailedError)
    assert inline.message.startswith("local training failed: IndexError: ")
    assert (type(child), child.message, child.user_message) == (
        type(inline), inline.message, inline.user_message)
    assert "try again" in inline.user_message

