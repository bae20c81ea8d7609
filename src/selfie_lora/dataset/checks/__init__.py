"""The checks that predict a good LoRA: one photo at a time, then the set as a whole.

``analyze_photo`` looks at one decoded photo: its faces (found at low resolution, then landmarks
and the identity embedding from a sharper crop around the main face), and measurements of the
face and the frame (sharpness, exposure, colour, pose, background). It judges what one photo
alone can tell (no face, several faces, a small, cut-off or low-resolution face, blur, bad
exposure, edits, filters).

``check_set`` judges what only the set can tell: near-duplicates, a different person, how many
photos there are, how varied they are (pose, framing, lighting, background), whether they show
the person the user's model was trained on (given a :class:`TrainedPerson`), and gives one verdict
(trainable, a quality word, a 0-100 score and its main reasons).

Every threshold lives in :class:`CheckPolicy`, with what it means and why it has its value. All
measurements are taken on the decoded image (maybe reduced by JPEG draft mode); sizes that
depend on the source's pixel count (the face's resolution) are scaled back to the original.

The modules, each importing only from those above it:

- ``policy``: :class:`CheckPolicy` (the thresholds) and ``CROP_FACE_FRACTION``.
- ``analysis``: the input protocols (:class:`DecodedInput`, :class:`Pixels`,
  :class:`BoxDescriber`) and the result types (:class:`PhotoMetrics`, :class:`FacePatch`,
  :class:`Keypoints`, :class:`PhotoAnalysis`, :class:`SetStats`, :class:`SetReport`,
  :class:`TrainedPerson`, ``Quality``).
- ``measures``: the pixel measurements (sharpness, exposure, colour, skin texture, pose, cut-off,
  background) that make a photo's :class:`PhotoMetrics`.
- ``duplicates``: perceptual hashes of the photo and of the face patch, and the near-duplicate
  check of the set.
- ``photo``: the check of one photo (:func:`analyze_photo`) and the editing apps
  (:func:`classify_software`).
- ``photo_set``: identity, count and variety of the set, the verdict (:func:`check_set`) and
  :func:`describe`.

Everything public is imported from here: ``from selfie_lora.dataset.checks import CheckPolicy``.
"""

from __future__ import annotations

from selfie_lora.dataset.checks.analysis import (
    BoxDescriber,
    DecodedInput,
    FacePatch,
    Keypoints,
    PhotoAnalysis,
    PhotoMetrics,
    Pixels,
    Quality,
    SetReport,
    SetStats,
    TrainedPerson,
)
from selfie_lora.dataset.checks.measures import gaussian_blur, laplacian_variance, normalized_sharpness
from selfie_lora.dataset.checks.photo import analyze_photo, classify_software
from selfie_lora.dataset.checks.photo_set import (
    AGAINST_THE_SET,
    NOT_THE_TRAINED_PERSON,
    check_set,
    describe,
)
from selfie_lora.dataset.checks.policy import CROP_FACE_FRACTION, CheckPolicy

__all__ = [
    "AGAINST_THE_SET",
    "CROP_FACE_FRACTION",
    "NOT_THE_TRAINED_PERSON",
    "BoxDescriber",
    "CheckPolicy",
    "DecodedInput",
    "FacePatch",
    "Keypoints",
    "PhotoAnalysis",
    "PhotoMetrics",
    "Pixels",
    "Quality",
    "SetReport",
    "SetStats",
    "TrainedPerson",
    "analyze_photo",
    "check_set",
    "classify_software",
    "describe",
    "gaussian_blur",
    "laplacian_variance",
    "normalized_sharpness",
]
