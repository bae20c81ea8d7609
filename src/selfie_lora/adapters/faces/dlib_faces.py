"""``FaceAnalyzer`` on dlib: HOG face detector, 5-point landmarks, 128-d ResNet embeddings.

Licences: dlib's face recognition ResNet and its 5-point landmark model are public domain; the
68-point landmark model was trained on iBUG 300-W, whose terms exclude commercial use, so it is
only loaded when asked for by name (``landmarks=68``, the setting
``SELFIE_LORA_FACE_LANDMARKS_68_NONCOMMERCIAL``). The embeddings of the two alignments differ
(~0.09 apart for one face), so each has its own ``model_name`` and scores of one are never
compared with the other's.

The ResNet runs in ONNX Runtime by default (``embedder="onnx"``, see ``dlib_resnet``: the
same weights and numbers, ~9x faster than the ``dlib-bin`` wheel's own code); ``"dlib"`` runs
it in dlib as before.

The model files come from the ``face-recognition-models`` package. Its ``__init__`` imports
``pkg_resources`` (gone from current setuptools), so the files are located with
``importlib.util.find_spec`` without importing it.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
from pathlib import Path
from typing import Any, Literal

from selfie_lora.domain.faces import Face
from selfie_lora.errors import ConfigError

logger = logging.getLogger(__name__)

EMBEDDING_MODEL = "dlib_face_recognition_resnet_model_v1"
_LANDMARK_FILES = {5: "shape_predictor_5_face_landmarks.dat",
                   68: "shape_predictor_68_face_landmarks.dat"}


def embedding_model_name(landmarks: int) -> str:
    """The name scores are filed under: the ResNet plus the landmarks that aligned its input.
    The 68-point alignment keeps the plain name it had before the 5-point one was added, so
    records scored with it stay valid."""
    return EMBEDDING_MODEL if landmarks == 68 else f"{EMBEDDING_MODEL}+5pt"


def _import_dlib() -> Any:
    try:
        import dlib
    except ImportError as exc:
        raise ConfigError("face checks need dlib: pip install 'selfie-lora[faces]'") from exc
    return dlib


def models_dir() -> Path:
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or spec.origin is None:
        raise ConfigError(
            "face checks need the 'face-recognition-models' package: pip install "
            "'selfie-lora[faces]'"
        )
    return Path(spec.origin).parent / "models"


Embedder = Literal["onnx", "dlib"]


class _DlibEncoder:
    """dlib's own ResNet code."""

    def __init__(self, dlib: Any, model: Path) -> None:
        self._model = dlib.face_recognition_model_v1(str(model))

    def __call__(self, image: Any, shape: Any, jitters: int) -> tuple[float, ...]:
        return tuple(float(v) for v in self._model.compute_face_descriptor(image, shape, jitters))


class _OnnxEncoder:
    """The same ResNet in ONNX Runtime, on the chip dlib cuts: ``compute_face_descriptor`` is
    ``get_face_chip`` (150 px, padding 0.25) and the network, and with jitters the mean over
    ``jitter_image`` copies of the chip, as here."""

    def __init__(self, dlib: Any, model: Path | bytes) -> None:
        from selfie_lora.adapters.faces.dlib_resnet import OnnxFaceEncoder

        self._dlib = dlib
        self._encoder = OnnxFaceEncoder(model)

    def __call__(self, image: Any, shape: Any, jitters: int) -> tuple[float, ...]:
        import numpy as np

        chip = self._dlib.get_face_chip(image, shape, size=150, padding=0.25)
        chips = (np.stack([np.asarray(c) for c in self._dlib.jitter_image(chip, jitters)])
                 if jitters > 1 else np.asarray(chip)[None])
        return tuple(float(v) for v in self._encoder.embed(chips).mean(axis=0))


