"""``DlibFaceAnalyzer`` plus ``describe``: landmarks and the embedding of a face whose box is
already known.

The photo checks find faces on a small copy of a photo (cheap) and want landmarks and the
identity embedding from a sharper crop around the main face only. With ``detect`` alone that
means running the detector a second time on the crop (~10 ms a photo); ``describe`` goes
straight from the box to the landmarks (dlib's shape predictor is trained on its detector's
boxes, whatever the resolution they were found at) and the embedding.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selfie_lora.adapters.faces.dlib_faces import DlibFaceAnalyzer, Embedder
from selfie_lora.domain.faces import Face

logger = logging.getLogger(__name__)


class DlibRegionFaceAnalyzer(DlibFaceAnalyzer):
    """Thread-safe like its parent (the same lock guards every dlib call)."""

    def describe(self, image: Any, box: tuple[int, int, int, int], *,
                 embed: bool = True) -> Face:
        """The face in ``box`` (left, top, right, bottom in ``image``'s pixels; may reach past
        the edges) with landmarks and, when ``embed``, the embedding. ``score`` is 0: nothing
        was detected here."""
        import dlib
        import numpy as np

        array = np.ascontiguousarray(image, dtype=np.uint8)
        if array.ndim != 3 or array.shape[2] != 3:
            raise ValueError("describe() needs an RGB image of shape (height, width, 3)")
        left, top, right, bottom = (int(v) for v in box)
        rect = dlib.rectangle(left, top, right, bottom)
        with self._lock:
            _detector, predictor, encoder = self._models()
            shape = predictor(array, rect)
            points = tuple((p.x, p.y) for p in shape.parts())
            embedding = None
            if embed:
                embedding = encoder(array, shape, self._jitters)
        return Face(box=(left, top, right, bottom), score=0.0, landmarks=points,
                    embedding=embedding)


@dataclass(frozen=True)
class DlibAnalyzerFactory:
    """Builds a ``DlibRegionFaceAnalyzer`` in the process that calls it: the wiring hands one to
    the photo intake, which pickles it into its worker processes (an analyzer holds dlib's
    models and a lock, and cannot cross). ``preload``: modules the fork server imports once."""

    upsample: int = 0
    num_jitters: int = 1
    landmarks: int = 5  # 68: the non-commercial model (see ``dlib_faces``)
    embedder: Embedder = "onnx"
    model_cache_dir: Path | None = None
    preload: tuple[str, ...] = ("dlib", "onnxruntime")

    def __call__(self) -> DlibRegionFaceAnalyzer:
        return DlibRegionFaceAnalyzer(upsample=self.upsample, num_jitters=self.num_jitters,
                                      landmarks=self.landmarks, embedder=self.embedder,
                                      model_cache_dir=self.model_cache_dir)
