"""The storage layout: the one module that makes blob keys.

Content-addressed where the content decides (photos, weights: the same bytes are stored once and
a retried write changes nothing), by id where an object owns the bytes::

    photos/<sha256>.jpg                                   a prepared, metadata-free photo
    originals/<sha256>                                    an upload as sent (only when kept)
    datasets/<dataset>/manifest.json                      a dataset's photos, findings, verdict
    weights/<sha256>.safetensors                          a version's LoRA
    generations/<generation>/<n>.png                      a user's generated image
    quality/datasets/<dataset>/<embedding model>.json     the training photos' face embeddings
    quality/versions/<version>/probe-<n>-scale-<s>[-<side>px].png  a likeness probe image
    quality/compare/<a>-<b>/grid.png                      a comparison grid
    quality/models/<model>/chart.png                      a model's likeness chart
    checkpoints/<training>/step-<8 digits>.ckpt           a local training's newest checkpoint
    samples/<training>/step-<8 digits>.jpg                a sample image made during a training
    deployment.json                                       the deployment the store belongs to

(The likeness keys keep their historical ``quality/`` prefix: stored blobs stay where they are.)

The training service deletes a training's checkpoints when it ends with a version or fails, and
keeps a canceled training's for ``resume``; the collector deletes those a worker that died in
between left behind (their training ended and cannot be resumed, or its row is gone). Samples
belong to their training, and go when its row does (a sample written for a training whose row
never committed is an orphan).

``owner_of`` reads a key back (the garbage collector asks whom a listed blob belongs to);
``is_valid_key`` says which keys any store takes (the stores refuse every other key, and the
collector keeps such a key however it is named).
"""

from __future__ import annotations

import re

from selfie_lora.domain.gc import Owner

# Keys are made here, never from user input: every store refuses a key that does not match (the
# second line of defence against a key that would escape the file system store's root).
KEY_PATTERN = re.compile(r"[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*")
# "." names the folder itself on the file system ("photos/./a.jpg" is "photos/a.jpg"), ".." its
# parent; object storage refuses both.
_DOT_SEGMENTS = frozenset({".", ".."})


# The stores name their temporary files so: a blob named so would be hidden from listings and
# removed as a dead write's leftover.
TEMPORARY_PREFIX = ".tmp-"


def is_valid_key(key: str) -> bool:
    """Whether the stores take ``key``. A listed blob can fail this (put there by hand, by a sync
    tool): the stores refuse to touch it, so the collector must leave it alone."""
    segments = key.split("/")
    return (bool(KEY_PATTERN.fullmatch(key)) and _DOT_SEGMENTS.isdisjoint(segments)
            and not any(s.startswith(TEMPORARY_PREFIX) for s in segments))


# Every prefix a key starts with: what the garbage collector lists.
PREFIXES = ("photos", "originals", "datasets", "weights", "generations", "quality", "samples",
            "checkpoints")
# The marker that binds the store to one database (``services.deployment``). At the root, under
# none of the PREFIXES: the collector never lists it, so never takes it for an orphan.
DEPLOYMENT_KEY = "deployment.json"


def photo_key(sha256: str) -> str:
    return f"photos/{sha256}.jpg"


def original_key(sha256: str) -> str:
    return f"originals/{sha256}"


def dataset_prefix(dataset_id: str) -> str:
    return f"datasets/{dataset_id}"


def manifest_key(dataset_id: str) -> str:
    return f"{dataset_prefix(dataset_id)}/manifest.json"


def weights_key(sha256: str) -> str:
    return f"weights/{sha256}.safetensors"


def generation_prefix(generation_id: str) -> str:
    return f"generations/{generation_id}"


def generation_image_key(generation_id: str, index: int) -> str:
    return f"{generation_prefix(generation_id)}/{index}.png"


def dataset_quality_prefix(dataset_id: str) -> str:
    return f"quality/datasets/{dataset_id}"


