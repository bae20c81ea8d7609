"""What the checks read and what they give: the input protocols (:class:`DecodedInput`,
:class:`Pixels`, :class:`BoxDescriber`) and the result types of one photo (:class:`PhotoMetrics`,
:class:`FacePatch`, :class:`PhotoAnalysis`) and of the set (:class:`SetStats`,
:class:`SetReport`), and the person a model was trained on (:class:`TrainedPerson`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from selfie_lora.domain.entities import Finding
from selfie_lora.domain.faces import Face

Quality = Literal["excellent", "good", "fair", "poor"]
FloatArray = NDArray[np.float64]


class Pixels(Protocol):
    """A decoded photo's pixels as the checks and the preparation read them: a Pillow image, or
    a view of a photo kept in its own colours that gives sRGB copies
    (``selfie_lora.dataset.decode.ColourManaged``). Only copies are taken from it (a region, a
    reduced or a resized copy), each a plain RGB image; ``mode`` is what those copies have."""

    @property
    def size(self) -> tuple[int, int]: ...

    @property
    def width(self) -> int: ...

    @property
    def height(self) -> int: ...

    @property
    def mode(self) -> str: ...

    def reduce(self, factor: int | tuple[int, int],
               box: tuple[int, int, int, int] | None = None) -> Image.Image: ...

    def resize(self, size: tuple[int, int], resample: int | None = None,
               box: tuple[float, float, float, float] | None = None,
               reducing_gap: float | None = None) -> Image.Image: ...

    def crop(self, box: tuple[float, float, float, float] | None = None) -> Image.Image: ...


class DecodedInput(Protocol):
    """What the checks and the preparation read from a decoded photo
    (``selfie_lora.dataset.decode.DecodedPhoto`` has all of it)."""

    @property
    def name(self) -> str: ...

    @property
    def image(self) -> Pixels: ...  # RGB, orientation applied, maybe reduced

    @property
    def original_size(self) -> tuple[int, int]: ...

    @property
    def exif_software(self) -> str | None: ...

    @property
    def had_exif(self) -> bool: ...


@runtime_checkable
class BoxDescriber(Protocol):
    """An analyzer that can give landmarks and the embedding of a face from a known box, without
    detecting it again (``DlibRegionFaceAnalyzer``). Others are asked to ``detect`` on a crop."""

    def describe(self, image: Any, box: tuple[int, int, int, int], *,
                 embed: bool = True) -> Face: ...


@dataclass(frozen=True)
class PhotoMetrics:
    """Measurements of one photo. Angles in degrees (estimated from landmarks: approximate)."""

    face_fraction: float  # sqrt(face box area / image area)
    face_px: float  # face box height in the original photo's pixels
    upscale: float  # how much the training crop would be blown up (1 = none needed)
    cut_off: float  # how far the face reaches past the frame, as a fraction of its size
    sharpness: float  # Laplacian variance on the contrast-normalised face
    face_luma: float  # mean luminance of the face (0-255)
    face_luma_low: float  # its 10th percentile: how bright the face's shadows are
    face_luma_high: float  # its 90th percentile: how bright the face's highlights are
    face_clipped: float  # share of the face's pixels at black or white
    frame_clipped: float  # the same for the whole frame
    skin_saturation: float  # mean HSV saturation of the face (0-1)
    garish_fraction: float  # share of the frame at saturation >= 0.9
    skin_texture: float | None  # cheeks' high frequencies / the face's; None: not judged
    yaw: float | None
    pitch: float | None
    roll: float | None
    light_asymmetry: float  # (left - right) face half luminance / mean: side lighting
    background: tuple[float, float, float]  # mean Y, Cb, Cr outside the person


@dataclass(frozen=True)
class FacePatch:
    """A grey 64x64 patch centred on the face for near-duplicate tests, with the rectangle of it
    that lies inside the photo (x0, y0, x1, y1 in patch pixels)."""

    pixels: bytes
    inside: tuple[int, int, int, int]
    # Hashes of the inside part, computed once in analysis: most pairs compare whole patches.
    phash: str = ""
    dhash: str = ""

    SIDE = 64


@dataclass(frozen=True)
class Keypoints:
    """ORB keypoints of the scene around the face, the photo scaled so the face is
    ``FACE_SIDE`` px tall (a copy, a crop and a resize of one photo then meet at one scale), and
    the same of its mirror image, strongest first. Points are float32 (x, y) pairs in that
    scaled window, descriptors 32 bytes each."""

    points: bytes
    descriptors: bytes
    mirror_points: bytes
    mirror_descriptors: bytes

    FACE_SIDE = 96

    @property
    def count(self) -> int:
        return len(self.descriptors) // 32


@dataclass(frozen=True)
class PhotoAnalysis:
    """What ``analyze_photo`` found. Coordinates are in ``image_size`` pixels (the decoded image);
    ``scale`` turns them into the original photo's pixels. Plain values only, so analyses travel
    between processes."""

    name: str
    image_size: tuple[int, int]
    scale: float
    faces: tuple[Face, ...]  # every face found, largest first
    main_face: Face | None  # the photo's subject, with landmarks and embedding when found
    findings: tuple[Finding, ...]
    metrics: PhotoMetrics | None = None
    whole_phash: str | None = None
    whole_dhash: str | None = None
    face_patch: FacePatch | None = None
    keypoints: Keypoints | None = None
    had_exif: bool = False
    order: int = 0  # position in the upload: breaks ties the same way every time

    @property
    def embedding(self) -> tuple[float, ...] | None:
        return self.main_face.embedding if self.main_face else None

    @property
    def rejected(self) -> bool:
        return any(f.severity == "reject" for f in self.findings)


@dataclass(frozen=True)
class TrainedPerson:
    """The person a user's model was trained on, for a retraining's set to be compared with:
    the version (its number, as the user sees it) and the face embeddings of its training
    photos (those without a face left out), as the intake stored them."""

    version: int
    embeddings: tuple[tuple[float, ...], ...]
    # Whether the likeness gate judges a retraining against that version: it is the active one
    # and the gate is on. Else (the newest of versions none of which is active, or
    # SELFIE_LORA_QUALITY_GATE=false) the new version is activated at once, held by nothing.
    gated: bool = True


@dataclass(frozen=True)
class SetStats:
    """The spreads behind the variety findings (None: not measured)."""

    photos: int
    yaw_spread: float | None = None
    pitch_spread: float | None = None
    framing_spread: float | None = None
    lighting_spread: float | None = None
    side_light_spread: float | None = None
    background_spread: float | None = None


@dataclass(frozen=True)
class SetReport:
    """The whole set's verdict. ``findings`` holds every finding of the analyses and of the set
    (per photo ones carry ``photo``); ``accepted`` names the photos to train on, in upload order."""

    trainable: bool
    quality: Quality
    score: int
    reasons: tuple[str, ...]
    findings: tuple[Finding, ...]
    accepted: tuple[str, ...]
    rejected: tuple[str, ...]
    stats: SetStats = field(default_factory=lambda: SetStats(photos=0))
