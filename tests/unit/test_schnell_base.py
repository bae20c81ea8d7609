"""FLUX.1-schnell as the local base model: refused for training with a clear error before
anything is loaded, and prompted with 256 T5 tokens (dev and tiny: 512)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from selfie_lora.adapters.flux.loader import refuse_untrainable_base, text_max_length
from selfie_lora.adapters.flux.train_loop import train_flux_lora
from selfie_lora.domain.recipes import get_recipe
from selfie_lora.errors import TrainingFailedError


def flux_folder(tmp_path: Path, *, guidance_embeds: bool) -> Path:
    """Only the files the check reads: a model index and the transformer's config."""
    folder = tmp_path / ("FLUX.1-dev" if guidance_embeds else "FLUX.1-schnell")
    (folder / "transformer").mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    (folder / "transformer" / "config.json").write_text(json.dumps(
        {"_class_name": "FluxTransformer2DModel", "guidance_embeds": guidance_embeds}))
    return folder


def test_training_on_schnell_is_refused_before_anything_loads(tmp_path: Path) -> None:
    schnell = flux_folder(tmp_path, guidance_embeds=False)
    out = tmp_path / "lora.safetensors"
    with pytest.raises(TrainingFailedError, match="step-distilled") as caught:
        train_flux_lora(pipeline_source=str(schnell), cache_dir=tmp_path, photos=[(b"x", "TOK")],
                        recipe=get_recipe("local-flux-v2"), out_path=out, device="cpu")
    assert "FLUX.1-dev" in caught.value.user_message
    assert not out.exists()


def test_dev_tiny_and_unreadable_folders_pass_the_check(tmp_path: Path) -> None:
    refuse_untrainable_base("tiny")
    refuse_untrainable_base(str(flux_folder(tmp_path, guidance_embeds=True)))
    # Nothing to read: loading the pipeline is what says what is wrong with it.
    refuse_untrainable_base(str(tmp_path / "missing"))


def _pipe(*, guidance_embeds: bool, tokenizer_limit: int = 512) -> SimpleNamespace:
    return SimpleNamespace(
        tokenizer_2=SimpleNamespace(model_max_length=tokenizer_limit),
        transformer=SimpleNamespace(config=SimpleNamespace(guidance_embeds=guidance_embeds)))


def test_schnell_prompts_take_256_t5_tokens_and_dev_512() -> None:
    assert text_max_length(_pipe(guidance_embeds=True)) == 512
    assert text_max_length(_pipe(guidance_embeds=False)) == 256
    # A tokenizer with a shorter limit (tiny's 32) keeps it.
    assert text_max_length(_pipe(guidance_embeds=True, tokenizer_limit=32)) == 32
    assert text_max_length(_pipe(guidance_embeds=False, tokenizer_limit=32)) == 32