def reference_key(dataset_id: str, embedding_model: str) -> str:
    """The training photos' face embeddings (likeness scoring compares probes with them)."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", embedding_model)
    return f"{dataset_quality_prefix(dataset_id)}/{name}.json"


def version_quality_prefix(version_id: str) -> str:
    return f"quality/versions/{version_id}"


def probe_image_key(version_id: str, index: int, lora_scale: float,
                    size: int | None = None) -> str:
    """A probe image of a version; ``size``: the side asked for (None: the generator's own),
    so a probe made at another size is never taken for this one."""
    side = f"-{size}px" if size is not None else ""
    return f"{version_quality_prefix(version_id)}/probe-{index}-scale-{lora_scale:g}{side}.png"


def grid_key(a_id: str, b_id: str) -> str:
    return f"quality/compare/{a_id}-{b_id}/grid.png"


def model_quality_prefix(model_id: str) -> str:
    return f"quality/models/{model_id}"


def chart_key(model_id: str) -> str:
    return f"{model_quality_prefix(model_id)}/chart.png"


_OWNERS: tuple[tuple[re.Pattern[str], Owner], ...] = tuple(
    (re.compile(pattern), owner) for pattern, owner in (
        (r"photos/(?P<id>[0-9a-f]{64})\.jpg", Owner.PHOTO),
        (r"(?P<id>originals/[0-9a-f]{64})", Owner.ORIGINAL),
        (r"datasets/(?P<id>[^/]+)/manifest\.json", Owner.DATASET),
        (r"(?P<id>weights/[0-9a-f]{64}\.safetensors)", Owner.WEIGHTS),
        (r"generations/(?P<id>[^/]+)/[0-9]+\.png", Owner.GENERATION),
        (r"quality/datasets/(?P<id>[^/]+)/[^/]+\.json", Owner.DATASET),
        (r"quality/versions/(?P<id>[^/]+)/probe-[0-9]+-scale-[^/]+\.png", Owner.VERSION),
        (r"quality/compare/(?P<id>[^/]+)/grid\.png", Owner.COMPARISON),
        (r"quality/models/(?P<id>[^/]+)/chart\.png", Owner.MODEL),
        (r"samples/(?P<id>[^/]+)/step-[0-9]{8}\.jpg", Owner.TRAINING),
        (r"checkpoints/(?P<id>[^/]+)/step-[0-9]{8}\.ckpt", Owner.CHECKPOINT),
    ))


def _step_key(folder: str, training_id: str, step: int, ext: str) -> str:
    return f"{folder}/{training_id}/step-{step:08d}.{ext}"


def _step_of(folder: str, ext: str, key: str) -> int | None:
    match = re.fullmatch(rf"{folder}/[^/]+/step-(\d{{8}})\.{ext}", key)
    return int(match[1]) if match else None


def checkpoint_prefix(training_id: str) -> str:
    return f"checkpoints/{training_id}"


def checkpoint_key(training_id: str, step: int) -> str:
    return _step_key("checkpoints", training_id, step, "ckpt")


def checkpoint_step(key: str) -> int | None:
    """The step of a key made by ``checkpoint_key``, None for any other key."""
    return _step_of("checkpoints", "ckpt", key)


def sample_prefix(training_id: str) -> str:
    return f"samples/{training_id}"


def sample_key(training_id: str, step: int) -> str:
    """One key per step: the same step written again (a resumed run) replaces the image."""
    return _step_key("samples", training_id, step, "jpg")


def sample_step(key: str) -> int | None:
    """The step of a key made by ``sample_key``, None for any other key."""
    return _step_of("samples", "jpg", key)


def owner_of(key: str) -> tuple[Owner, str] | None:
    """What a key made here belongs to, and that owner's id (the sha256 of a photo; the key
    itself for weights and originals, which rows name whole). None for a key this layout does
    not make (written by a newer release, or by hand) or that no store takes
    (``is_valid_key``: "generations/copy of g/0.png"): the collector keeps those."""
    if not is_valid_key(key):
        return None
    for pattern, owner in _OWNERS:
        match = pattern.fullmatch(key)
        if match:
            return owner, match["id"]
    return None
