"""The local generator: FLUX.1 (or the offline ``tiny`` model) with a LoRA, on this machine.

The base pipeline is loaded once per (source, device, memory mode) and shared by every
``LocalGenerator`` in the process. A generation loads its LoRA into that shared pipeline, runs, and
unloads it again, all under the pipeline's lock, so concurrent requests never see each other's LoRA;
except between the probes of one likeness scoring (``LoraHold``), whose LoRA stays loaded until the
scoring ends or any other job takes the pipeline, which unloads it first.

On a GPU the pipeline is placed as the trainer places it (``flux.memory``), so a card that trains
also generates: the transformer in its memory mode (bf16, int8 or nf4, ``auto`` choosing from the
free memory), the VAE beside it, and the text encoders on the CPU, visiting the GPU only while a
prompt is encoded (T5-XXL alone is 8.9 GiB). A FLUX.1 pipeline wholly on the GPU in bf16 needs
31.5 GiB before the first step.
"""

from __future__ import annotations

import functools
import gc
import io
import logging
import secrets
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from selfie_lora.adapters.flux.loader import (
    default_dtype,
    default_resolution,
    load_pipeline,
    resolve_device,
    text_max_length,
    torch_threads,
)
from selfie_lora.adapters.flux.memory import MemoryModeSetting
from selfie_lora.adapters.flux.runtime import loading_models
from selfie_lora.adapters.flux.tiny import TINY
from selfie_lora.domain.plan import lora_scale_text
from selfie_lora.errors import (
    ClientGoneError,
    ConfigError,
    ErrorCode,
    GenerationError,
    InvalidInputError,
    SelfieLoraError,
    StorageError,
    WeightsDamagedError,
)
from selfie_lora.services.ports import GenerationJob, LoraHold, image_seed

logger = logging.getLogger(__name__)

MAX_OUTPUTS = 16


@dataclass(frozen=True)
class _KeptLora:
    """A LoRA left loaded in a shared pipeline for the next job of ``hold`` (``LoraHold``)."""

    adapter: str
    weights: str  # GenerationJob.weights_id
    scale: float
    hold: LoraHold


@dataclass
class _SharedPipeline:
    pipe: Any
    lock: threading.Lock
    # Changed only under ``lock``: the LoRA a likeness scoring left loaded for its next probe.
    kept: _KeptLora | None = None


