"""The intake through the HTTP API with the real dlib checks, on real photos."""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from selfie_lora.api.app import create_app
from selfie_lora.dataset.prepare import FACE_FRACTION
from selfie_lora.domain.buckets import bucket_sizes
from selfie_lora.testing.fakes import FakeGenerator, FakeTrainer
from selfie_lora.wiring import Services, build_services
from tests.conftest import auth, make_settings
from tests.support.photos import FIXTURES, synthetic_photo


@pytest.fixture
def real(tmp_path: Path) -> Iterator[tuple[TestClient, Services]]:
    settings = make_settings(tmp_path, min_photos=3, keep_originals=True)
    services = build_services(settings, trainers={"local": FakeTrainer()},
                              generators={"local": FakeGenerator()})
    with TestClient(create_app(settings, services=services),
                    raise_server_exceptions=False) as client:
        yield client, services
    services.close()


def with_gps(name: str) -> bytes:
    """The fixture photo with GPS coordinates and a comment added to its metadata."""
    with Image.open(FIXTURES / name) as img:
        exif = img.getexif()
        gps = exif.get_ifd(0x8825)
        gps.update({1: "N", 2: (48.0, 51.0, 29.0), 3: "E", 4: (2.0, 17.0, 40.0)})
        exif[0x8825] = gps
        buf = io.BytesIO()
        img.save(buf, format="JPEG", exif=exif, comment=b"taken at home", quality=92)
    data = buf.getvalue()
    assert Image.open(io.BytesIO(data)).getexif().get_ifd(0x8825), "the GPS did not stick"
    return data


