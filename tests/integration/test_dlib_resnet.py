"""dlib's face recognition ResNet read from its own file and run by ONNX Runtime: the same
embeddings as dlib's code, a file that is not that network refused, and a conversion cache that
a crash or a read-only disk cannot spoil."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("dlib", reason="the face checks need the 'faces' extra")
pytest.importorskip("onnxruntime", reason="the face checks need the 'faces' extra")

from selfie_lora.adapters.faces import dlib_resnet
from selfie_lora.adapters.faces.dlib_faces import (
    EMBEDDING_MODEL,
    DlibFaceAnalyzer,
    face_distance,
    models_dir,
)
from selfie_lora.adapters.faces.dlib_resnet import (
    DlibModelFormatError,
    OnnxFaceEncoder,
    cached_onnx_model,
    read_dlib_resnet,
)
from tests.support.photos import FIXTURES

SOURCE = models_dir() / f"{EMBEDDING_MODEL}.dat"
ROOT = Path(__file__).resolve().parents[2]


def _photo(name: str, side: int = 512) -> np.ndarray:
    with Image.open(FIXTURES / name) as img:
        rgb = img.convert("RGB")
        rgb.thumbnail((side, side))
        return np.asarray(rgb)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("face-cache")


@pytest.mark.parametrize("landmarks", [5, 68])
def test_onnx_embeddings_are_dlibs_own(cache: Path, landmarks: int) -> None:
    ours = DlibFaceAnalyzer(landmarks=landmarks, model_cache_dir=cache)
    dlibs = DlibFaceAnalyzer(landmarks=landmarks, embedder="dlib")
    assert ours.model_name == dlibs.model_name  # the same numbers: filed under one name
    compared = 0
    for name in ("obama.jpg", "obama2.jpg", "biden.jpg", "obama_partial_face.jpg"):
        image = _photo(name)
        for a, b in zip(ours.detect(image), dlibs.detect(image), strict=True):
            assert a.box == b.box
            assert a.landmarks == b.landmarks
            assert a.embedding is not None
            assert b.embedding is not None
            # float32 arithmetic in another order: ~3e-7 apart, against ~0.3-0.9 between faces.
            assert np.abs(np.subtract(a.embedding, b.embedding)).max() < 1e-5
            compared += 1
    assert compared >= 4


def test_the_network_is_read_whole_and_checked(cache: Path) -> None:
    net = read_dlib_resnet(SOURCE.read_bytes())
    assert net.size == 150
    assert net.stem_conv.weight.shape == (32, 3, 7, 7)
    assert len(net.blocks) == 14  # 28 residual convs + the stem: dlib's 29-layer ResNet
    assert sum(b.downsample for b in net.blocks) == 4
    assert net.fc.shape == (256, 128)
    assert net.mean_rgb == pytest.approx((122.782, 117.001, 104.298), abs=1e-3)


def test_a_file_that_is_not_the_network_is_refused(tmp_path: Path) -> None:
    data = SOURCE.read_bytes()
    with pytest.raises(DlibModelFormatError, match="not dlib's face recognition ResNet"):
        read_dlib_resnet(data[: len(data) // 2])  # truncated mid-tensor
    with pytest.raises(DlibModelFormatError):
        read_dlib_resnet((models_dir() / "shape_predictor_5_face_landmarks.dat").read_bytes())
    with pytest.raises(DlibModelFormatError):
        read_dlib_resnet(b"\x00" * 64)
    # A tensor in another format version than the one this reader knows.
    broken = bytearray(data)
    at = data.index(b"con_4") + 6  # past the name and a control byte: the tensor's version
    broken[at] = 3
    with pytest.raises(DlibModelFormatError, match="tensor of an unknown version"):
        read_dlib_resnet(bytes(broken))
    # Refused at use, not later: the analyzer says it as a set-up error.
    fake = tmp_path / "models"
    fake.mkdir()
    (fake / f"{EMBEDDING_MODEL}.dat").write_bytes(data[:1000])
    with pytest.raises(DlibModelFormatError):
        cached_onnx_model(fake / f"{EMBEDDING_MODEL}.dat", tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("*.onnx"))


def test_the_conversion_is_kept_and_reused(tmp_path: Path) -> None:
    folder = tmp_path / "cache"
    first = cached_onnx_model(SOURCE, folder)
    assert isinstance(first, Path)
    assert first.parent == folder
    assert first.name.startswith(f"{EMBEDDING_MODEL}-")
    stamp = first.stat().st_mtime_ns
    dlib_resnet._converted.clear()  # a new process: finds the file, converts nothing
    again = cached_onnx_model(SOURCE, folder)
    assert again == first
    assert first.stat().st_mtime_ns == stamp
    note = f"{EMBEDDING_MODEL}-v{dlib_resnet.CONVERTER_VERSION}.source.json"
    assert sorted(p.name for p in folder.iterdir()) == [".convert.lock", first.name, note]


def test_another_process_finds_the_conversion_without_reading_the_source(
        tmp_path: Path) -> None:
    """What each intake worker does at its start: the source's size and time are as noted, so
    its 22 MB are not read and hashed again; once they change, they are."""
    source = tmp_path / "models" / f"{EMBEDDING_MODEL}.dat"
    source.parent.mkdir()
    source.write_bytes(SOURCE.read_bytes())
    folder = tmp_path / "cache"
    first = cached_onnx_model(source, folder)
    assert isinstance(first, Path)
    stamp = source.stat().st_mtime_ns
    # The same size and time, other bytes: only a process that reads the source can tell.
    source.write_bytes(bytes(source.stat().st_size))
    os.utime(source, ns=(stamp, stamp))
    dlib_resnet._converted.clear()  # a new process
    assert cached_onnx_model(source, folder) == first
    os.utime(source, ns=(stamp + 10**9, stamp + 10**9))  # replaced: read, and refused
    dlib_resnet._converted.clear()
    with pytest.raises(DlibModelFormatError):
        cached_onnx_model(source, folder)


def test_a_damaged_note_only_costs_reading_the_source(tmp_path: Path) -> None:
    folder = tmp_path / "cache"
    first = cached_onnx_model(SOURCE, folder)
    note = folder / f"{EMBEDDING_MODEL}-v{dlib_resnet.CONVERTER_VERSION}.source.json"
    info = SOURCE.resolve().stat()
    elsewhere = json.dumps({"source": str(SOURCE.resolve()), "size": info.st_size,
                            "mtime_ns": info.st_mtime_ns, "file": "../../etc/passwd"})
    for damaged in ("{not json", '{"source": 1}', '["a list"]', elsewhere):
        note.write_text(damaged)
        dlib_resnet._converted.clear()
        assert cached_onnx_model(SOURCE, folder) == first
    assert json.loads(note.read_text())["file"] == first.name  # noted afresh


def test_an_unwritable_cache_still_gives_the_model(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    model = cached_onnx_model(SOURCE, blocker / "faces")
    assert isinstance(model, bytes)
    encoder = OnnxFaceEncoder(model)
    out = encoder.embed(np.zeros((2, 150, 150, 3), dtype=np.uint8))
    assert out.shape == (2, 128)
    assert np.isfinite(out).all()
    with pytest.raises(ValueError, match="150"):
        encoder.embed(np.zeros((1, 100, 100, 3), dtype=np.uint8))


def _dying_at_a_rename(folder: Path, die: str) -> subprocess.CompletedProcess[bytes]:
    """A process converting (or noting) the model into ``folder`` that runs ``die`` at its
    first rename: after the bytes are written, before the name is theirs."""
    script = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "from selfie_lora.adapters.faces import dlib_resnet, model_cache\n"
        "def die(src, dst):\n"
        f"    {die}\n"
        "model_cache.os.replace = die  # the same os as dlib_resnet's: every rename dies\n"
        "dlib_resnet.cached_onnx_model(Path(sys.argv[1]), Path(sys.argv[2]))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + str(ROOT)}
    return subprocess.run([sys.executable, "-c", script, str(SOURCE), str(folder)],
                          env=env, timeout=120, check=False)


def test_a_conversion_killed_midway_leaves_nothing_that_is_used(tmp_path: Path) -> None:
    """The converting process dies while it writes the file (the worst line to die on): the
    next start finds no model file, only a stray temporary one, converts once more, and ends
    with a whole file that gives dlib's numbers."""
    folder = tmp_path / "cache"
    died = _dying_at_a_rename(folder, "os._exit(9)")
    assert died.returncode == 9
    assert not list(folder.glob("*.onnx"))
    assert len(list(folder.glob(f".{EMBEDDING_MODEL}*"))) == 1  # the partial file
    model = cached_onnx_model(SOURCE, folder)
    assert isinstance(model, Path)
    assert model.is_file()
    assert not list(folder.glob(f".{EMBEDDING_MODEL}*"))  # cleared by the next conversion
    ours = DlibFaceAnalyzer(model_cache_dir=folder)
    dlibs = DlibFaceAnalyzer(embedder="dlib")
    image = _photo("obama3.jpg")
    (a,), (b,) = ours.detect(image), dlibs.detect(image)
    assert a.embedding is not None
    assert b.embedding is not None
    assert face_distance(a.embedding, b.embedding) < 1e-5