class _TransformerOnlyLoraFilter(logging.Filter):
    """Drop diffusers' per-load notice that a LoRA has no text-encoder keys: ours never do."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No LoRA keys associated to CLIPTextModel")


_quiet_filter = _TransformerOnlyLoraFilter()
_pipelines: dict[tuple[str, str, str, str], _SharedPipeline] = {}
_pipelines_lock = threading.Lock()


def _shared_pipeline(*, source: str, cache_dir: Path, device: str,
                     memory_mode: MemoryModeSetting = "auto") -> _SharedPipeline:
    key = (source, str(cache_dir.resolve()) if source == TINY else "", device, memory_mode)
    with _pipelines_lock:
        shared = _pipelines.get(key)
        if shared is None:
            logger.info("loading base pipeline %s on %s", source, device)
            lora_logger = logging.getLogger("diffusers.loaders.lora_base")
            if _quiet_filter not in lora_logger.filters:
                lora_logger.addFilter(_quiet_filter)
            pipe = _load_for_generation(source, cache_dir=cache_dir, device=device,
                                        memory_mode=memory_mode)
            shared = _SharedPipeline(pipe=pipe, lock=threading.Lock())
            _pipelines[key] = shared
        return shared


def _load_for_generation(source: str, *, cache_dir: Path, device: str,
                         memory_mode: MemoryModeSetting) -> Any:
    """The pipeline placed for generating on ``device``: on a CPU in ``auto`` (and ``bf16``) mode,
    wholly there as before; otherwise loaded on the CPU, the transformer then placed in its memory
    mode and the VAE moved to ``device``, the text encoders left on the CPU (see the module)."""
    from selfie_lora.adapters.flux import memory

    dtype = default_dtype(device)
    if device == "cpu" and memory_mode in ("auto", "bf16"):
        return load_pipeline(source, cache_dir=cache_dir, device=device, dtype=dtype)
    pipe = load_pipeline(source, cache_dir=cache_dir, device="cpu", dtype=dtype)
    mode: memory.MemoryMode
    if memory_mode == "auto":
        count = memory.parameter_count(pipe.transformer)
        mode = memory.choose_memory_mode(free_bytes=memory.free_device_bytes(device),
                                         parameter_count=count)
    else:
        mode = memory_mode
    memory.quantize_transformer(pipe.transformer, mode=mode, device=device)
    pipe.vae.to(device)
    logger.info("generator pipeline %s: transformer on %s in %s, text encoders on the CPU",
                source, device, mode)
    return pipe


def clear_pipeline_cache() -> None:
    """Forget the shared pipelines (frees their memory once no generation holds them)."""
    with _pipelines_lock:
        _pipelines.clear()


def release_device_pipelines() -> int:
    """Free the GPU memory of the shared pipelines held on a GPU; returns how many were released.

    A training on the same GPU calls this before it starts: a FLUX.1 pipeline (~32 GiB) and a
    training do not fit together on most cards. Each pipeline is dropped once the generation using
    it (if any) has finished; the next generation loads it again. Pipelines on the CPU stay.
    """
    with _pipelines_lock:
        on_device = [key for key in _pipelines if key[2] != "cpu"]
        released = [_pipelines.pop(key) for key in on_device]
    for shared in released:
        with shared.lock:  # wait for a generation in progress; nobody else can find it now
            shared.pipe = None
    if released:
        logger.info("released %d generator pipeline(s) from the GPU for a training", len(released))
        import torch

        released.clear()
        gc.collect()
        torch.cuda.empty_cache()
    return len(on_device)


class LocalGenerator:
    """Generates PNGs with a base FLUX pipeline plus the job's LoRA at ``job.lora_scale``.

    ``num_inference_steps`` defaults to 4 for ``tiny`` and for FLUX.1-schnell-like models (no
    guidance embedding), 28 for FLUX.1-dev-like ones; ``default_size`` (used when the job has no
    width/height) to 64 for ``tiny``, else 1024.
    """

    backend = "local"

    def __init__(
        self,
        *,
        base_model: str,
        cache_dir: Path,
        device: str = "auto",
        num_threads: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float = 3.5,
        default_size: int | None = None,
        memory_mode: MemoryModeSetting = "auto",
    ) -> None:
        self.base_model = base_model
        self.cache_dir = cache_dir
        self.device = device
        self.num_threads = num_threads
        self.num_inference_steps = num_inference_steps
        self.guidance_scale = guidance_scale
        self.default_size = default_size or default_resolution(base_model)
        self.memory_mode: MemoryModeSetting = memory_mode

    def generate(self, job: GenerationJob) -> list[bytes]:
        if not 1 <= job.num_outputs <= MAX_OUTPUTS:
            raise InvalidInputError(
                f"num_outputs must be between 1 and {MAX_OUTPUTS}, not {job.num_outputs}"
            )
        if job.weights_path is not None and not job.weights_path.is_file():
            raise StorageError(f"LoRA weights not found at {job.weights_path}")
        # torch's first import (a worker's first probe) takes seconds on a busy CPU: waited for
        # as the pipeline's load is.
        device = _waited(job, self._torch_device)
        seed = job.seed if job.seed is not None else secrets.randbelow(2**32)
        with torch_threads(self.num_threads if device == "cpu" else None):
            while True:
                shared = _waited(job, lambda: self._pipeline(device))
                _acquire(shared.lock, job)
                try:
                    # None: released for a training meanwhile (release_device_pipelines); reload.
                    if shared.pipe is not None:
                        return self._generate_locked(shared.pipe, job, seed=seed, shared=shared)
                finally:
                    shared.lock.release()
                    _release_closed(shared)

    def _torch_device(self) -> str:
        """The device, torch imported."""
        import torch  # noqa: F401

        return self._device()

    def _device(self) -> str:
        try:
            return resolve_device(self.device)
        except ConfigError as exc:
            raise _misconfigured(exc) from exc

    def _pipeline(self, device: str) -> _SharedPipeline:
        """The shared base pipeline, its load's failures mapped as the generation's are: it
        ran outside that mapping, so a device torch refused was a 500 with a traceback."""
        try:
            return _shared_pipeline(source=self.base_model, cache_dir=self.cache_dir,
                                    device=device, memory_mode=self.memory_mode)
        except ConfigError as exc:
            raise _misconfigured(exc) from exc
        except SelfieLoraError:
            raise
        except (RuntimeError, ValueError) as exc:
            # Out of memory or a device error while the base loads: the server's, and a retry
            # (once a training has freed the GPU) may succeed.
            raise GenerationError(f"loading the base pipeline {self.base_model} on {device} "
                                  f"failed: {type(exc).__name__}: {exc}") from exc

    def _size(self, pipe: Any, value: int | None) -> int:
        # FLUX packs 2x2 latent patches, so sides must be multiples of 2x the VAE factor; round
        # here rather than let the pipeline resize (the caller gets the size it can predict).
        multiple = int(pipe.vae_scale_factor) * 2
        size = value or self.default_size
        return max(multiple, size // multiple * multiple)

    def _steps(self, pipe: Any) -> int:
        if self.num_inference_steps is not None:
            return self.num_inference_steps
        if self.base_model == TINY or not pipe.transformer.config.guidance_embeds:
            return 4
        return 28

    def _generate_locked(self, pipe: Any, job: GenerationJob, *, seed: int,
                         shared: _SharedPipeline | None = None) -> list[bytes]:
        """``job``'s pictures on ``pipe`` (``shared``'s, whose lock the caller holds: None, a
        pipeline of the caller's own, keeps no LoRA between jobs)."""
        import torch
        from safetensors import SafetensorError

        # The LoRA is told by its content (``weights_id``), not by the file's path, inode or
        # times: the object store's blob cache marks its copy used (its mtime) at every fetch.
        hold = (job.lora_hold if shared is not None and not _closed(job.lora_hold)
                and job.weights_path is not None else None)
        weights = job.weights_id if hold is not None else None
        kept = shared.kept if shared is not None else None
        reused = (kept is not None and kept.hold is hold and weights is not None
                  and kept.weights == weights and kept.scale == job.lora_scale)
        adapter = kept.adapter if reused and kept is not None else f"gen_{uuid.uuid4().hex[:12]}"
        # From the load on, the pipeline may hold some of this LoRA's layers: unloaded in the
        # end whether the job ends well or not, unless kept for its hold's next job.
        loaded = reused
        keep = False
        made = False  # the pictures: an unload that fails after them is the job's error
        try:
            if kept is not None and not reused:
                # Another job's LoRA (a scoring's, between two of its probes): out before this
                # job runs, which sees the pipeline as it would without it. Its unload failing
                # is this job's GenerationError (the pipeline is dropped: the next job loads it
                # anew), not a 500.
                assert shared is not None
                _drop_kept(shared, pipe)
            if job.weights_path is not None and not reused:
                misfit = _lora_misfit(pipe, job.weights_path)
                if misfit is not None:
                    raise _does_not_fit(job.weights_path, misfit)
                # Builds LoRA layers: not while another thread loads a model (runtime).
                with loading_models():
                    loaded = True
                    try:
                        pipe.load_lora_weights(str(job.weights_path), adapter_name=adapter)
                    except SafetensorError as exc:
                        raise _damaged(job.weights_path, exc) from exc
                    except OSError as exc:
                        raise StorageError(
                            f"cannot read LoRA weights {job.weights_path}: {exc}") from exc
                    except (ValueError, KeyError) as exc:
                        raise _does_not_fit(job.weights_path, str(exc)) from exc
                    except RuntimeError as exc:
                        if not _about_the_layers(exc):
                            # Out of memory (torch.OutOfMemoryError is a RuntimeError), a
                            # device error: the version is sound, and a retry may succeed;
                            # telling the user to train again would be wrong.
                            raise GenerationError(
                                f"loading LoRA weights {job.weights_path} failed: "
                                f"{type(exc).__name__}: {exc}") from exc
                        raise _does_not_fit(job.weights_path, str(exc)) from exc
                    pipe.set_adapters([adapter], adapter_weights=[float(job.lora_scale)])
            width = self._size(pipe, job.width)
            height = self._size(pipe, job.height)
            prompt_embeds, pooled = _encode_prompt(pipe, job.prompt)
            # Only for a job that can be stopped: diffusers then runs its step hook.
            steps: dict[str, Any] = ({} if job.stop is None
                                     else {"callback_on_step_end": _stop_hook(job)})
            images: list[bytes] = []
            for index in range(job.num_outputs):
                if job.abandoned():  # the pictures so far are dropped with the rest
                    raise _client_gone(f"after {index} of {job.num_outputs} picture(s)")
                job.check_stop()
                # One seed per image (seed, seed + 1, ..., wrapped at 2**32): image i of a batch
                # can be reproduced on its own with a seed the API accepts, and memory stays that
                # of one image on a real FLUX.1.
                each_seed = image_seed(seed=seed, index=index)
                generator = torch.Generator(device="cpu").manual_seed(each_seed)
                with torch.inference_mode():
                    result = pipe(
                        prompt_embeds=prompt_embeds,
                        pooled_prompt_embeds=pooled,
                        height=height,
                        width=width,
                        num_inference_steps=self._steps(pipe),
                        guidance_scale=self.guidance_scale,
                        generator=generator,
                        max_sequence_length=text_max_length(pipe),
                        output_type="pil",
                        **steps,
                    )
                images.append(_png(result.images[0], seed=each_seed, lora_scale=job.lora_scale))
            keep = loaded and weights is not None
            made = True
            return images
        except SelfieLoraError:
            raise
        except (RuntimeError, ValueError) as exc:
            raise GenerationError(f"local generation failed: {type(exc).__name__}: {exc}") from exc
        finally:
            if keep:
                # Only after a job that ended well: a failed one leaves nothing behind, as before.
                # Registered with the hold after every job, the reused LoRA's too: a close()
                # meanwhile (from another thread) found the pipeline busy with this job and
                # left the unload to it.
                assert shared is not None
                assert hold is not None
                assert weights is not None
                now_kept = (kept if reused and kept is not None
                            else _KeptLora(adapter=adapter, weights=weights,
                                           scale=job.lora_scale, hold=hold))
                if hold.keep(functools.partial(_release_kept, shared, now_kept)):
                    shared.kept = now_kept
                    loaded = False
                else:
                    shared.kept = None  # closed meanwhile: unloaded below
            elif reused:
                # This job failed with the kept LoRA: unloaded below, its hold has none.
                assert shared is not None
                assert kept is not None
                shared.kept = None
                kept.hold.dropped()
            if loaded:
                # Leave the shared pipeline as it was: no LoRA layers, no adapter names. A layer
                # widened by a LoRA wider than it is not shrunk back by this (diffusers 0.42's
                # reset_to_overwritten_params matches a layer by its last name only, so misses
                # FLUX's nested ones): _lora_misfit refuses such a LoRA before it loads.
                _unload_own(shared, pipe, job_failed=not made)


