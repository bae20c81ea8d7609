"""The offline ``tiny`` FLUX pipeline (``flux.loader`` loads it, or a real FLUX.1 folder).

``tiny`` is a FluxPipeline with FLUX.1-dev's architecture (double + single stream blocks, guidance
embedding, 16-channel VAE latents packed 2x2, CLIP pooled + T5 sequence text conditioning) at a toy
size and with random, seeded weights. It needs no hub access, runs on a CPU in milliseconds and is
what the tests and the demo train on. It is built once from configs and saved under
``cache_dir / "tiny-flux-v1"`` so later loads (also in other processes) are fast and identical.

Torch and diffusers are imported inside the functions: importing them costs seconds, and the API
and CLI import this package without needing them.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import stat
import threading
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from selfie_lora.adapters.flux.runtime import require_torch
from selfie_lora.errors import ConfigError
from selfie_lora.services.owners import (
    process_gone,
    quiet_since,
    read_scratch_mark,
    scratch_mark,
)

if TYPE_CHECKING:
    pass

logger = logging.getLogger(__name__)

TINY = "tiny"
# Bump the suffix whenever anything below changes the built weights, so stale caches are ignored.
TINY_CACHE_NAME = "tiny-flux-v1"
TINY_SEED = 20240801
# The sequence lengths the tiny text encoders are built for. Keeping T5's short is what keeps a
# tiny training step in the milliseconds (text tokens join the image tokens in every attention).
TINY_CLIP_MAX_LENGTH = 77
TINY_T5_MAX_LENGTH = 32
TINY_RESOLUTION = 64
# A build writes into ``.tiny-flux-v1.tmp-<mark>-<random>`` beside its final folder and renames it:
# ``<mark>`` is its ``scratch_mark`` (the pid, with its process space where that is known).
_BUILDING_PREFIX = f".{TINY_CACHE_NAME}.tmp-"
# A build's folder nothing in it changed for this long is a dead build's, whatever its pid says
# (pids are reused: a container's process is PID 1 every time). A build takes seconds.
STALE_BUILD_SECONDS = 60 * 60

_build_lock = threading.Lock()


# --------------------------------------------------------------------------- tokenizers


def _byte_alphabet() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for raw bytes (GPT-2's table)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table: dict[int, str] = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def build_tiny_clip_tokenizer() -> Any:
    """A byte-level BPE CLIPTokenizer with a generated vocabulary: every byte, alone and word-final.

    A handful of merges for lowercase letter pairs are included so the BPE model is a real one (the
    tokenizers library insists every merge part is in the vocabulary, which holds by construction).
    """
    import transformers

    # The vendor classes are used as Any: their stubs (where present) are partial or untyped.
    lib: Any = transformers
    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in _byte_alphabet():
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    merges: list[tuple[str, str]] = []
    for pair in ("th", "er", "in", "an", "on", "or", "en", "at"):
        left, right = pair[0], pair[1]
        merges.append((left, right))
        vocab.setdefault(left + right, len(vocab))
        merges.append((left, right + "</w>"))
        vocab.setdefault(left + right + "</w>", len(vocab))
    return lib.CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=TINY_CLIP_MAX_LENGTH)


def build_tiny_t5_tokenizer() -> Any:
    """A Unigram T5 tokenizer over single characters (with and without the word-start marker)."""
    import transformers

    lib: Any = transformers
    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    chars = [chr(c) for c in range(ord("!"), ord("~") + 1)]
    # Scores only rank the segmentations; word-initial pieces first keeps "▁x" as one token.
    pieces.extend(("▁" + ch, -3.0) for ch in chars)
    pieces.extend((ch, -4.0) for ch in chars)
    return lib.T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=TINY_T5_MAX_LENGTH)


# --------------------------------------------------------------------------- models


def build_tiny_pipeline(*, seed: int = TINY_SEED) -> Any:
    """Build the tiny FluxPipeline in memory (float32, CPU), every component seeded.

    The global torch RNG is forked, so building does not disturb the caller's random state.
    """
    require_torch()
    import diffusers
    import torch
    import transformers

    # Vendor classes as Any: their stubs (where present) are partial or untyped.
    dif: Any = diffusers
    tra: Any = transformers

    clip_tokenizer = build_tiny_clip_tokenizer()
    t5_tokenizer = build_tiny_t5_tokenizer()

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = dif.FluxTransformer2DModel(
            patch_size=1,
            in_channels=64,  # 16 latent channels packed 2x2
            num_layers=2,
            num_single_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            pooled_projection_dim=32,
            guidance_embeds=True,  # like FLUX.1-dev, so the guidance path is exercised
            axes_dims_rope=(4, 6, 6),  # must sum to attention_head_dim
        )

        torch.manual_seed(seed + 1)
        # 4 blocks give FLUX's 8x downscale; FLUX's VAE has no quant convs and shifts its latents.
        vae = dif.AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 8, 16, 16),
            layers_per_block=1,
            latent_channels=16,
            norm_num_groups=4,
            sample_size=TINY_RESOLUTION,
            scaling_factor=0.3611,
            shift_factor=0.1159,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )

        torch.manual_seed(seed + 2)
        text_encoder = tra.CLIPTextModel(
            tra.CLIPTextConfig(
                vocab_size=len(clip_tokenizer),
                hidden_size=32,  # = pooled_projection_dim
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                max_position_embeddings=TINY_CLIP_MAX_LENGTH,
                projection_dim=32,
                bos_token_id=clip_tokenizer.bos_token_id,
                eos_token_id=clip_tokenizer.eos_token_id,
                pad_token_id=clip_tokenizer.pad_token_id,
            )
        )

        torch.manual_seed(seed + 3)
        text_encoder_2 = tra.T5EncoderModel(
            tra.T5Config(
                vocab_size=len(t5_tokenizer),
                d_model=32,  # = joint_attention_dim
                d_kv=16,
                d_ff=64,
                num_layers=2,
                num_heads=2,
                relative_attention_num_buckets=8,
                relative_attention_max_distance=16,
                feed_forward_proj="gated-gelu",
                pad_token_id=t5_tokenizer.pad_token_id,
                eos_token_id=t5_tokenizer.eos_token_id,
                decoder_start_token_id=t5_tokenizer.pad_token_id,
                is_encoder_decoder=False,
            )
        )

    # FLUX.1-dev's scheduler settings (resolution-dependent shift).
    scheduler = dif.FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    modules: tuple[Any, ...] = (transformer, vae, text_encoder, text_encoder_2)
    for module in modules:
        module.eval()
    return dif.FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=t5_tokenizer,
        transformer=transformer,
    )


def tiny_pipeline_dir(cache_dir: Path) -> Path:
    """Where the tiny pipeline lives, building and saving it first if it is not there yet.

    Safe against concurrent builders (threads here, other worker processes): each builds into its
    own temporary folder, locked while it writes, and renames it into place; the loser of the
    race drops its copy. A dead build's folder is removed here (``sweep_dead_builds``).
    """
    target = cache_dir / TINY_CACHE_NAME
    sweep_dead_builds(cache_dir)
    if (target / "model_index.json").is_file():
        return target
    with _build_lock:
        if (target / "model_index.json").is_file():
            return target
        cache_dir.mkdir(parents=True, exist_ok=True)
        # The pid is only this machine's and pid namespace's: the mark says which.
        tmp = cache_dir / f"{_BUILDING_PREFIX}{scratch_mark()}-{uuid.uuid4().hex[:8]}"
        logger.info("building the tiny FLUX pipeline into %s", target)
        lock: int | None = None
        try:
            tmp.mkdir()
            lock = _lock_while_building(tmp)
            pipe = build_tiny_pipeline()
            pipe.save_pretrained(str(tmp))
            try:
                os.rename(tmp, target)
            except OSError:
                # Another process finished first; its copy is identical (same seed, same configs).
                if not (target / "model_index.json").is_file():
                    raise
        except OSError as exc:
            raise ConfigError(f"cannot write the tiny pipeline cache under {cache_dir}: {exc}") from exc
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            if lock is not None:
                os.close(lock)
    return target


def _lock_while_building(folder: Path) -> int | None:
    """``folder`` locked (``flock``) until the descriptor returned is closed: the kernel drops
    the lock with the process, so ``sweep_dead_builds`` knows a folder it can lock is no live
    build's. None where the file system has no such locks (the age alone decides there)."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError as exc:
        os.close(fd)
        logger.debug("cannot lock %s while building (%s)", folder, exc)
        return None
    return fd


