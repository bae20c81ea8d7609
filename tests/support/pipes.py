"""A stand-in for the local generator's one shared pipeline: the real ``LocalGenerator`` (its
lock, its checks) runs against it, and each picture waits for ``gate``, as a FLUX.1 picture takes
tens of seconds on a GPU."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
from PIL import Image

from selfie_lora.adapters.flux import generator as flux_generator
from selfie_lora.adapters.flux.generator import LocalGenerator


@dataclass
class _Config:
    guidance_embeds: bool = False


@dataclass
class _Transformer:
    config: _Config = field(default_factory=_Config)

    def get_submodule(self, name: str) -> Any:
        raise AttributeError(name)


@dataclass
class GatedPipe:
    """Makes a flat picture per call once ``gate`` is set; ``prompts`` are the calls' prompts
    and ``waiting`` the calls held at the gate."""

    gate: threading.Event = field(default_factory=threading.Event)
    prompts: list[str] = field(default_factory=list)
    waiting: int = 0
    vae_scale_factor: int = 8
    transformer: _Transformer = field(default_factory=_Transformer)
    after_picture: Any = None  # called after each picture (a test's hook)
    steps_run: int = 0  # diffusion steps run, each ending in the caller's step hook (if any)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, *, prompt_embeds: str, width: int, height: int, **_: Any) -> Any:
        with self._lock:
            self.waiting += 1
        try:
            assert self.gate.wait(30), "the test never let the picture be made"
        finally:
            with self._lock:
                self.waiting -= 1
        hook = _.get("callback_on_step_end")
        for step in range(int(_.get("num_inference_steps", 1))):
            self.steps_run += 1
            if hook is not None:
                hook(self, step, 1000 - step, {})
        self.prompts.append(prompt_embeds)
        if self.after_picture is not None:
            self.after_picture()
        return type("Result", (), {"images": [Image.new("RGB", (width, height), (9, 9, 9))]})()

    def load_lora_weights(self, *_args: Any, **_kwargs: Any) -> None:
        pass

    def set_adapters(self, *_args: Any, **_kwargs: Any) -> None:
        pass

    def unload_lora_weights(self) -> None:
        pass


@contextmanager
def pipeline_of(generator: LocalGenerator, pipe: GatedPipe,
                monkeypatch: pytest.MonkeyPatch) -> Iterator[GatedPipe]:
    """``pipe`` as ``generator``'s shared pipeline (on the CPU) for the block; the prompt is
    handed to it as its "embeddings", so that it records what it was asked to make."""
    monkeypatch.setattr(flux_generator, "_encode_prompt", lambda _pipe, prompt: (prompt, None))
    monkeypatch.setattr(flux_generator, "text_max_length", lambda _pipe: 256)
    key = (generator.base_model, str(generator.cache_dir.resolve()), "cpu",
           generator.memory_mode)
    flux_generator._pipelines[key] = flux_generator._SharedPipeline(
        pipe=pipe, lock=threading.Lock())
    try:
        yield pipe
    finally:
        pipe.gate.set()
        flux_generator._pipelines.pop(key, None)