def _closed(hold: LoraHold | None) -> bool:
    return hold is None or hold.closed


def _drop_kept(shared: _SharedPipeline, pipe: Any) -> None:
    """Unload the LoRA kept in ``shared`` (its lock held): the pipeline as it was before."""
    kept, shared.kept = shared.kept, None
    if kept is None:
        return
    kept.hold.dropped()
    try:
        with loading_models():
            pipe.unload_lora_weights()
    except BaseException:
        # The pipeline may still hold some of the LoRA's layers, and records none: dropped
        # whole, so that no job runs on it; the next one loads a clean base.
        _discard(shared)
        raise


def _unload_own(shared: _SharedPipeline | None, pipe: Any, *, job_failed: bool) -> None:
    """A job's own LoRA unloaded as the job ends (``shared``'s lock held). It ran after the
    mapping of the job's errors: a failure escaped raw (a 500 with a traceback) and left the
    pipeline, which may still hold some of the LoRA's layers, to the next job, another user's.
    Now the pipeline is dropped (the next job loads a clean base) and the failure logged, not
    raised: the job's pictures, when made, are finished PNGs (their data copied off the device,
    so a fault while they were made raised before they existed) and are returned, as "a
    generation whose last picture is made is stored"; a job that failed keeps its own error."""
    try:
        with loading_models():
            pipe.unload_lora_weights()
    except BaseException as exc:
        if shared is not None:
            _discard(shared)
        if not isinstance(exc, Exception):
            raise
        if job_failed:
            logger.warning("unloading the LoRA of a failed generation failed too: %s: %s",
                           type(exc).__name__, exc)
        else:
            # An ERROR: the device may be failing (the operator looks); the job itself is done.
            logger.error("the LoRA of a generation could not be unloaded: %s: %s; its pictures "
                         "are kept, the pipeline is dropped", type(exc).__name__, exc)