def test_jittered_embeddings_average_copies_of_the_chip(cache: Path) -> None:
    plain = DlibFaceAnalyzer(model_cache_dir=cache)
    jittered = DlibFaceAnalyzer(num_jitters=4, model_cache_dir=cache)
    image = _photo("obama.jpg")
    (a,), (b,) = plain.detect(image), jittered.detect(image)
    assert a.embedding is not None
    assert b.embedding is not None
    # Another embedding (a mean over shifted, rotated copies) of the same face.
    assert 0.0 < face_distance(a.embedding, b.embedding) < 0.2


def test_an_unknown_embedder_is_a_setup_error() -> None:
    from selfie_lora.errors import ConfigError

    with pytest.raises(ConfigError, match="'onnx' or 'dlib'"):
        DlibFaceAnalyzer(embedder="torch")  # type: ignore[arg-type]


def test_the_face_detector_is_loaded_from_its_cached_file(tmp_path: Path) -> None:
    """dlib rebuilds its detector on every ``get_frontal_face_detector`` (~0.4 s); the file it
    saves loads in milliseconds and finds the same faces with the same scores."""
    import dlib

    from selfie_lora.adapters.faces.model_cache import frontal_face_detector

    folder = tmp_path / "cache"
    cached = frontal_face_detector(folder)
    (saved,) = folder.glob("frontal_face_detector-dlib-*.svm")
    built = dlib.get_frontal_face_detector()
    for name in ("obama.jpg", "biden.jpg", "obama_partial_face.jpg"):
        image = _photo(name)
        a, b = cached.run(image, 0, 0.0), built.run(image, 0, 0.0)
        assert [(r.left(), r.top(), r.right(), r.bottom()) for r in a[0]] == [
            (r.left(), r.top(), r.right(), r.bottom()) for r in b[0]]
        assert list(a[1]) == list(b[1])
        assert list(a[2]) == list(b[2])
    # A file dlib cannot read (not one it wrote) is deleted and the detector built instead.
    saved.write_bytes(b"not a detector")
    replaced = frontal_face_detector(folder)
    assert len(replaced(_photo("obama.jpg"))) == 1
    assert not saved.exists()
    # And where nothing can be written it is built each time.
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert len(frontal_face_detector(blocker / "faces")(_photo("obama.jpg"))) == 1


