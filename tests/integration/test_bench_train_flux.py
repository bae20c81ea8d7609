"""bench/train_flux.py on tiny on the CPU: both loops run and every figure is printed.

Plumbing only (a CPU's seconds per step say nothing about a GPU's); the GPU run is
bench/gpu-check.sh.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("torchao")

ROOT = Path(__file__).resolve().parents[2]


def _bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_train_flux", ROOT / "bench" / "train_flux.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_the_benchmark_prints_step_time_memory_mfu_and_the_ratio(
    shared_model_cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bench = _bench()
    out = tmp_path / "bench.json"
    argv = ["--model", "tiny", "--cache-dir", str(shared_model_cache), "--device", "cpu",
            "--steps", "3", "--warmup", "1", "--rank", "4", "--photos", "2",
            "--peak-tflops", "1", "--json", str(out)]
    assert bench.main(argv) == 0
    printed = capsys.readouterr().out
    rows = re.findall(r"^(ours|plain) +(bf16|int8|nf4) +64 px +([\d.]+) s/step +peak ([\d.]+) GiB "
                      r".*MFU ([\d.e+-]+)%", printed, flags=re.MULTILINE)
    assert [(loop, mode) for loop, mode, *_ in rows] == [
        ("ours", "bf16"), ("ours", "int8"), ("ours", "nf4"), ("plain", "bf16")
    ], printed
    assert all(float(seconds) > 0 and float(peak) > 0 and float(mfu) > 0 for *_, seconds, peak, mfu in rows)
    ratio = re.search(r"ratio ours/plain at 64 px \(bf16\): ([\d.]+)x s/step", printed)
    assert ratio is not None, printed

    results = json.loads(out.read_text())
    assert len(results) == 4
    for result in results:
        assert result["steps"] == 3
        assert math.isfinite(result["first_loss"])
        assert math.isfinite(result["last_loss"])
        # tiny: 4x4 packed latents at 64 px plus the T5 tokens; 6 x weights x tokens.
        assert result["tokens"] > 16
        assert result["model_tflops_per_step"] > 0
    ours, plain = results[0], results[3]
    assert float(ratio.group(1)) == pytest.approx(
        ours["seconds_per_step"] / plain["seconds_per_step"], abs=0.01
    )


def test_weight_macs_per_token_is_flux_dev_figure_on_its_config() -> None:
    """6.45e9 multiply-accumulates per token for FLUX.1-dev, counted on an empty (meta) model."""
    import torch
    from diffusers import FluxTransformer2DModel

    bench = _bench()
    with torch.device("meta"):
        transformer = FluxTransformer2DModel(guidance_embeds=True)  # FLUX.1-dev's defaults
    assert bench.weight_macs_per_token(transformer) == pytest.approx(6.45e9, rel=0.005)