def _discard(shared: _SharedPipeline) -> None:
    """``shared``'s pipeline (its lock held) forgotten: the next job loads the base again."""
    with _pipelines_lock:
        for key in [key for key, each in _pipelines.items() if each is shared]:
            del _pipelines[key]
    shared.pipe = None
    logger.warning("generator pipeline dropped: a LoRA loaded in it could not be unloaded")


def _release_closed(shared: _SharedPipeline) -> None:
    """The LoRA of a hold closed while a job had the pipeline (its ``close`` could not take it)
    unloaded once that job is done with it: the job registered it with its hold before the
    close, and the close left it to the lock's holder."""
    kept = shared.kept  # read without the lock: looked at again under it
    if kept is not None and kept.hold.closed:
        _release_kept(shared, kept)


def _release_kept(shared: _SharedPipeline, kept: _KeptLora) -> None:
    """A closed hold's LoRA unloaded, if the pipeline is free now; if a job has it, that job
    unloads it (another hold's job, before it runs; the hold's own, as it ends or once it has
    let the pipeline go), and a closing scoring does not wait minutes for a generation to
    end."""
    if not shared.lock.acquire(blocking=False):
        return
    try:
        if shared.kept is kept and shared.pipe is not None:
            _drop_kept(shared, shared.pipe)
    except Exception:
        # The pipeline is dropped (_drop_kept): a scoring's close() in its ``finally`` must
        # not replace the scoring's own result or error with this.
        logger.exception("unloading a likeness scoring's LoRA failed")
    finally:
        shared.lock.release()


