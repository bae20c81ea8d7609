"""The thresholds of the photo checks: :class:`CheckPolicy`, and the constants the preparation
shares with them.
"""

from __future__ import annotations

from dataclasses import dataclass

from selfie_lora.domain.faces import SAME_PERSON_DISTANCE

# The face box (dlib's: brows to chin) as a share of the training crop's side: 0.42 keeps the
# hair, the neck and the top of the shoulders in the square (``prepare`` crops with it).
CROP_FACE_FRACTION = 0.42


@dataclass(frozen=True)
class CheckPolicy:
    """Every threshold of the checks. The figures quoted were measured on the fixture photos
    (tests/fixtures/photos: press photos, 600-2300 px, faces 220-340 px) and edited copies of
    them (blurred, darkened, brightened, saturated, airbrushed, cropped, re-saved)."""

    # ---- the set
    # The trainer's square resolution (Replicate 1024, local FLUX 512, tiny 64): the face must
    # have enough pixels for a crop of this size.
    resolution: int = 1024
    # The trainer's recipe trains in aspect-ratio buckets (``Recipe.aspect_buckets``): each photo
    # is cropped to its nearest bucket's shape and size instead of a square.
    aspect_buckets: bool = False
    # Hard limits on photos kept after the checks: outside them the set cannot train.
    min_photos: int = 5
    max_photos: int = 50
    # What works best for a FLUX person LoRA: fewer lacks variety, more adds little.
    recommended_min: int = 15
    recommended_max: int = 25

    # ---- decoding: photos are decoded with at least this short side (and at least
    # ``resolution``): JPEG draft mode then decodes a 12 MP photo at half size, ~2x faster than
    # in full, while the face keeps enough pixels for the blur and skin measurements.
    decode_min_side: int = 1024

    # ---- detection
    # Faces are found on a copy with this long side (~25 ms a photo; at 512 px fewer second
    # faces and cut-off faces were found in bench/checks_eval.py); landmarks and the
    # embedding of the main face then come from a crop around it (straight from the box with a
    # ``BoxDescriber``, else by detecting again on the crop).
    detect_side: int = 640
    # When nothing is found, one retry at this long side (small faces in large photos).
    detect_retry_side: int = 1280
    # The face's size in the crop used for landmarks and the embedding (dlib's embedding works
    # on a 150 px chip: more pixels add nothing, and the crop's detection costs ~6 ms at 150).
    refine_face_side: int = 150

    # ---- several faces (sizes relative to the main face's height)
    # Smaller faces are far in the background: only an ``info``.
    background_face_ratio: float = 0.3
    # From here on the other face competes with the main one (whose photo is it?): ``reject``.
    # Between the two: ``warn``.
    competing_face_ratio: float = 0.6

    # ---- face size in the frame: sqrt(face box area / image area). Fixtures: 0.15 (obama3,
    # standing) to 0.35 (obama2, podium). Below: a full-body or group shot; the face-aware crop
    # still works when the face has enough pixels, so only ``warn``. Below the reject value
    # detection and identity are unsure.
    min_face_fraction: float = 0.08
    reject_face_fraction: float = 0.035

    # ---- cut off by the frame: how far the face box (or the jaw/brow landmarks) reaches past an
    # edge, as a fraction of the face's size. dlib's box is tight (brows to chin), so a few
    # percent past the edge means a part of the face is missing. The fixture crops of obama.jpg
    # (an ear and a cheek missing) measure 0.21-0.23; whole faces 0.
    cut_off_warn: float = 0.04
    cut_off_reject: float = 0.15

    # ---- resolution: the face fills ``crop_face_fraction`` of the training crop, so it needs
    # resolution * crop_face_fraction pixels in the original; upscaling more than these factors
    # shows as mush in training.
    crop_face_fraction: float = CROP_FACE_FRACTION
    upscale_warn: float = 1.5
    upscale_reject: float = 3.0

    # ---- blur: variance of the Laplacian of the face box resized to blur_face_side (a smaller
    # face at its own size: blown up, any small face would read as blurred), after the face's
    # grey levels are scaled to a standard deviation of 50 (so a dark or low-contrast face is
    # not taken for a blurred one). The other face measurements use the blur_face_side crop.
    # Fixture faces 114-585; Gaussian blur of radius 1 px: 54, 2 px: 11, 3 px: 3-5; darkened to
    # 30%: unchanged (585). The 45 real photos and their harmless copies: 33 and up; blurred
    # by a 60th of the face's height: 17 and below (README: "Photo checks, measured").
    blur_face_side: int = 256
    blur_warn: float = 60.0
    blur_reject: float = 25.0

    # ---- exposure (luminance 0-255 on the face box; clipped = <= 8 or >= 247). Judged on the
    # face's highlights (90th percentile) for darkness and on its shadows (10th percentile) for
    # brightness, not on its mean: a well-lit dark-skinned face has a low mean but bright
    # highlights, a well-lit pale face a high mean but real shadows. Fixture faces: highlights
    # 145-209, shadows 35-95; obama.jpg darkened to 45% -> highlights 84, to 30% -> 56;
    # brightened x1.6 -> shadows 146 and 31% clipped, x2 -> 176 and 62%.
    dark_highlights_warn: float = 100.0
    dark_highlights_reject: float = 65.0
    bright_shadows_warn: float = 150.0
    bright_shadows_reject: float = 185.0
    clipped_face_warn: float = 0.15
    clipped_face_reject: float = 0.35

    # ---- colour: mean HSV saturation of the face (fixture faces 0.39-0.48; darker skin and warm
    # light raise it) and the share of the frame that is garish (saturation >= 0.9 at a visible
    # brightness; fixtures 0.00-0.04). A saturation boost raises both (x2: 0.63 / 0.15, x2.5:
    # 0.72-0.81 / 0.15-0.35), warm light mostly the first: either warns, both reject.
    skin_saturation_warn: float = 0.62
    skin_saturation_reject: float = 0.7
    garish_fraction_warn: float = 0.2
    garish_fraction_reject: float = 0.12
    # A black-and-white photo (greyscale, or a filter that all but drains the colour): a LoRA
    # trained on it learns grey skin. The face's saturation is ~0.00 in greyscale and 0.05-0.10
    # at a fifth of its colour; real faces of bench/checks_eval.py's photos 0.24-0.6 (pale skin
    # in grey light the lowest). The frame is not asked: grey walls are common (0.06). A
    # warning: the photo still shows the face.
    grey_skin_saturation: float = 0.1

    # ---- skin texture: high-frequency energy on the cheeks / on the whole face, judged only
    # when the face is sharp, well exposed and has enough pixels (below it every face looks
    # smooth). Fixture faces 0.64-0.93; the skin alone airbrushed (Gaussian blur through a mask
    # that keeps eyes, brows, nose and mouth) radius 2: 0.13-0.35, radius 4-8: 0.07-0.22. The
    # real photos of bench/checks_eval.py overlap more: press photos 0.17-1.06 (a tenth under
    # 0.30: retouched or soft-focus, for all we know), a beauty filter's edge-preserving blur
    # 0.05-0.45 (median 0.21). 0.28 is where the evaluation balances the two; only a warning.
    smooth_skin_min_face_px: int = 160
    smooth_skin_ratio: float = 0.28

    # ---- near-duplicates. Two photos are one when ORB keypoints of the scene around the face
    # (``dup_keypoints`` of them, in a window ``dup_window_face_sizes`` face sizes wide, the
    # photo scaled so the face is 96 px tall) match, at most ``dup_orb_distance`` bits apart,
    # and at least ``dup_shared_points`` of them fall where one similarity transform puts them,
    # to ``dup_ransac_px`` (RANSAC). Measured by bench/checks_eval.py on the 45 real photos:
    # copies, crops, resizes and mirror images of a photo share 64 or more; two different photos
    # of one person at most 20 (the face aligns only roughly: expression, pose, light). A pair is
    # only looked at closely when ``dup_gate_matches`` of the ``dup_gate_keypoints`` strongest
    # match within ``dup_gate_distance`` bits (copies 10 or more, other pairs mostly under 5).
    dup_window_face_sizes: float = 5.0
    dup_keypoints: int = 500
    dup_orb_distance: int = 64
    dup_ransac_px: float = 1.5
    dup_shared_points: int = 30
    dup_gate_keypoints: int = 100
    dup_gate_distance: int = 32
    dup_gate_matches: int = 6
    # Without keypoints (no face found, a featureless photo): Hamming distances of 64-bit
    # perceptual hashes (both must be under). Whole frame: copies (PNG of a JPEG, resized) 0
    # apart; different fixture photos >= 20. Face patch: copies and crops 0-12 apart on the
    # fixtures (up to 26 on the real photos: the detector's box moves); different photos of one
    # person from 16.
    dup_whole_phash: int = 8
    dup_whole_dhash: int = 12
    dup_face_phash: int = 16
    dup_face_dhash: int = 16
    # The face patch spans this many face sizes; two patches are only compared on what both
    # photos show, and only when that is at least this share of the patch.
    dup_patch_face_sizes: float = 2.0
    dup_min_overlap: float = 0.35

    # ---- identity (dlib embeddings: same person ~0.2-0.45 apart, others > 0.6)
    # Distance to the median of the other photos' embeddings (sets of centre_min_photos or more).
    # Fixtures: the same person 0.22-0.32 from the others' centre, another person 0.79. Over the
    # warn value the photo is kept but flagged (a sibling, or the user at a hard angle).
    identity_centre_warn: float = 0.45
    # Also the likeness gate's "same person" line: set once, in the domain.
    identity_centre_distance: float = SAME_PERSON_DISTANCE
    # Pairwise distance for small sets (majority vote).
    identity_pair_distance: float = 0.6
    centre_min_photos: int = 5

    # ---- variety of the set (each a spread across the kept photos)
    min_yaw_spread_deg: float = 8.0  # standard deviation of the estimated left/right turn
    min_pitch_spread_deg: float = 5.0
    min_framing_spread: float = 0.18  # std of log(face fraction): close-ups and half-body
    min_lighting_spread: float = 12.0  # std of the face's mean luminance (0-255)
    # std of the left/right brightness balance of the face (side light vs front light): light
    # from different directions is variety too, even at the same brightness.
    min_side_light_spread: float = 0.06
    min_background_spread: float = 12.0  # median distance between background colours (0-255)
    variety_min_photos: int = 4  # fewer photos: spreads mean nothing, not judged