class DlibFaceAnalyzer:
    """Thread-safe: dlib's objects are loaded once and each call takes a lock, because dlib's
    detectors and networks are not documented as safe to share between threads.
    ``model_cache_dir``: where the ONNX conversion of the ResNet is kept (default
    ``model_cache.default_cache_dir()``, one per machine user), and dlib's face detector."""

    def __init__(self, *, upsample: int = 0, num_jitters: int = 1, landmarks: int = 5,
                 embedder: Embedder = "onnx", model_cache_dir: Path | None = None) -> None:
        if landmarks not in _LANDMARK_FILES:
            raise ConfigError(f"dlib has 5- and 68-point landmark models, not {landmarks}")
        if embedder not in ("onnx", "dlib"):
            raise ConfigError(f"the face embedder is 'onnx' or 'dlib', not {embedder!r}")
        self._upsample = upsample
        self._jitters = num_jitters
        self.landmark_count = landmarks
        self.embedder = embedder
        self._cache_dir = model_cache_dir
        self.model_name = embedding_model_name(landmarks)
        self._lock = threading.Lock()
        self._loaded: tuple[Any, Any, Any] | None = None

    def ready(self) -> None:
        """dlib (and ONNX Runtime) import and the model files are there; the ONNX conversion of
        the ResNet is made if this machine has none yet (~1.5 s, once). Nothing is loaded."""
        _import_dlib()
        folder = models_dir()
        for name in (_LANDMARK_FILES[self.landmark_count], f"{EMBEDDING_MODEL}.dat"):
            if not (folder / name).is_file():
                raise ConfigError(f"the face model {name} is missing from {folder}: reinstall "
                                  "'face-recognition-models' (pip install 'selfie-lora[faces]')")
        if self.embedder == "onnx":
            self._onnx_model()

    def _onnx_model(self) -> Path | bytes:
        try:
            import onnxruntime  # noqa: F401
        except ImportError as exc:
            raise ConfigError("face embeddings need ONNX Runtime: pip install "
                              "'selfie-lora[faces]'") from exc
        from selfie_lora.adapters.faces.dlib_resnet import cached_onnx_model

        return cached_onnx_model(models_dir() / f"{EMBEDDING_MODEL}.dat", self._cache_dir)

    def _onnx_encoder(self, dlib: Any) -> _OnnxEncoder:
        from selfie_lora.adapters.faces.dlib_resnet import forget_converted

        model = self._onnx_model()
        try:
            return _OnnxEncoder(dlib, model)
        except Exception as exc:  # ONNX Runtime's own types (InvalidProtobuf, Fail, ...)
            if not isinstance(model, Path):
                raise
            # Written whole and renamed, so damaged since: converted again, once.
            logger.warning("the converted face model %s cannot be loaded (%s): converting it "
                           "again", model, exc)
            model.unlink(missing_ok=True)
            forget_converted()
            return _OnnxEncoder(dlib, self._onnx_model())

    def _models(self) -> tuple[Any, Any, Any]:
        if self._loaded is None:
            dlib = _import_dlib()
            folder = models_dir()
            encoder: Any = (self._onnx_encoder(dlib) if self.embedder == "onnx"
                            else _DlibEncoder(dlib, folder / f"{EMBEDDING_MODEL}.dat"))
            from selfie_lora.adapters.faces.model_cache import frontal_face_detector

            self._loaded = (
                frontal_face_detector(self._cache_dir),  # from a file: ~2 ms, not ~0.4 s
                dlib.shape_predictor(str(folder / _LANDMARK_FILES[self.landmark_count])),
                encoder,
            )
        return self._loaded

    def detect(self, image: Any, *, landmarks: bool = True, embed: bool = True) -> list[Face]:
        import numpy as np

        array = np.ascontiguousarray(image, dtype=np.uint8)
        if array.ndim != 3 or array.shape[2] != 3:
            raise ValueError("detect() needs an RGB image of shape (height, width, 3)")
        with self._lock:
            detector, predictor, encoder = self._models()
            # On the colours, not a grey copy: one grey channel costs a quarter less (24 vs 32
            # ms at 640 px) but moves the boxes enough to cost cut-off, exposure and smooth-skin
            # findings in bench/checks_eval.py.
            rects, scores, _kinds = detector.run(array, self._upsample, 0.0)
            faces = []
            for rect, score in zip(rects, scores, strict=True):
                points: tuple[tuple[int, int], ...] = ()
                embedding: tuple[float, ...] | None = None
                if landmarks or embed:
                    shape = predictor(array, rect)
                    if landmarks:
                        points = tuple((p.x, p.y) for p in shape.parts())
                    if embed:
                        embedding = encoder(array, shape, self._jitters)
                faces.append(Face(
                    box=(rect.left(), rect.top(), rect.right(), rect.bottom()),
                    score=float(score), landmarks=points, embedding=embedding,
                ))
        faces.sort(key=lambda f: f.width * f.height, reverse=True)
        return faces


def face_distance(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """Euclidean distance between two embeddings: same person ~0.2-0.5, others > 0.6."""
    import numpy as np

    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)))
