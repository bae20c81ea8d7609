"""Near-duplicates: perceptual hashes of the whole photo and of a patch around the face, their
distances, and the set check that keeps one photo of each group of copies or crops.

Hashes find candidates; keypoints confirm them. Two different photos of one face, both frontal
with a similar expression, have face patches whose hashes match as closely as a crop's do (the
face is most of the patch). So a candidate pair counts only when ORB keypoints of the two scenes,
outside the face, agree with one similarity transform (RANSAC): pixels the two photos share,
the hair, clothes and background of one moment, not just the same face. Mirror images are tried
both ways round.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Collection, Sequence
from typing import Literal

import numpy as np
from PIL import Image

from selfie_lora.dataset.checks.analysis import FacePatch, Keypoints, PhotoAnalysis, Pixels
from selfie_lora.dataset.checks.policy import CheckPolicy
from selfie_lora.domain.entities import Finding
from selfie_lora.domain.faces import Face

# --------------------------------------------------------------------------- hashes


# imagehash's phash: the 32 px grey copy's two-dimensional DCT-II (unnormalised, as SciPy's
# ``fftpack.dct`` computes it along each axis), its 8 x 8 lowest frequencies against their
# median. imagehash imports SciPy for the DCT, ~0.1-0.2 s at the start of every intake worker
# process (the cold intake waits for it); the same transform as a 32 x 32 matrix product in
# numpy gives the same hashes (tests/unit/test_duplicates_hash.py compares the two).
# The code of the finding on each copy but one of a photo (``duplicate_findings``).
NEAR_DUPLICATE = "near_duplicate"

_PHASH_SIDE = 32
_PHASH_BITS = 8
_n = np.arange(_PHASH_SIDE)
_DCT = 2.0 * np.cos(np.pi * np.outer(_n, 2 * _n + 1) / (2 * _PHASH_SIDE))
del _n


def phash(image: Image.Image) -> str:
    """``str(imagehash.phash(image))``, without SciPy."""
    import imagehash

    grey = image.convert("L").resize((_PHASH_SIDE, _PHASH_SIDE), Image.Resampling.LANCZOS)
    pixels = np.asarray(grey, dtype=np.float64)
    # Rounded to a millionth: a flat picture's frequencies are exactly 0 in SciPy's FFT and
    # ~1e-13 here, and its hash must not depend on that noise.
    low = np.round((_DCT @ pixels @ _DCT.T)[:_PHASH_BITS, :_PHASH_BITS], 6)
    return str(imagehash.ImageHash(low > np.median(low)))


def _hash_hex(image: Image.Image, *, kind: Literal["phash", "dhash"]) -> str:
    import imagehash

    return phash(image) if kind == "phash" else str(imagehash.dhash(image))


def whole_hashes(small: Image.Image) -> tuple[str, str]:
    # The hashes work on 32x32 (phash) and 9x8 (dhash) pixels: a 128 px grey copy is plenty and
    # spares imagehash resampling the detection copy twice.
    tiny = small.convert("L")
    tiny.thumbnail((128, 128), Image.Resampling.BILINEAR, reducing_gap=2.0)
    return _hash_hex(tiny, kind="phash"), _hash_hex(tiny, kind="dhash")


def face_patch(image: Pixels, face: Face, *, policy: CheckPolicy) -> FacePatch | None:
    """A grey patch centred on the face box, ``dup_patch_face_sizes`` box sizes wide: the same
    part of the scene in every copy or crop of a photo, whatever the framing. The detector's box
    is used rather than landmarks: on a face cut by the frame the landmarks of the missing side
    are guesses (10-20 px off on the fixtures), the box is stable to a few pixels."""
    cx, cy = (face.box[0] + face.box[2]) / 2, (face.box[1] + face.box[3]) / 2
    span = max(face.width, face.height) * policy.dup_patch_face_sizes
    if span < 8:
        return None
    side = FacePatch.SIDE
    x0, y0 = cx - span / 2, cy - span / 2
    k = side / span
    # The part of the patch inside the photo, in patch pixels.
    px0 = max(0, math.ceil(-x0 * k))
    py0 = max(0, math.ceil(-y0 * k))
    px1 = min(side, math.floor((image.width - x0) * k))
    py1 = min(side, math.floor((image.height - y0) * k))
    if px1 - px0 < 8 or py1 - py0 < 8:
        return None
    src = (x0 + px0 / k, y0 + py0 / k, x0 + px1 / k, y0 + py1 / k)
    part = image.resize((px1 - px0, py1 - py0), Image.Resampling.BILINEAR, box=src,
                        reducing_gap=2.0).convert("L")
    canvas = np.zeros((side, side), dtype=np.uint8)
    canvas[py0:py1, px0:px1] = np.asarray(part)
    return FacePatch(pixels=canvas.tobytes(), inside=(px0, py0, px1, py1),
                     phash=_hash_hex(part, kind="phash"), dhash=_hash_hex(part, kind="dhash"))


def keypoints(image: Pixels, face: Face, *, policy: CheckPolicy) -> Keypoints | None:
    """ORB keypoints of a window ``dup_window_face_sizes`` face sizes wide around the face, the
    photo scaled so the face is ``Keypoints.FACE_SIDE`` px tall, and of its mirror image; the
    strongest first."""
    import cv2

    size = max(face.width, face.height)
    if size < 8:
        return None
    k = Keypoints.FACE_SIDE / size
    half = size * policy.dup_window_face_sizes / 2
    cx, cy = (face.box[0] + face.box[2]) / 2, (face.box[1] + face.box[3]) / 2
    left, top = max(0.0, cx - half), max(0.0, cy - half)
    right, bottom = min(float(image.width), cx + half), min(float(image.height), cy + half)
    out = (max(1, round((right - left) * k)), max(1, round((bottom - top) * k)))
    if min(out) < 32:
        return None
    # reducing_gap=1: box-reduced by the whole integer part of the ratio, then a short bilinear
    # step (still anti-aliased). With 2, a window 3-6x larger than its output (a face of 290-580
    # px in the half-size decode of a 12 MP photo) missed the detection copy (``_Reduced``) and
    # was reduced from the photo again: ~10 ms for such a photo.
    grey = np.asarray(image.resize(out, Image.Resampling.BILINEAR, box=(left, top, right, bottom),
                                   reducing_gap=1.0).convert("L"))
    orb = cv2.ORB.create(nfeatures=policy.dup_keypoints)
    found = []
    for pixels in (grey, np.ascontiguousarray(grey[:, ::-1])):
        points, descriptors = orb.detectAndCompute(pixels, None)
        if descriptors is None or len(points) < policy.dup_shared_points:
            return None
        strongest = np.argsort([-p.response for p in points], kind="stable")
        found.append((np.asarray([p.pt for p in points], dtype=np.float32)[strongest].tobytes(),
                      np.asarray(descriptors, dtype=np.uint8)[strongest].tobytes()))
    return Keypoints(points=found[0][0], descriptors=found[0][1], mirror_points=found[1][0],
                     mirror_descriptors=found[1][1])


def _arrays(points: bytes, descriptors: bytes) -> tuple[np.ndarray, np.ndarray]:
    return (np.frombuffer(points, dtype=np.float32).reshape(-1, 2),
            np.frombuffer(descriptors, dtype=np.uint8).reshape(-1, 32))


def shared_points(a: Keypoints, b: Keypoints, *, policy: CheckPolicy) -> int:
    """How many keypoints of ``a`` find their match in ``b`` (or in its mirror image) where
    one similarity transform puts them, to ``dup_ransac_px``: the evidence that two photos
    share pixels. A cheap look at the strongest keypoints first: most pairs end there."""
    import cv2

    matcher = cv2.BFMatcher(cv2.NORM_HAMMING, crossCheck=True)
    pts_a, des_a = _arrays(a.points, a.descriptors)
    gate = policy.dup_gate_keypoints
    best = 0
    for points, descriptors in ((b.points, b.descriptors),
                                (b.mirror_points, b.mirror_descriptors)):
        pts_b, des_b = _arrays(points, descriptors)
        # Each cross-checked match pairs a keypoint with its nearest: no more of them are close
        # than keypoints whose nearest is. That count is one distance pass (the matcher makes
        # two, and a match object each), and most pairs of photos end on it: the set checks of
        # 25 photos took ~140 ms in the service's process after the workers, ~6 s for 200.
        nearest, _index = cv2.batchDistance(des_a[:gate], des_b[:gate], cv2.CV_32S,
                                            normType=cv2.NORM_HAMMING, K=1)
        if int((nearest <= policy.dup_gate_distance).sum()) < policy.dup_gate_matches:
            continue
        close = sum(m.distance <= policy.dup_gate_distance
                    for m in matcher.match(des_a[:gate], des_b[:gate]))
        if close < policy.dup_gate_matches:
            continue
        matches = [m for m in matcher.match(des_a, des_b) if m.distance <= policy.dup_orb_distance]
        if len(matches) < policy.dup_shared_points:
            continue
        src = pts_a[[m.queryIdx for m in matches]]
        dst = pts_b[[m.trainIdx for m in matches]]
        # OpenCV's RANSAC seeds its generator the same way on every call: repeatable.
        _transform, inliers = cv2.estimateAffinePartial2D(
            src, dst, method=cv2.RANSAC, ransacReprojThreshold=policy.dup_ransac_px,
            maxIters=2000, confidence=0.995)
        if inliers is not None:
            best = max(best, int(inliers.sum()))
    return best


def _hamming(a: str, b: str) -> int:
    return bin(int(a, 16) ^ int(b, 16)).count("1")


_PatchHashes = dict[tuple[bytes, tuple[int, int, int, int]], tuple[str, str]]


def _patch_hashes(patch: FacePatch, rect: tuple[int, int, int, int],
                  cache: _PatchHashes) -> tuple[str, str]:
    if rect == patch.inside and patch.phash:
        return patch.phash, patch.dhash
    # By the pixels' digest, not the patch object's id: the mirrored copy pair_duplicate makes
    # for each pair is freed after it, and a later pair's copy could be given its id and so its
    # hashes (another face's). A digest also lets one photo's mirror, made again for each pair
    # it is in, hit the cache.
    key = (hashlib.blake2b(patch.pixels, digest_size=16).digest(), rect)
    if key not in cache:
        x0, y0, x1, y1 = rect
        side = FacePatch.SIDE
        pixels = np.frombuffer(patch.pixels, dtype=np.uint8).reshape(side, side)
        part = Image.fromarray(np.ascontiguousarray(pixels[y0:y1, x0:x1]))
        cache[key] = (_hash_hex(part, kind="phash"), _hash_hex(part, kind="dhash"))
    return cache[key]


def patch_distance(a: FacePatch, b: FacePatch, *, policy: CheckPolicy,
                    cache: _PatchHashes) -> tuple[int, int] | None:
    """phash and dhash distances of two face patches on the part both photos show (hashes of
    partial patches are cached: a cut-off photo meets every other photo on the same part)."""
    rect = (max(a.inside[0], b.inside[0]), max(a.inside[1], b.inside[1]),
            min(a.inside[2], b.inside[2]), min(a.inside[3], b.inside[3]))
    width, height = rect[2] - rect[0], rect[3] - rect[1]
    side = FacePatch.SIDE
    if width < 8 or height < 8 or width * height < policy.dup_min_overlap * side * side:
        return None
    ha = _patch_hashes(a, rect, cache)
    hb = _patch_hashes(b, rect, cache)
    return _hamming(ha[0], hb[0]), _hamming(ha[1], hb[1])


# --------------------------------------------------------------------------- the set


def _keeper_rank(a: PhotoAnalysis) -> tuple[int, int, int, int, int, int]:
    # Which copy of a photo to keep: one that passes its own checks, then the camera's own file
    # (EXIF: copies, downloads and "enhanced" upscales lose it), not a PNG (a screenshot: a camera
    # never writes one), then the most face pixels, the largest frame, the first uploaded. Pixels
    # come after the signs of a camera original because upscaling adds pixels without detail:
    # ranked by pixels first, a 2x "enhanced" copy or a screenshot was kept and the original
    # dropped, against what face_resolution_low tells the user about it.
    face_px = a.metrics.face_px if a.metrics else 0.0
    area = round(a.image_size[0] * a.image_size[1] * a.scale * a.scale)
    png = a.name.lower().endswith(".png")
    return (0 if a.rejected else 1, 1 if a.had_exif else 0, 0 if png else 1, round(face_px),
            area, -a.order)


def pair_duplicate(a: PhotoAnalysis, b: PhotoAnalysis, *, policy: CheckPolicy,
                   cache: _PatchHashes | None = None) -> str | None:
    """How ``b`` copies ``a`` ("a copy", "a crop or a copy"), or None when they are two photos:
    shared keypoints decide when both photos have them, the hashes otherwise."""
    cache = {} if cache is None else cache
    copy = bool(a.whole_phash and b.whole_phash and a.whole_dhash and b.whole_dhash and (
        _hamming(a.whole_phash, b.whole_phash) <= policy.dup_whole_phash
        and _hamming(a.whole_dhash, b.whole_dhash) <= policy.dup_whole_dhash))
    if a.keypoints is not None and b.keypoints is not None:
        if shared_points(a.keypoints, b.keypoints, policy=policy) < policy.dup_shared_points:
            return None
        return "a copy" if copy else "a crop or a copy"
    # Without keypoints (no face, or a featureless one) the hashes decide alone.
    if copy:
        return "a copy"
    if a.face_patch and b.face_patch:
        for patch in (b.face_patch, _mirrored(b.face_patch)):
            dist = patch_distance(a.face_patch, patch, policy=policy, cache=cache)
            if dist and dist[0] <= policy.dup_face_phash and dist[1] <= policy.dup_face_dhash:
                return "a crop or a copy"
    return None


def _mirrored(patch: FacePatch) -> FacePatch:
    side = FacePatch.SIDE
    pixels = np.frombuffer(patch.pixels, dtype=np.uint8).reshape(side, side)[:, ::-1]
    x0, y0, x1, y1 = patch.inside
    return FacePatch(pixels=np.ascontiguousarray(pixels).tobytes(),
                     inside=(side - x1, y0, side - x0, y1))


def near_duplicate_pairs(photos: Sequence[PhotoAnalysis], *, policy: CheckPolicy
                         ) -> list[tuple[int, int, str]]:
    """The copies in ``photos`` as (copy, photo kept, how it copies it) indices: one photo of
    each group of near-duplicates stays."""
    n = len(photos)
    # Union-find over "is a near-duplicate of": one photo of each group stays.
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    how: dict[tuple[int, int], str] = {}
    cache: _PatchHashes = {}
    for i in range(n):
        for j in range(i + 1, n):
            if root(i) == root(j):
                # Already one group through other pairs: this pair cannot change the groups,
                # and its wording is looked up below only if one of them is the keeper. In a
                # set of many copies this skips most of the keypoint matching.
                continue
            reason = pair_duplicate(photos[i], photos[j], policy=policy, cache=cache)
            if reason:
                how[(i, j)] = how[(j, i)] = reason
                parent[root(j)] = root(i)
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(root(i), []).append(i)
    pairs: list[tuple[int, int, str]] = []
    for members in groups.values():
        if len(members) < 2:
            continue
        keep = max(members, key=lambda i: _keeper_rank(photos[i]))
        for i in sorted(members):
            if i == keep:
                continue
            if (i, keep) not in how:
                lo, hi = min(i, keep), max(i, keep)
                found = pair_duplicate(photos[lo], photos[hi], policy=policy, cache=cache)
                how[(i, keep)] = found or "a crop or a copy"  # None: only through others
            pairs.append((i, keep, how[(i, keep)]))
    return pairs


def duplicate_findings(photos: Sequence[PhotoAnalysis], pairs: Sequence[tuple[int, int, str]],
                       *, refused: Collection[str] = ()) -> list[Finding]:
    """One finding for each copy of :func:`near_duplicate_pairs`. ``refused``: photos the set's
    checks reject (someone else): "keep only X" must not name one of them, which it did when
    only the photo's own checks were looked at."""
    findings: list[Finding] = []
    for i, keep, reason in pairs:
        if photos[keep].rejected or photos[keep].name in refused:
            # Every copy is left out: "keep only X" would name a photo that is left out too.
            message = (f"{photos[i].name} is {reason} of {photos[keep].name} (which cannot "
                       "be used either)")
            advice = "use a different photo instead of both"
        else:
            message = f"{photos[i].name} is {reason} of {photos[keep].name}"
            advice = f"keep only {photos[keep].name} and add a different photo instead"
        findings.append(Finding("reject", NEAR_DUPLICATE, message, advice,
                                photo=photos[i].name))
    return findings


def near_duplicates(photos: Sequence[PhotoAnalysis], *, policy: CheckPolicy) -> list[Finding]:
    """The near-duplicate findings of ``photos`` judged on their own checks alone."""
    return duplicate_findings(photos, near_duplicate_pairs(photos, policy=policy))