def test_a_damaged_model_file_is_converted_again(tmp_path: Path) -> None:
    folder = tmp_path / "cache"
    model = cached_onnx_model(SOURCE, folder)
    assert isinstance(model, Path)
    model.write_bytes(b"\x08\x01garbage")  # a disk error, an editor: not what was renamed in
    analyzer = DlibFaceAnalyzer(model_cache_dir=folder)
    (face,) = analyzer.detect(_photo("obama.jpg"))
    assert face.embedding is not None
    (reference,) = DlibFaceAnalyzer(embedder="dlib").detect(_photo("obama.jpg"))
    assert reference.embedding is not None
    assert face_distance(face.embedding, reference.embedding) < 1e-5
    assert model.stat().st_size > 1_000_000  # a whole graph again


def test_a_note_a_killed_process_left_is_removed_once_an_hour_old(tmp_path: Path) -> None:
    """A process killed between writing the source's note and renaming it left
    ``.<note>.<pid>`` in the cache for good: every later one writes under its own pid."""
    folder = tmp_path / "cache"
    converted = cached_onnx_model(SOURCE, folder)
    assert isinstance(converted, Path)
    note = folder / f"{EMBEDDING_MODEL}-v{dlib_resnet.CONVERTER_VERSION}.source.json"
    note.unlink()  # so the next process writes it
    # The conversion is there: the only rename left is the note's.
    died = _dying_at_a_rename(folder, "os.kill(os.getpid(), signal.SIGKILL)")
    assert died.returncode == -9
    (left,) = folder.glob(f".{note.name}.*")

    dlib_resnet._converted.clear()  # a new process, a minute later: the leftover may be live
    assert cached_onnx_model(SOURCE, folder) == converted
    assert left.is_file()
    assert note.is_file()

    hour_ago = time.time() - 3600 - 60
    os.utime(left, (hour_ago, hour_ago))
    dlib_resnet._converted.clear()  # one an hour later, the note found as it is
    assert cached_onnx_model(SOURCE, folder) == converted
    assert not left.exists()  # old code: still there
    assert sorted(p.name for p in folder.iterdir()) == [".convert.lock", converted.name,
                                                         note.name]