def _damaged(weights_path: Path, exc: Exception) -> WeightsDamagedError:
    """The LoRA file is not a readable safetensors file: the version's, not the server's (the
    generation service names the version and what to do)."""
    return WeightsDamagedError(f"the LoRA weights file {weights_path} cannot be read: "
                               f"{type(exc).__name__}: {exc}")


def _misconfigured(exc: ConfigError) -> GenerationError:
    """The operator's setting (SELFIE_LORA_DEVICE naming a GPU torch does not see, a base model
    folder that does not load) as the trainer maps it (``contact the operator``): a 502 whose
    sentence says so, neither a 500 nor a failure the user could mend by retrying or training."""
    return GenerationError(f"local generator misconfigured: {exc.message}",
                           user_message="Generating is not set up correctly on this server; "
                                        "contact the operator.")


_T = TypeVar("_T")

# How often a generation waiting for the pipeline looks whether its client is still there.
_CLIENT_CHECK_S = 0.1


def _acquire(lock: threading.Lock, job: GenerationJob) -> None:
    """``lock`` (the process's one pipeline) taken for ``job``, or ``ClientGoneError`` (not
    held) once its client has gone, or what ``job.stop`` raises: waiting here is waiting one's
    turn (minutes each on a GPU), and a job nobody waits for any more gives its turn, and its
    user's slot, back at once."""
    if job.client_gone is None and job.stop is None:
        lock.acquire()
        return
    while not lock.acquire(timeout=_CLIENT_CHECK_S):
        if job.abandoned():
            raise _client_gone("while it waited for the pipeline")
        job.check_stop()
    try:
        if job.abandoned():
            raise _client_gone("as it got the pipeline")
        job.check_stop()
    except BaseException:
        lock.release()
        raise


def _waited(job: GenerationJob, load: Callable[[], _T]) -> _T:
    """``load()`` (the shared pipeline, loaded on its first use: tens of seconds for the tiny
    one on a busy CPU, minutes for a FLUX.1) for a job that can be dropped: loaded in a thread
    of its own while the job's client and its ``stop`` are looked at, so that a job no longer
    wanted (a probe of a training canceled meanwhile) ends at once. The load goes on then, and
    the next job finds the pipeline loaded; a GPU's release for a training waits for it
    (``release_device_pipelines`` takes the same lock), so it never lands under a training."""
    if job.client_gone is None and job.stop is None:
        return load()
    outcome: list[_T] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            outcome.append(load())
        except BaseException as exc:  # handed to the job's thread, which raises it
            failure.append(exc)

    loader = threading.Thread(target=run, name="generator-load", daemon=True)
    loader.start()
    while True:
        loader.join(_CLIENT_CHECK_S)
        if not loader.is_alive():
            break
        if job.abandoned():
            raise _client_gone("while the pipeline loaded")
        job.check_stop()
    if failure:
        raise failure[0]
    return outcome[0]


