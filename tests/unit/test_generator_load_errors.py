"""What a failed load of a version's LoRA tells the user: a misfit of its layers is the
version's (422 ``unsupported_weights``: train again), while running out of memory or any other
device error is the server's, and a retry may succeed: the version must not be called unusable."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from selfie_lora.adapters.flux.generator import LocalGenerator
from selfie_lora.errors import GenerationError, InvalidInputError, WeightsDamagedError
from selfie_lora.services.ports import GenerationJob


class _Pipe:
    """A pipeline whose one layer fits the LoRA's header, and whose load raises ``error``."""

    def __init__(self, error: Exception) -> None:
        self.transformer = torch.nn.Module()
        self.transformer.x = torch.nn.Linear(2, 2)
        self.error = error

    def load_lora_weights(self, *_args: Any, **_kwargs: Any) -> None:
        raise self.error

    def unload_lora_weights(self) -> None:
        pass


def _generate(tmp_path: Path, error: Exception) -> None:
    weights = tmp_path / "w.safetensors"
    save_file({"transformer.x.lora_A.weight": torch.zeros(2, 2)}, str(weights))
    generator = LocalGenerator(base_model="tiny", cache_dir=tmp_path)
    job = GenerationJob(prompt="p", num_outputs=1, seed=1, lora_scale=1.0,
                        trainer_version="local-tiny-v2", weights_path=weights)
    generator._generate_locked(_Pipe(error), job, seed=1)


@pytest.mark.parametrize("error", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB"),
    RuntimeError("CUDA error: an illegal memory access was encountered"),
])
def test_running_out_of_memory_while_a_lora_loads_is_a_generation_failure(
    tmp_path: Path, error: Exception,
) -> None:
    with pytest.raises(GenerationError) as failed:  # old code: InvalidInputError, train again
        _generate(tmp_path, error)
    assert failed.value.http_status == 502
    assert failed.value.user_message is None  # the fixed sentence: retry


@pytest.mark.parametrize("error", [
    RuntimeError("Error(s) in loading state_dict: size mismatch for x.lora_A.weight"),
    ValueError("Target modules {'y'} not found in the base model"),
    KeyError("transformer.y.lora_A.weight"),
])
def test_a_lora_whose_layers_do_not_load_is_still_refused_as_unsupported(
    tmp_path: Path, error: Exception,
) -> None:
    with pytest.raises(InvalidInputError) as refused:
        _generate(tmp_path, error)
    assert refused.value.code == "unsupported_weights"


@pytest.mark.parametrize("cut", [0, 8, 40, -4])  # -4: the header whole, the tensors not
def test_a_lora_file_cut_short_is_damaged_weights_not_a_retry(tmp_path: Path, cut: int) -> None:
    # safetensors' SafetensorError is neither a RuntimeError nor a ValueError: it escaped every
    # mapping as a 500 "please retry" (review corrupt.sh), though no retry reads the file.
    weights = tmp_path / "w.safetensors"
    save_file({"transformer.x.lora_A.weight": torch.zeros(2, 2)}, str(weights))
    data = weights.read_bytes()
    weights.write_bytes(data[:cut] if cut else b"not a safetensors file at all")
    generator = LocalGenerator(base_model="tiny", cache_dir=tmp_path)
    job = GenerationJob(prompt="p", num_outputs=1, seed=1, lora_scale=1.0,
                        trainer_version="local-tiny-v2", weights_path=weights)
    with pytest.raises(WeightsDamagedError) as damaged:
        generator._generate_locked(_Pipe(RuntimeError("never loaded")), job, seed=1)
    assert (damaged.value.http_status, damaged.value.code) == (409, "weights_damaged")


def test_a_lora_whose_tensors_do_not_read_is_damaged_weights(tmp_path: Path) -> None:
    # The header reads (the layers fit), the load does not.
    with pytest.raises(WeightsDamagedError):
        _generate(tmp_path, SafetensorError("Error while deserializing header: "
                                            "MetadataIncompleteBuffer"))