def sweep_dead_builds(cache_dir: Path, *, now: float | None = None) -> int:
    """Removes the temporary folders of tiny builds that died before their rename (SIGKILL, the
    OOM killer, a machine that went down: tens of MB each, which nothing else ever removes);
    how many. A folder goes only when no build holds its lock and its builder is certainly gone:
    it names this machine's and pid namespace's ``process_space`` and its pid is no process
    here, or nothing in it changed for an hour. The pid of another space's build (another
    machine on a shared cache, whose lock is not seen here where locks hold only on each
    machine: NFS mounted ``nolock`` or ``local_lock=flock``; another container on a shared
    volume) says nothing here, nor does one taken again since, so the age alone decides
    for those. Another account's folders, and names not ours, are left alone."""
    try:
        found = [p for p in cache_dir.iterdir() if p.name.startswith(_BUILDING_PREFIX)]
    except OSError:
        return 0  # no cache yet, or one this process cannot read: nothing of ours to remove
    moment = time.time() if now is None else now
    removed = 0
    for folder in found:
        if _remove_if_dead(folder, now=moment):
            logger.info("removed %s, left by a tiny FLUX build that died", folder)
            removed += 1
    return removed


def _remove_if_dead(folder: Path, *, now: float) -> bool:
    # An older build's name (``<pid>-<random>``, ``<pid>-unknown-<random>``) reads as a mark
    # without a space: its pid is trusted no more than another machine's.
    mark, _, random = folder.name.removeprefix(_BUILDING_PREFIX).rpartition("-")
    owner = read_scratch_mark(mark) if random else None
    if owner is None or owner[0] <= 0:
        return False  # not a name this module makes
    gone = process_gone(*owner)
    try:
        found = folder.lstat()
        if not stat.S_ISDIR(found.st_mode) or found.st_uid != os.geteuid():
            return False  # a link, a file, or another account's: not ours to delete
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        return False  # gone meanwhile (renamed into place, or swept by another process)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # a live build holds it
        except OSError:
            pass  # no locks on this file system: the pid and the age decide
        # Held while it goes: a build that made its folder but has not locked it yet waits.
        if not gone and not quiet_since(folder, now - STALE_BUILD_SECONDS):
            return False
        shutil.rmtree(folder, ignore_errors=True)
        return not folder.exists()
    finally:
        os.close(fd)
