"""Near-duplicates: perceptual hashes of the whole photo and of a patch around the face, their
distances, and the set check that keeps one photo of each group of copies or crops.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
from PIL import Image

from selfie_lora.dataset.checks.analysis import FacePatch, PhotoAnalysis
from selfie_lora.dataset.checks.policy import CheckPolicy
from selfie_lora.domain.entities import Finding
from selfie_lora.domain.faces import Face

# --------------------------------------------------------------------------- hashes


def _hash_hex(image: Image.Image, *, kind: Literal["phash", "dhash"]) -> str:
    import imagehash

    value = imagehash.phash(image) if kind == "phash" else imagehash.dhash(image)
    return str(value)


def whole_hashes(small: Image.Image) -> tuple[str, str]:
    # The hashes work on 32x32 (phash) and 9x8 (dhash) pixels: a 128 px grey copy is plenty and
    # spares imagehash resampling the detection copy twice.
    tiny = small.convert("L")
    tiny.thumbnail((128, 128), Image.Resampling.BILINEAR, reducing_gap=2.0)
    return _hash_hex(tiny, kind="phash"), _hash_hex(tiny, kind="dhash")


def face_patch(image: Image.Image, face: Face, *, policy: CheckPolicy) -> FacePatch | None:
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


def _hamming(a: str, b: str) -> int:
    return bin(int(a, 16) ^ int(b, 16)).count("1")


_PatchHashes = dict[tuple[int, tuple[int, int, int, int]], tuple[str, str]]


def _patch_hashes(patch: FacePatch, rect: tuple[int, int, int, int],
                  cache: _PatchHashes) -> tuple[str, str]:
    if rect == patch.inside and patch.phash:
        return patch.phash, patch.dhash
    key = (id(patch), rect)
    if key not in cache:
        x0, y0, x1, y1 = rect
        side = FacePatch.SIDE
        pixels = np.frombuffer(patch.pixels, dtype=np.uint8).reshape(side, side)
        part = Image.fromarray(np.ascontiguousarray(pixels[y0:y1, x0:x1]))
        cache[key] = (_hash_hex(part, kind="phash"), _hash_hex(part, kind="dhash"))
    return cache[key]


def _patch_distance(a: FacePatch, b: FacePatch, *, policy: CheckPolicy,
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


def _keeper_rank(a: PhotoAnalysis) -> tuple[int, float, int, int, int]:
    # Which copy of a photo to keep: one that passes its own checks, with the most face pixels,
    # the largest frame, then an original (copies lose their EXIF), then the first uploaded.
    face_px = a.metrics.face_px if a.metrics else 0.0
    area = round(a.image_size[0] * a.image_size[1] * a.scale * a.scale)
    return (0 if a.rejected else 1, round(face_px), area, 1 if a.had_exif else 0, -a.order)


def near_duplicates(photos: Sequence[PhotoAnalysis], *, policy: CheckPolicy) -> list[Finding]:
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
            a, b = photos[i], photos[j]
            reason = None
            if a.whole_phash and b.whole_phash and a.whole_dhash and b.whole_dhash and (
                _hamming(a.whole_phash, b.whole_phash) <= policy.dup_whole_phash
                and _hamming(a.whole_dhash, b.whole_dhash) <= policy.dup_whole_dhash
            ):
                reason = "a copy"
            elif a.face_patch and b.face_patch:
                dist = _patch_distance(a.face_patch, b.face_patch, policy=policy, cache=cache)
                if dist and dist[0] <= policy.dup_face_phash and dist[1] <= policy.dup_face_dhash:
                    reason = "a crop or a copy"
            if reason:
                how[(i, j)] = how[(j, i)] = reason
                parent[root(j)] = root(i)
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(root(i), []).append(i)
    findings: list[Finding] = []
    for members in groups.values():
        if len(members) < 2:
            continue
        keep = max(members, key=lambda i: _keeper_rank(photos[i]))
        for i in sorted(members):
            if i == keep:
                continue
            reason = how.get((i, keep), "a crop or a copy")
            findings.append(Finding(
                "reject", "near_duplicate",
                f"{photos[i].name} is {reason} of {photos[keep].name}",
                f"keep only {photos[keep].name} and add a different photo instead",
                photo=photos[i].name,
            ))
    return findings