def _stop_hook(job: GenerationJob) -> Callable[..., dict[str, Any]]:
    """diffusers' ``callback_on_step_end``: ``job.stop`` after each diffusion step; what it
    raises ends the picture there (the pipeline is left as after any failed call)."""
    def hook(_pipe: Any, _step: int, _timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        job.check_stop()
        return kwargs
    return hook


def _client_gone(when: str) -> ClientGoneError:
    logger.info("generation dropped %s: its client went away", when)
    return ClientGoneError("the client went away before its pictures were made")


def _lora_misfit(pipe: Any, weights_path: Path) -> str | None:
    """Why the LoRA file at ``weights_path`` does not fit ``pipe``'s transformer (None when it
    does): a layer it names that the transformer lacks, or one of another width. Read from the
    file's header before anything is loaded, because diffusers widens a base layer narrower than
    the LoRA in place, and that layer is shared by every generation of the process."""
    from safetensors import SafetensorError, safe_open

    transformer = pipe.transformer
    try:
        with safe_open(str(weights_path), framework="pt") as weights:
            shapes = {key: weights.get_slice(key).get_shape() for key in weights.keys()}  # noqa: SIM118
    except SafetensorError as exc:
        # Neither a RuntimeError nor a ValueError: it escaped every mapping as a 500 "please
        # retry", though no retry reads a cut-short or garbled file.
        raise _damaged(weights_path, exc) from exc
    except (OSError, ValueError, RuntimeError):
        return None  # not a readable safetensors file: the load says what is wrong with it
    for key, shape in shapes.items():
        prefix, dot, rest = key.partition(".")
        if prefix != "transformer" or not dot:
            continue
        for part, features in ((".lora_A.weight", "in_features"), (".lora_B.weight", "out_features")):
            if not rest.endswith(part):
                continue
            name = rest.removesuffix(part)
            try:
                layer = transformer.get_submodule(name)
            except AttributeError:
                return f"the base model has no layer {name}"
            width = getattr(layer, features, None)
            index = 1 if features == "in_features" else 0
            if width is not None and len(shape) == 2 and shape[index] != width:
                return (f"layer {name} has {width} {features.replace('_', ' ')}, the LoRA "
                        f"{shape[index]}")
    return None


# What torch and peft say when a state dict's keys or shapes do not fit the model.
_LAYER_WORDS = ("size mismatch", "shape", "state_dict", "key", "unexpected", "missing")


def _about_the_layers(exc: RuntimeError) -> bool:
    """Whether a RuntimeError of ``load_lora_weights`` is about the LoRA's layers (a misfit the
    header check missed), as opposed to the device it was loaded on (out of memory)."""
    import torch

    if isinstance(exc, torch.OutOfMemoryError):
        return False
    text = str(exc).lower()
    return "out of memory" not in text and any(word in text for word in _LAYER_WORDS)


def _does_not_fit(weights_path: Path, why: str) -> InvalidInputError:
    # The user is told what to do; the operator's log gets the file and diffusers' words.
    logger.error("LoRA weights %s do not fit the base model: %s", weights_path, why)
    return InvalidInputError(
        "these LoRA weights do not fit this server's base model (they were trained for another "
        "one): generate with a version trained on this server, or train again",
        code=ErrorCode.UNSUPPORTED_WEIGHTS)


def _encode_prompt(pipe: Any, prompt: str) -> tuple[Any, Any]:
    """The prompt's T5 sequence and CLIP pooled embeddings, on the device the pipeline computes
    on; text encoders kept on the CPU visit it only for this (``memory.on_device``). The pipeline
    would encode the same way itself, but with its encoders where they are."""
    import torch

    from selfie_lora.adapters.flux.memory import on_device

    # The transformer's device: diffusers names the accelerator of a pipeline split across two.
    device = str(pipe._execution_device)
    with torch.inference_mode(), on_device(pipe.text_encoder, device), \
            on_device(pipe.text_encoder_2, device):
        prompt_embeds, pooled, _text_ids = pipe.encode_prompt(
            prompt=prompt, prompt_2=None, device=device,
            max_sequence_length=text_max_length(pipe))
    return prompt_embeds, pooled


def _png(image: Any, *, seed: int, lora_scale: float) -> bytes:
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("seed", str(seed))
    info.add_text("lora_scale", lora_scale_text(lora_scale))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()
