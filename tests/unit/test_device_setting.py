"""SELFIE_LORA_DEVICE: its form is a settings error (one line, like every other), and a GPU torch
does not see is the operator's misconfiguration where it is used, never a traceback, a 500 or a
training failed as the user's. Found in review: neither was checked."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from selfie_lora.config import Settings
from selfie_lora.errors import ConfigError, GenerationError

torch = pytest.importorskip("torch")

from selfie_lora.adapters.flux import generator as flux_generator  # noqa: E402
from selfie_lora.adapters.flux import loader as flux_loader  # noqa: E402
from selfie_lora.services.ports import GenerationJob  # noqa: E402


@pytest.mark.parametrize("value", ["auto", "cpu", "cuda", "cuda:0", "cuda:1", "cuda:15", "mps"])
def test_each_device_the_readme_names_is_a_setting(tmp_path: Path, value: str) -> None:
    assert Settings(home=tmp_path, device=value).device == value


@pytest.mark.parametrize("value", ["bogus", "", "CUDA", "cuda:", "cuda:-1", "cuda:x", "gpu",
                                   "cpu:0", " cuda", "cuda:1 "])
def test_any_other_is_a_settings_error(tmp_path: Path, value: str) -> None:
    with pytest.raises(ValidationError, match="must be auto, cpu, cuda, cuda:N"):
        Settings(home=tmp_path, device=value)


def test_the_settings_do_not_import_torch_to_check_it(tmp_path: Path) -> None:
    code = ("import sys; from selfie_lora.config import Settings; "
            f"Settings(home={str(tmp_path)!r}, device='cuda:1'); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=False, timeout=120)
    assert done.returncode == 0, done.stderr


def test_a_gpu_torch_does_not_see_is_a_configuration_error(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="SELFIE_LORA_DEVICE is cuda, but torch sees no CUDA "
                                          "device"):
        flux_loader.resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match=r"is cuda:7, but torch sees 1 CUDA device \(cuda:0\)"):
        flux_loader.resolve_device("cuda:7")
    assert flux_loader.resolve_device("cuda:0") == "cuda:0"
    assert flux_loader.resolve_device("cpu") == "cpu"


def _job() -> GenerationJob:
    return GenerationJob(prompt="p", num_outputs=1, seed=1, lora_scale=1.0,
                         trainer_version="local-tiny-v2", weights_path=None)


def test_generating_on_a_gpu_torch_does_not_see_tells_the_user_to_contact_the_operator(
        tmp_path: Path) -> None:
    """Old code: AssertionError 'Torch not compiled with CUDA enabled' out of the generator (a
    traceback from the CLI, a 500 from the API)."""
    made = flux_generator.LocalGenerator(base_model="tiny", cache_dir=tmp_path, device="cuda:999")
    with pytest.raises(GenerationError) as failed:
        made.generate(_job())
    assert failed.value.http_status == 502
    assert failed.value.message.startswith(
        "local generator misconfigured: SELFIE_LORA_DEVICE is cuda:999, but torch sees ")
    assert failed.value.user_message == ("Generating is not set up correctly on this server; "
                                         "contact the operator.")


def test_a_device_error_while_the_base_pipeline_loads_is_a_generation_failure(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The base pipeline's load ran outside the RuntimeError -> GenerationError mapping: torch's
    refusal of a device there was a 500 with a traceback."""
    def refuse(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("Expected one of cpu, cuda, ipu, xpu device type at start of device "
                           "string: bogus")

    monkeypatch.setattr(flux_generator, "_load_for_generation", refuse)
    flux_generator.clear_pipeline_cache()
    made = flux_generator.LocalGenerator(base_model="tiny", cache_dir=tmp_path, device="cpu")
    with pytest.raises(GenerationError, match="loading the base pipeline tiny on cpu failed: "
                                              "RuntimeError: Expected one of"):
        made.generate(_job())
