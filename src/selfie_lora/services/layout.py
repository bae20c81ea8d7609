"""The storage layout: the one module that makes blob keys.

Content-addressed where the content decides (photos, weights: the same bytes are stored once and
a retried write changes nothing), by id where an object owns the bytes::

    photos/<sha256>.jpg                                   a prepared, metadata-free photo
    originals/<sha256>                                    an upload as sent (only when kept)
    datasets/<dataset>/manifest.json                      a dataset's photos, findings, verdict
    weights/<sha256>.safetensors                          a version's LoRA
    generations/<generation>/<n>.png                      a user's generated image
    quality/datasets/<dataset>/<embedding model>.json     the training photos' face embeddings
    quality/versions/<version>/probe-<n>-scale-<s>.png    a likeness probe image
    quality/compare/<a>-<b>/grid.png                      a comparison grid
    quality/models/<model>/chart.png                      a model's likeness chart

(The likeness keys keep their historical ``quality/`` prefix: stored blobs stay where they are.)
"""

from __future__ import annotations

import re


def photo_key(sha256: str) -> str:
    return f"photos/{sha256}.jpg"


def original_key(sha256: str) -> str:
    return f"originals/{sha256}"


def manifest_key(dataset_id: str) -> str:
    return f"datasets/{dataset_id}/manifest.json"


def weights_key(sha256: str) -> str:
    return f"weights/{sha256}.safetensors"


def generation_image_key(generation_id: str, index: int) -> str:
    return f"generations/{generation_id}/{index}.png"


def reference_key(dataset_id: str, embedding_model: str) -> str:
    """The training photos' face embeddings (likeness scoring compares probes with them)."""
    return f"quality/datasets/{dataset_id}/{re.sub(r'[^A-Za-z0-9_.-]', '_', embedding_model)}.json"


def probe_image_key(version_id: str, index: int, lora_scale: float) -> str:
    return f"quality/versions/{version_id}/probe-{index}-scale-{lora_scale:g}.png"


def grid_key(a_id: str, b_id: str) -> str:
    return f"quality/compare/{a_id}-{b_id}/grid.png"


def chart_key(model_id: str) -> str:
    return f"quality/models/{model_id}/chart.png"