def zip_of(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def test_real_photos_are_checked_and_stored_without_metadata(
    real: tuple[TestClient, Services],
) -> None:
    client, services = real
    h = auth(services, "ann")
    members = {n: with_gps(n) for n in ("obama.jpg", "obama2.jpg", "obama3.jpg")}
    members["biden.jpg"] = (FIXTURES / "biden.jpg").read_bytes()
    r = client.post("/api/training/upload-zip", headers=h, data={"start": "false"},
                    files={"file": ("me.zip", zip_of(members), "application/zip")})
    assert r.status_code == 202, r.text
    dataset = r.json()["dataset"]
    assert (dataset["images_total"], dataset["images_accepted"]) == (4, 3)
    codes = {(f["photo"], f["code"]) for f in dataset["findings"]}
    assert ("biden.jpg", "different_person") in codes
    assert all(f["advice"] for f in dataset["findings"])
    assert dataset["verdict"]["trainable"] is True
    assert dataset["verdict"]["quality"] in ("excellent", "good", "fair", "poor")
    # Stored photos: prepared crops with no metadata at all.
    stored = sorted((services.settings.blob_dir / "photos").glob("*.jpg"))
    assert len(stored) == 3
    for path in stored:
        raw = path.read_bytes()
        assert b"Exif" not in raw[:4096]
        assert b"taken at home" not in raw
        with Image.open(path) as img:
            assert not img.getexif()
            assert "icc_profile" not in img.info
            assert "comment" not in img.info
            # The face-aware crop of its aspect bucket (a new tiny model's recipe buckets).
            assert img.size in {(b.width, b.height) for b in bucket_sizes(64)}
    # Each stored photo's face box, in the crop's fractions: dlib's box of the same face, centred
    # across, at least the crop's face fraction of its side (more where the photo was too small
    # for the crop, which then shrinks around the face).
    kept = services.intake.latest(user=services.users.get_by_name(name="ann"))
    assert kept is not None
    assert len(kept.face_boxes) == len(kept.photo_hashes) == 3
    for box in kept.face_boxes:
        assert box is not None
        x0, y0, x1, y1 = box
        assert (x0 + x1) / 2 == pytest.approx(0.5, abs=0.02)
        assert (y0 + y1) / 2 < 0.5  # room for the chin below
        assert FACE_FRACTION - 0.02 <= max(x1 - x0, y1 - y0) < 1
    # Originals are kept only because this server was told to.
    originals = list((services.settings.blob_dir / "originals").iterdir())
    assert len(originals) == 3
    # The likeness reference was taken from the full photos at intake.
    refs = list((services.settings.blob_dir / "quality" / "datasets").rglob("*.json"))
    assert len(refs) == 1
    embeddings = [p["embedding"] for p in json.loads(refs[0].read_text())["photos"]]
    assert len(embeddings) == 3
    assert all(e is not None and len(e) == 128 for e in embeddings)


def test_a_set_without_faces_is_refused_with_everything_to_change(
    real: tuple[TestClient, Services],
) -> None:
    client, services = real
    h = auth(services, "ann")
    members = {f"d{i}.jpg": synthetic_photo(i, size=256) for i in range(3)}
    r = client.post("/api/training/upload-zip", headers=h,
                    files={"file": ("me.zip", zip_of(members), "application/zip")})
    assert r.status_code == 422
    error = r.json()["error"]
    assert error["code"] == "dataset_rejected"
    codes = [d["code"] for d in error["details"]]
    assert codes.count("no_face") == 3
    assert "too_few_photos" in codes
    assert client.get("/api/model", headers=h).status_code == 404
    assert not (services.settings.blob_dir / "photos").exists()
    assert not (services.settings.blob_dir / "datasets").exists()


@pytest.mark.parametrize(("trainer_version", "buckets"),
                         [("local-flux-v2", True), ("local-flux-v1", False)])
def test_a_portrait_photo_is_stored_as_a_portrait_crop_when_the_recipe_buckets(
        tmp_path: Path, trainer_version: str, buckets: bool) -> None:
    """obama2.jpg (626 x 1200) judged for a recipe with aspect buckets (v2) is stored at its 2:3
    bucket's size with the face whole in it; for v1 as the square of before."""
    from selfie_lora.adapters.faces.dlib_regions import DlibRegionFaceAnalyzer
    from selfie_lora.dataset.limits import UploadedFile
    from selfie_lora.domain.recipes import get_recipe

    settings = make_settings(tmp_path, trainer_version=trainer_version,
                             base_model=str(tmp_path / "FLUX.1-dev"))
    services = build_services(settings, trainers={"local": FakeTrainer()},
                              generators={"local": FakeGenerator()})
    try:
        files = [UploadedFile(name=name, data=(FIXTURES / name).read_bytes())
                 for name in ("obama2.jpg", "obama.jpg")]
        report = services.intake.check_files(files=files)
    finally:
        services.close()
    assert report.trainable
    recipe = get_recipe(trainer_version)
    assert recipe.aspect_buckets is buckets
    square = (recipe.resolution, recipe.resolution)
    prepared = {p.name: p for p in report.accepted}
    analyzer = DlibRegionFaceAnalyzer()
    # 626 x 1200 is nearest 2:3, 910 x 1137 is 4:5 (at 1024 px: 832 x 1248, 912 x 1152).
    for name, (width, height) in (("obama2.jpg", (832, 1248) if buckets else square),
                                  ("obama.jpg", (912, 1152) if buckets else square)):
        photo = prepared[name]
        assert (photo.width, photo.height) == (width, height), name
        with Image.open(io.BytesIO(photo.data)) as img:
            assert img.size == (width, height)
            pixels = np.asarray(img.convert("RGB"))
        faces = analyzer.detect(pixels, landmarks=False, embed=False)
        assert len(faces) == 1, name
        left, top, right, bottom = faces[0].box
        # The face whole and framed as the square frames it: ~42% of the shorter side, centred.
        assert min(left, top) >= 0, name
        assert right <= width, name
        assert bottom <= height, name
        assert 0.3 < faces[0].height / min(width, height) < 0.55, name
        assert abs((left + right) / 2 - width / 2) < width * 0.08, name


def test_photos_uploaded_again_are_not_analysed_again(real: tuple[TestClient, Services]) -> None:
    """A user refused for too few photos sends the same ones with one more: the service
    remembers each photo's analysis and runs only the checks across the set again."""
    client, services = real
    h = auth(services, "ann")
    members = {n: (FIXTURES / n).read_bytes() for n in ("obama.jpg", "obama2.jpg", "biden.jpg")}
    r = client.post("/api/training/upload-zip", headers=h, data={"start": "false"},
                    files={"file": ("me.zip", zip_of(members), "application/zip")})
    assert r.status_code == 422, r.text  # two usable photos: three are needed
    assert services.intake.outcomes.hits == 0
    members["obama3.jpg"] = (FIXTURES / "obama3.jpg").read_bytes()
    r = client.post("/api/training/upload-zip", headers=h, data={"start": "false"},
                    files={"file": ("me.zip", zip_of(members), "application/zip")})
    assert r.status_code == 202, r.text
    assert services.intake.outcomes.hits == 3  # only obama3.jpg was analysed this time
    dataset = r.json()["dataset"]
    assert (dataset["images_total"], dataset["images_accepted"]) == (4, 3)
    assert ("biden.jpg", "different_person") in {(f["photo"], f["code"])
                                                  for f in dataset["findings"]}


def test_another_users_photos_are_analysed_again_not_answered_from_their_cache(
        real: tuple[TestClient, Services]) -> None:
    """The remembered analyses were shared by every user: bob sending ann's exact files (same
    names and bytes) was answered from her entries, in milliseconds where an analysis takes
    half a second (``verdict.seconds`` said so): he learned that another account had uploaded
    those photos. Each user now hits only their own entries."""
    client, services = real
    members = {n: (FIXTURES / n).read_bytes() for n in ("obama.jpg", "obama2.jpg", "obama3.jpg")}
    ann, bob = auth(services, "ann"), auth(services, "bob")

    def upload(headers: dict[str, str]) -> None:
        r = client.post("/api/training/upload-zip", headers=headers, data={"start": "false"},
                        files={"file": ("me.zip", zip_of(members), "application/zip")})
        assert r.status_code == 202, r.text

    upload(ann)
    assert services.intake.outcomes.hits == 0
    upload(bob)  # her files: analysed again, as any photo he never sent
    assert services.intake.outcomes.hits == 0
    upload(ann)  # her own again: remembered
    assert services.intake.outcomes.hits == 3
    upload(bob)
    assert services.intake.outcomes.hits == 6
