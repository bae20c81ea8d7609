"""Faces: what a face analyzer finds, and the port it implements.

In the domain because the photo checks (``dataset``) and likeness scoring (``services``) both use
them, and the checks must not depend on the services.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

# The embedding distance beyond which a face is someone else's: the photo checks refuse a photo
# this far from the centre of the set's other faces (``CheckPolicy.identity_centre_distance``;
# README "Photo checks, measured": no stranger got through, no photo of the person was refused),
# and the likeness gate's "still the same person" line is this distance as a similarity
# (``likeness.SAME_PERSON_IDENTITY``). Set here once, for both.
SAME_PERSON_DISTANCE = 0.52


@dataclass(frozen=True)
class Face:
    """One face found in an image, in that image's pixel coordinates."""

    box: tuple[int, int, int, int]  # left, top, right, bottom (may reach past the edges)
    score: float  # detector confidence; higher is surer
    landmarks: tuple[tuple[int, int], ...] = ()  # 68 points (dlib's layout) when computed
    embedding: tuple[float, ...] | None = None  # 128-d identity vector when computed

    @property
    def width(self) -> int:
        return self.box[2] - self.box[0]

    @property
    def height(self) -> int:
        return self.box[3] - self.box[1]


class FaceAnalyzer(Protocol):
    """Face detection, landmarks and identity embeddings. ``model_name`` names the embedding
    model so scores computed with different models are never compared."""

    model_name: str

    def ready(self) -> None:
        """Raise ``ConfigError`` (saying what to install) when the analyzer cannot work here.
        Cheap: checked before an intake, so a missing install is one clear error, not a
        finding about every photo."""
        ...

    def detect(self, image: Any, *, landmarks: bool = True, embed: bool = True) -> list[Face]:
        """Faces in ``image`` (an RGB ``numpy.ndarray`` of uint8, height x width x 3), largest
        first."""
        ...


# Builds an analyzer in another process (the photo-analysis workers): picklable, unlike the
# analyzers, which hold native models and locks.
AnalyzerFactory = Callable[[], FaceAnalyzer]
