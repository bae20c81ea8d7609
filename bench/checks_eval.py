"""Evaluation of the photo checks on real photos nobody tuned them on.

Reads the labelled photos of ``../shared/photos/people`` (twelve people, 45 photos, labels.csv:
every pair inside one folder is two *different* photos of one person), makes edited copies of
each (the edits a user's photos really have: crops, re-encodes, resizes, mirror images, blur,
darkness, blown highlights, a saturation filter, a beauty filter, a greyscale copy, a face cut
by the frame, and two people side by side), runs the photo checks on all of them and prints,
per check, the cases, precision and recall:

- a per-photo check (blurry, underexposed, ...) is asked of every original, every harmless
  edit (crop, re-encode, resize, mirror: still good photos) and the edits made to trigger it;
  a warning or a rejection with its code counts as flagged;
- near_duplicate is asked of pairs: each original with each of its crops, re-encodes, resizes
  and mirror images (positives) and every pair of two originals (negatives; the same person's
  pairs are the hard ones and are counted on their own);
- identity: the ROC AUC of the embedding distance over all same/different pairs of originals,
  the false accept/reject rates at the pair threshold in use, and the set check itself
  (different_person): each person's photos with one photo of someone else slipped in.

Both landmark models are measured (``--models 5,68``): the 5-point model the service uses by
default and the 68-point one it loads only when told to (its licence forbids commercial use),
so the table shows what the switch costs, check by check.

``--check-readme README.md`` compares the default model's precision and recall with the table
between ``<!-- checks-eval -->`` markers in the README and exits 1 when any is lower (CI runs it
when the photos are there: tests/integration/test_checks_eval.py).

    .venv/bin/python bench/checks_eval.py [--people DIR] [--models 5,68] [--workers 2]
        [--json out.json] [--check-readme README.md]
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import itertools
import json
import multiprocessing
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from selfie_lora.dataset.checks import CheckPolicy, PhotoAnalysis, analyze_photo, check_set  # noqa: E402
from selfie_lora.dataset.checks.duplicates import pair_duplicate  # noqa: E402
from selfie_lora.dataset.decode import DecodedPhoto, decode_photo  # noqa: E402
from selfie_lora.dataset.limits import UploadedFile, UploadLimits  # noqa: E402
from selfie_lora.dataset.pipeline import decode_side  # noqa: E402

DEFAULT_PEOPLE = ROOT.parent / "shared" / "photos" / "people"
MARKER = "<!-- checks-eval -->"
# The checks judged per photo, and the edit made to trigger each.
PHOTO_CHECKS = {
    "blurry": "blur",
    "underexposed": "dark",
    "overexposed": "bright",
    "oversaturated": "saturate",
    "smooth_skin": "beauty",
    "black_and_white": "grey",
    "face_cut_off": "cut",
    "multiple_faces": "two_people",
}
HARMLESS = ("crop", "reencode", "resize", "mirror")
POLICY = CheckPolicy(resolution=1024)
LIMITS = UploadLimits()


# --------------------------------------------------------------------------- edits


def _jpeg(img: Image.Image, quality: int = 92) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _face_box(a: PhotoAnalysis, img: Image.Image) -> tuple[float, float, float, float]:
    assert a.main_face is not None
    k = img.width / a.image_size[0]
    left, top, right, bottom = (v * k for v in a.main_face.box)
    return left, top, right, bottom


def _crop(img: Image.Image, box: tuple[float, float, float, float], index: int) -> Image.Image:
    """Every other photo a loose crop (three quarters of the frame), else a head-and-shoulders
    crop three face sizes wide: both keep the whole face."""
    left, top, right, bottom = box
    cx, cy = (left + right) / 2, (top + bottom) / 2
    if index % 2 == 0:
        w, h = img.width * 0.75, img.height * 0.75
    else:
        w = h = max(right - left, bottom - top) * 3.0
    x0 = min(max(0.0, cx - w / 2), max(0.0, img.width - w))
    y0 = min(max(0.0, cy - h / 2), max(0.0, img.height - h))
    return img.crop((round(x0), round(y0), round(min(img.width, x0 + w)),
                     round(min(img.height, y0 + h))))


def _cut(img: Image.Image, box: tuple[float, float, float, float], index: int) -> Image.Image:
    """A frame that cuts away a third of the face on one side (alternating sides)."""
    left, _top, right, _bottom = box
    width = right - left
    if index % 2 == 0:
        return img.crop((round(left + width / 3), 0, img.width, img.height))
    return img.crop((0, 0, round(right - width / 3), img.height))


def _bilateral_where(image: np.ndarray[Any, Any], needed: np.ndarray[Any, Any], diameter: int,
                     *, passes: int, band: int = 8) -> np.ndarray[Any, Any]:
    """``passes`` rounds of ``cv2.bilateralFilter(_, diameter, 40, diameter)`` over ``image``
    (uint8), right where ``needed`` is true (elsewhere: the pixels of an earlier round or the
    image's). The same pixels there as filtering the whole image: its cost, per pixel and
    growing with ``diameter`` squared, was half of the evaluation's (cProfile: 42 of 92 s), most
    of it on pixels a beauty edit's mask then hides.

    Filtered in bands of ``band`` rows, each a ROI of the whole round's image (``cv2.UMat(whole,
    rows, cols)``): OpenCV forms a ROI's border from its parent's pixels around it
    (copyMakeBorder without BORDER_ISOLATED; reflected at the parent's edges only), so a band's
    pixels are those of the whole image's filtering. A numpy slice would be filtered as an image
    of its own, its edges reflected. Each round but the last is computed wherever the next one's
    bands read: those bands grown by the filter's radius.

    Where OpenCV has Intel's IPP (the wheels do) it filters a whole image with it, and a ROI too
    unless the parent's pixels around it are fewer than the radius on some side (its own loop
    then). IPP and that loop, and IPP given a ROI or a whole image, can round a few pixels in a
    million differently (seen at sharp, noisy edges; tests/unit/test_checks_eval_beauty.py
    checks the bands with OpenCV's loop alone). On the 45 photos of ``../shared/photos/people``
    the beauty edits come out identical to the whole region's filtering, byte for byte, and so
    does the evaluation's table (checked when this was written)."""
    import cv2

    radius = max(diameter // 2, 1)  # OpenCV's, for a diameter > 0
    plans: list[list[tuple[int, int, int, int]]] = []
    want = needed
    for _ in range(passes):
        rects = []
        rows = np.flatnonzero(want.any(axis=1))
        for top in range(int(rows[0]), int(rows[-1]) + 1, band) if len(rows) else ():
            bottom = min(top + band, int(rows[-1]) + 1)
            cols = np.flatnonzero(want[top:bottom].any(axis=0))
            if len(cols):
                rects.append((top, bottom, int(cols[0]), int(cols[-1]) + 1))
        plans.insert(0, rects)
        want = np.zeros_like(needed)
        for top, bottom, left, right in rects:
            want[max(0, top - radius):bottom + radius, max(0, left - radius):right + radius] = True
    # With OpenCL on, a UMat would be filtered by its kernel, whose arithmetic is not the CPU's.
    opencl = cv2.ocl.useOpenCL()
    cv2.ocl.setUseOpenCL(False)
    try:
        out = image
        for rects in plans:
            whole = cv2.UMat(np.ascontiguousarray(out))
            out = out.copy()
            for top, bottom, left, right in rects:
                out[top:bottom, left:right] = cv2.bilateralFilter(
                    cv2.UMat(whole, (top, bottom), (left, right)), diameter, 40, diameter).get()
    finally:
        cv2.ocl.setUseOpenCL(opencl)
    return out


def _beauty(img: Image.Image, box: tuple[float, float, float, float]) -> Image.Image:
    """A beauty filter's look: an edge-preserving blur (what skin-smoothing apps use) over the
    face, feathered into the photo."""
    left, top, right, bottom = box
    size = max(right - left, bottom - top)
    pad = size * 0.2
    region = (max(0, round(left - pad)), max(0, round(top - pad)),
              min(img.width, round(right + pad)), min(img.height, round(bottom + pad)))
    part = np.asarray(img.crop(region))
    diameter = max(5, round(size / 18)) | 1
    mask = Image.new("L", (region[2] - region[0], region[3] - region[1]), 0)
    from PIL import ImageDraw

    ImageDraw.Draw(mask).ellipse((pad * 0.8, pad * 0.6, mask.width - pad * 0.8,
                                  mask.height - pad * 0.4), fill=255)
    mask = mask.filter(ImageFilter.GaussianBlur(max(2.0, size / 30)))
    # Filtered only where the mask lets it show (the paste keeps the photo's pixels where the
    # mask is 0): the same pixels there as filtering the whole region twice, for ~2/3 of the work.
    smooth = _bilateral_where(part, np.asarray(mask) > 0, diameter, passes=2)
    out = img.copy()
    out.paste(Image.fromarray(smooth), region[:2], mask)
    return out


# The edits of one photo, in the order ``edits_of`` makes them (the order numbers of the copies
# follow it).
EDITS = ("crop", "reencode", "resize", "mirror", "blur", "dark", "bright", "saturate", "beauty",
         "grey", "cut")


def edits_of(img: Image.Image, a: PhotoAnalysis, index: int) -> dict[str, bytes]:
    """The edited copies of one photo, as the files a user would upload."""
    box = _face_box(a, img)
    face_h = box[3] - box[1]
    return {
        "crop": _jpeg(_crop(img, box, index)),
        "reencode": _jpeg(img, quality=55),
        "resize": _jpeg(img.resize((max(1, img.width // 2), max(1, img.height // 2)),
                                   Image.Resampling.LANCZOS)),
        "mirror": _jpeg(ImageOps.mirror(img)),
        "blur": _jpeg(img.filter(ImageFilter.GaussianBlur(max(1.5, face_h / 60)))),
        "dark": _jpeg(ImageEnhance.Brightness(img).enhance(0.3)),
        "bright": _jpeg(ImageEnhance.Brightness(img).enhance(2.0)),
        "saturate": _jpeg(ImageEnhance.Color(img).enhance(2.5)),
        "beauty": _jpeg(_beauty(img, box)),
        "grey": _jpeg(ImageOps.grayscale(img)),
        "cut": _jpeg(_cut(img, box, index)),
    }


def side_by_side(a: Image.Image, b: Image.Image) -> bytes:
    """Two people in one photo: two portraits scaled to one height, next to each other."""
    height = min(a.height, b.height, 1200)
    scaled = [im.resize((max(1, round(im.width * height / im.height)), height),
                        Image.Resampling.LANCZOS) for im in (a, b)]
    canvas = Image.new("RGB", (scaled[0].width + scaled[1].width, height))
    canvas.paste(scaled[0], (0, 0))
    canvas.paste(scaled[1], (scaled[0].width, 0))
    return _jpeg(canvas)


# --------------------------------------------------------------------------- analysis


class _SharedDetection:
    """An analyzer whose face detection (boxes only) is looked up by the image's pixels first:
    the detector is the same whatever the landmark model, so each photo's boxes are found once
    for all the models measured (about half of a photo's analysis: cProfile, 58 of 116 s).
    ``describe`` and the detection with landmarks (the refinement's fallback) stay each
    model's own."""

    def __init__(self, analyzer: Any, found: dict[tuple[Any, ...], list[Any]]) -> None:
        self._analyzer = analyzer
        self._found = found

    def detect(self, image: Any, *, landmarks: bool = True, embed: bool = True) -> list[Any]:
        if landmarks or embed:
            return list(self._analyzer.detect(image, landmarks=landmarks, embed=embed))
        array = np.ascontiguousarray(image, dtype=np.uint8)
        key = (array.shape, hashlib.blake2b(array.data).digest())
        if key not in self._found:
            self._found[key] = self._analyzer.detect(array, landmarks=False, embed=False)
        return list(self._found[key])

    def describe(self, image: Any, box: tuple[int, int, int, int], *, embed: bool = True) -> Any:
        return self._analyzer.describe(image, box, embed=embed)


_analyzers: dict[int, Any] = {}
_found: dict[tuple[Any, ...], list[Any]] = {}


def _dlib(landmarks: int) -> Any:
    from selfie_lora.adapters.faces.dlib_regions import DlibRegionFaceAnalyzer

    return DlibRegionFaceAnalyzer(landmarks=landmarks)


def _init(models: Sequence[int], analyzer_of: Callable[[int], Any] = _dlib) -> None:
    """Each worker's analyzers (``analyzer_of(model)``: dlib's; a test's fake)."""
    import cv2

    cv2.setNumThreads(1)
    _analyzers.clear()
    # One model alone has nothing to share: no hashing of its images.
    _analyzers.update({m: analyzer_of(m) if len(models) == 1
                       else _SharedDetection(analyzer_of(m), _found) for m in models})


def _analyse(name: str, data: bytes, order: int) -> dict[int, PhotoAnalysis | None]:
    """One photo's analysis by each landmark model, the faces found once."""
    _found.clear()
    out: dict[int, PhotoAnalysis | None] = {}
    for model, analyzer in _analyzers.items():
        # Decoded as the service's intake decodes (pipeline.process_photo): colours deferred.
        # Again for each model: each analysis has a photo of its own, as in the service.
        decoded = decode_photo(UploadedFile(name=name, data=data), limits=LIMITS,
                               min_side=decode_side(POLICY), defer_colour=True)
        out[model] = (analyze_photo(decoded, analyzer=analyzer, policy=POLICY, order=order)
                      if isinstance(decoded, DecodedPhoto) else None)
    _found.clear()
    return out


def _edit_and_analyse(name: str, data: bytes, analysis: PhotoAnalysis, index: int,
                      other: bytes, order: int, pair_order: int
                      ) -> list[tuple[str, dict[int, PhotoAnalysis | None]]]:
    """The edited copies of the ``index``-th photo with a face (``EDITS``, then two people: it
    beside ``other``) as (kind, analysis by each model), numbered from ``order`` (the two people
    ``pair_order``). Made where they are analysed: in the workers, side by side, the edits (a
    beauty filter's bilateral blur above all) took the main process ~40% of the run while the
    workers waited. Made once for all the models: they depend on the face's box, the
    detector's, the same for each (``evaluate`` checks it)."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    edits = edits_of(image, analysis, index)
    # The order numbers (order + i) and evaluate's list of keys follow EDITS.
    if tuple(edits) != EDITS:
        raise RuntimeError(f"edits_of made {tuple(edits)}, not EDITS {EDITS} in that order: the "
                           "edits' order numbers and names would not match")
    out = [(kind, _analyse(f"{name}#{kind}", edit, order + i))
           for i, (kind, edit) in enumerate(edits.items())]
    pair = side_by_side(image, Image.open(io.BytesIO(other)).convert("RGB"))
    out.append(("two_people", _analyse(f"{name}#two_people", pair, pair_order)))
    return out


class _InProcess(Executor):
    """``workers`` 1: each job run at once, in this process."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        future.set_result(fn(*args, **kwargs))
        return future


@contextmanager
def _workers(models: Sequence[int], workers: int) -> Iterator[Executor]:
    """One pool for the originals and the edits: each worker loads the models once."""
    if workers <= 1:
        _init(models)
        yield _InProcess()
        return
    context = multiprocessing.get_context("forkserver")
    with _cancelling(ProcessPoolExecutor(workers, mp_context=context, initializer=_init,
                                         initargs=(tuple(models),))) as pool:
        yield pool


@contextmanager
def _cancelling(pool: Executor) -> Iterator[Executor]:
    """``pool``, its queued jobs cancelled when the work with it fails: the error shows once the
    jobs already running end (a photo's each), not after every queued one has run (minutes)."""
    with pool:
        try:
            yield pool
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise


def _gather(futures: Sequence[Future[Any]]) -> list[Any]:
    """The jobs' results in ``futures``' order; the first to fail raises as soon as it fails,
    not once the jobs before it in the list are done."""
    for future in as_completed(futures):
        future.result()
    return [future.result() for future in futures]


# --------------------------------------------------------------------------- scoring


@dataclass
class Row:
    check: str
    positives: int = 0
    negatives: int = 0
    tp: int = 0
    fp: int = 0
    note: str = ""
    rejected: int = 0  # negatives rejected (not only warned about)
    misses: list[str] = field(default_factory=list)  # positives not flagged
    false_alarms: list[str] = field(default_factory=list)  # negatives flagged

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 1.0

    @property
    def recall(self) -> float:
        return self.tp / self.positives if self.positives else 1.0


@dataclass
class Result:
    landmarks: int
    rows: dict[str, Row] = field(default_factory=dict)
    identity: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0  # the whole run's until this model was scored: the models share work


def _flagged(a: PhotoAnalysis | None, code: str, *, severities: tuple[str, ...] = (
        "warn", "reject")) -> bool:
    return a is not None and any(f.code == code and f.severity in severities
                                 for f in a.findings)


def roc_auc(positives: Sequence[float], negatives: Sequence[float]) -> float:
    """P(a positive scores above a negative), ties counted half (the Mann-Whitney U)."""
    if not positives or not negatives:
        return float("nan")
    pos = np.asarray(positives)
    neg = np.asarray(negatives)
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))


def evaluate(people: Path, *, models: Sequence[int], workers: int,
             log: Callable[[str], None]) -> list[Result]:
    """Each landmark model's result (in ``models``' order). The photos, their edits and their
    faces are made and found once: only the landmarks and what follows from them differ."""
    started = time.perf_counter()
    with (people / "labels.csv").open(newline="") as fh:
        labels = [(row["file"], row["person"]) for row in csv.DictReader(fh)]
    person = dict(labels)
    originals = {name: (people / name).read_bytes() for name, _ in labels}
    with _workers(models, workers) as pool:
        futures = [pool.submit(_analyse, name, data, i)
                   for i, (name, data) in enumerate(originals.items())]
        analysed = _gather(futures)
        by_model = {m: {name: a[m] for name, a in zip(originals, analysed, strict=True)}
                    for m in models}
        found_by = {m: [n for n, a in analyses.items() if a is not None and a.main_face is not None]
                    for m, analyses in by_model.items()}
        for m in models:
            log(f"  {m}-point: faces found in {len(found_by[m])} of {len(originals)} originals")
        first = by_model[models[0]]
        found = found_by[models[0]]
        # The edits are cut around the first model's boxes, once for all the models. With
        # several models the boxes are one shared detection's (_SharedDetection) and _refine
        # keeps the detector's box, so they are equal by construction: this check does not
        # compare the models' detectors, it stops the run if that construction breaks (a
        # refinement that moves the box, a decode that differs by model). Sharing is sound as a
        # boxes-only detect (dlib_faces' detect, landmarks=False, embed=False) runs only
        # dlib's frontal face detector, the same whatever the landmark model, as long as the
        # analysers share upsample and model_cache_dir, which the cache's key does not hold.
        boxes = {m: [(a.image_size, a.main_face.box) for n in found if (a := by_model[m][n])
                     and a.main_face] for m in models}
        if any(found_by[m] != found or boxes[m] != boxes[models[0]] for m in models):
            raise SystemExit("the landmark models found different faces, so the edits cut "
                             "around the first's would not be theirs: run each model on its "
                             "own (--models 5, then --models 68)")

        # Edited copies of every photo with a face, and two-person photos (each photo with the
        # next person's first photo), numbered as one list (below).
        firsts = {}
        for name, who in labels:
            firsts.setdefault(who, name)
        order = sorted(firsts)
        jobs = {}
        for index, name in enumerate(found):
            other = firsts[order[(order.index(person[name]) + 1) % len(order)]]
            jobs[name] = (name, originals[name], first[name], index, originals[other],
                          index * len(EDITS), len(found) * len(EDITS) + index)
        # The largest photos first (their edits take longest): no worker left with one at the
        # end while the other waits.
        pixels = {n: np.prod(Image.open(io.BytesIO(originals[n])).size) for n in found}
        submitted = {n: pool.submit(_edit_and_analyse, *jobs[n])
                     for n in sorted(found, key=lambda n: -pixels[n])}
        made = dict(zip(found, _gather([submitted[n] for n in found]), strict=True))
    # In the order of one list: each photo's edits in turn, then the two-person photos.
    keys = [(n, kind) for n in found for kind in EDITS] + [(n, "two_people") for n in found]
    kind_of = {f"{n}#{kind}": kind for n, kind in keys}
    source_of = {f"{n}#{kind}": n for n, kind in keys}
    seconds = time.perf_counter() - started
    results = []
    for m in models:
        by_key = {f"{n}#{kind}": a[m] for n in found for kind, a in made[n]}
        edits = {key: by_key[key] for key in kind_of}
        started = time.perf_counter()
        result = _score(m, labels, by_model[m], edits, kind_of, source_of)
        result.seconds = seconds + time.perf_counter() - started
        results.append(result)
    return results


@contextmanager
def _pairs_judged_once() -> Iterator[None]:
    """``check_set`` judging each pair of photos once while this lasts, not once per set: the
    different-person loop checks each person's photos with every stranger in turn, so ~5,000
    judgements of which ~3,400 were a person's own pairs again (2% of the run). The judgement,
    ``duplicates.pair_duplicate``, depends only on the two analyses and the policy (its
    ``cache`` only saves work); the memo keeps them, so their ids stay theirs. Swapped in
    ``duplicates`` (where ``near_duplicate_pairs`` looks it up) for the bench alone: the
    service checks a set once and has nothing to remember."""
    from selfie_lora.dataset.checks import duplicates

    judge = duplicates.pair_duplicate
    memo: dict[tuple[int, int, int], tuple[Any, str | None]] = {}

    def once(a: PhotoAnalysis, b: PhotoAnalysis, *, policy: CheckPolicy,
             cache: Any = None) -> str | None:
        key = (id(a), id(b), id(policy))
        if key not in memo:
            memo[key] = ((a, b, policy), judge(a, b, policy=policy, cache=cache))
        return memo[key][1]

    duplicates.pair_duplicate = once  # type: ignore[assignment]
    try:
        yield
    finally:
        duplicates.pair_duplicate = judge


def _score(landmarks: int, labels: Sequence[tuple[str, str]],
           analyses: dict[str, PhotoAnalysis | None], edits: dict[str, PhotoAnalysis | None],
           kind_of: dict[str, str], source_of: dict[str, str]) -> Result:
    """One model's rows and identity figures from its analyses of the originals and edits."""
    result = Result(landmarks=landmarks)
    person = dict(labels)
    originals = list(dict.fromkeys(name for name, _ in labels))
    found = [n for n, a in analyses.items() if a is not None and a.main_face is not None]
    result.extra["faces_found"] = f"{len(found)}/{len(originals)}"
    everything = {**analyses, **edits}

    # Per-photo checks.
    negatives = list(originals) + [k for k in edits if kind_of[k] in HARMLESS]
    for code, kind in PHOTO_CHECKS.items():
        row = Row(code)
        positives = [k for k in edits if kind_of[k] == kind]
        row.positives, row.negatives = len(positives), len(negatives)
        row.misses = [k for k in positives if not _flagged(everything[k], code)]
        row.false_alarms = [k for k in negatives if _flagged(everything[k], code)]
        row.rejected = sum(_flagged(everything[k], code, severities=("reject",))
                           for k in row.false_alarms)
        row.tp = row.positives - len(row.misses)
        row.fp = len(row.false_alarms)
        result.rows[code] = row

    # Near-duplicates, pair by pair.
    row = Row("near_duplicate")
    by_kind: dict[str, list[bool]] = {k: [] for k in HARMLESS}
    for key in edits:
        if kind_of[key] not in HARMLESS:
            continue
        a, b = analyses[source_of[key]], edits[key]
        hit = a is not None and b is not None and pair_duplicate(a, b, policy=POLICY) is not None
        by_kind[kind_of[key]].append(hit)
        row.positives += 1
        row.tp += hit
        if not hit:
            row.misses.append(key)
    same_fp = same = 0
    for x, y in itertools.combinations(sorted(originals), 2):
        a, b = analyses[x], analyses[y]
        if a is None or b is None:
            continue
        hit = pair_duplicate(a, b, policy=POLICY) is not None
        row.negatives += 1
        row.fp += hit
        row.rejected += hit  # a near-duplicate is always rejected
        if hit:
            row.false_alarms.append(f"{x}~{y}")
        if person[x] == person[y]:
            same += 1
            same_fp += hit
    row.note = (f"same-person pairs flagged {same_fp}/{same}; caught: " + ", ".join(
        f"{k} {sum(v)}/{len(v)}" for k, v in by_kind.items()))
    result.rows["near_duplicate"] = row
    result.extra["near_duplicate_same_person_fp"] = same_fp

    # Identity: distances of all pairs of originals.
    with_id = [(n, a.embedding) for n, a in analyses.items() if a is not None and a.embedding]
    same_d, diff_d = [], []
    for (x, ex), (y, ey) in itertools.combinations(with_id, 2):
        d = float(np.linalg.norm(np.asarray(ex) - np.asarray(ey)))
        (same_d if person[x] == person[y] else diff_d).append(d)
    threshold = POLICY.identity_pair_distance
    result.identity = {
        "pairs_same": len(same_d), "pairs_different": len(diff_d),
        "roc_auc": roc_auc([-d for d in same_d], [-d for d in diff_d]),
        "false_accept": sum(d <= threshold for d in diff_d) / max(1, len(diff_d)),
        "false_reject": sum(d > threshold for d in same_d) / max(1, len(same_d)),
        "threshold": threshold,
    }
    # The set check: each person with 4+ photos, alone and with one stranger slipped in.
    row = Row("different_person")
    groups: dict[str, list[str]] = {}
    for name in found:
        groups.setdefault(person[name], []).append(name)
    # Each set judges its pairs of photos (check_set's near-duplicates); a person's own pairs
    # are the same in all of their sets: judged once (_pairs_judged_once).
    with _pairs_judged_once():
        for who, names in sorted(groups.items()):
            if len(names) < 4:
                continue
            own = [everything[n] for n in names]
            alone = check_set([a for a in own if a is not None], policy=POLICY)
            row.negatives += len(names)
            row.fp += sum(1 for f in alone.findings if f.code == "different_person"
                          and f.severity in ("warn", "reject"))
            row.rejected += sum(1 for f in alone.findings if f.code == "different_person"
                                and f.severity == "reject")
            for stranger in found:
                if person[stranger] == who:
                    continue
                analysis = everything[stranger]
                assert analysis is not None
                report = check_set([*own, analysis], policy=POLICY)  # type: ignore[list-item]
                flagged = {f.photo for f in report.findings if f.code == "different_person"
                           and f.severity in ("warn", "reject")}
                row.rejected += sum(1 for f in report.findings if f.code == "different_person"
                                    and f.severity == "reject" and f.photo != stranger)
                row.positives += 1
                row.tp += stranger in flagged
                if stranger not in flagged:
                    row.misses.append(f"{stranger} among {who}")
                row.negatives += len(names)
                row.fp += len(flagged - {stranger})
                row.false_alarms.extend(f"{n} (with {stranger})" for n in sorted(flagged - {stranger}))
    result.rows["different_person"] = row
    result.extra["images"] = len(originals) + len(edits)
    return result


# --------------------------------------------------------------------------- report


def table(results: Sequence[Result]) -> str:
    """Precision, recall and the negatives rejected (not only warned about) of the first model,
    then precision and recall of the others."""
    first = results[0]
    head = ("| check | cases (+/-) | precision | recall | negatives rejected |" + "".join(
        f" {r.landmarks}-pt precision | {r.landmarks}-pt recall |" for r in results[1:]))
    lines = [head, "|" + "---|" * (5 + 2 * (len(results) - 1))]
    for code, row in first.rows.items():
        cells = "".join(f" {r.rows[code].precision:.3f} | {r.rows[code].recall:.3f} |"
                        for r in results[1:])
        lines.append(f"| {code} | {row.positives}/{row.negatives} | {row.precision:.3f} | "
                     f"{row.recall:.3f} | {row.rejected} |{cells}")
    return "\n".join(lines)


def readme_floor(readme: Path) -> dict[str, tuple[float, float]]:
    """check -> (precision, recall) from the README's table between the markers (the columns
    of the default model, the first pair after 'cases')."""
    text = readme.read_text()
    parts = text.split(MARKER)
    if len(parts) < 3:
        raise SystemExit(f"{readme} has no table between two {MARKER} markers")
    floors = {}
    for line in parts[1].splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 4 and re.fullmatch(r"\d+/\d+", cells[1]):
            floors[cells[0]] = (float(cells[2]), float(cells[3]))
    return floors


def regressions(measured: dict[str, Row], floors: dict[str, tuple[float, float]]) -> list[str]:
    """What measures worse than the README says (precision and recall rounded as printed), and
    the checks the README does not list."""
    worse = [f"{code}: {what} {now:.3f} < {floor:.3f} in the README"
             for code, (p, r) in floors.items() if code in measured
             for what, now, floor in (("precision", measured[code].precision, p),
                                      ("recall", measured[code].recall, r))
             if round(now, 3) < floor]
    missing = sorted(set(measured) - set(floors))
    if missing:
        worse.append(f"the README's table lacks {', '.join(missing)}")
    return worse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--people", type=Path,
                        default=Path(os.environ.get("SELFIE_LORA_PEOPLE_PHOTOS", DEFAULT_PEOPLE)))
    parser.add_argument("--models", default="5,68", help="landmark models, the default first")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--check-readme", type=Path, default=None)
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="name every miss and false alarm")
    args = parser.parse_args(argv)
    if not (args.people / "labels.csv").is_file():
        print(f"no labelled photos at {args.people}: nothing to evaluate")
        return 0 if args.check_readme is None else 2
    models = [int(m) for m in args.models.split(",")]
    print(f"photos: {args.people}; policy thresholds: CheckPolicy(resolution="
          f"{POLICY.resolution}) defaults; workers: {args.workers}")
    results = evaluate(args.people, models=models, workers=args.workers, log=print)
    print()
    print(table(results))
    print()
    # With several models the images are analysed once for all: each model's time is the shared
    # run's (up to its own scoring), not what measuring it alone would take.
    shared = " (the models' shared run, to this model's scoring)" if len(results) > 1 else ""
    for r in results:
        row = r.rows["near_duplicate"]
        ident = r.identity
        print(f"{r.landmarks}-point: {r.extra['images']} images in {r.seconds:.0f} s{shared}; "
              f"faces {r.extra['faces_found']}; near_duplicate: {row.note}")
        print(f"  identity over {ident['pairs_same']} same / {ident['pairs_different']} "
              f"different pairs: ROC AUC {ident['roc_auc']:.4f}; at distance "
              f"{ident['threshold']}: false accept {ident['false_accept']:.3f}, false reject "
              f"{ident['false_reject']:.3f}")
    if args.verbose:
        for r in results:
            for row in r.rows.values():
                print(f"{r.landmarks}-point {row.check}: misses {row.misses}")
                print(f"{r.landmarks}-point {row.check}: false alarms {row.false_alarms}")
    if args.json:
        args.json.write_text(json.dumps([{
            "landmarks": r.landmarks, "identity": r.identity, "extra": r.extra,
            "rows": {k: {"positives": v.positives, "negatives": v.negatives,
                         "precision": v.precision, "recall": v.recall, "note": v.note,
                         "misses": v.misses, "false_alarms": v.false_alarms}
                     for k, v in r.rows.items()}} for r in results], indent=2))
    if args.check_readme is None:
        return 0
    worse = regressions(results[0].rows, readme_floor(args.check_readme))
    if results[0].extra["near_duplicate_same_person_fp"]:
        worse.append("near_duplicate flags two different photos of one person")
    for line in worse:
        print("REGRESSION:", line)
    return 1 if worse else 0


if __name__ == "__main__":
    sys.exit(main())
