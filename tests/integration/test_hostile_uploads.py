"""The hostile-upload corpus (``tests/support/hostile.py``), end to end through the HTTP API.

Each case must be answered 422 with its specific code (the whole upload refused), or
``dataset_rejected`` carrying a finding with the specific code (one photo refused), with nothing
stored and memory bounded.
"""

from __future__ import annotations

import contextlib
import io
import json
import random
import re
import resource
import tracemalloc
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from selfie_lora.api.app import create_app
from selfie_lora.testing.fakes import FakeGenerator, FakeTrainer
from selfie_lora.wiring import Services, build_services
from tests.conftest import auth, make_settings, one_person_analyzer, serving
from tests.support.asgi import multipart, traced_post_in_messages
from tests.support.hostile import CASES, MB, Case, encode, jpeg, zip_of
from tests.support.photos import synthetic_photo


def test_the_corpus_is_big_enough() -> None:
    assert len(CASES) >= 30
    assert len({c.id for c in CASES}) == len(CASES)


# --------------------------------------------------------------------------------------------
# Running it through the API


def _post(client: TestClient, headers: dict[str, str], case: Case,
          payload: bytes | list[tuple[str, bytes]]) -> tuple[int, dict[str, object]]:
    if case.route == "zip":
        assert isinstance(payload, bytes)
        r = client.post("/api/training/upload-zip", headers=headers,
                        files={"file": ("photos.zip", payload, "application/zip")},
                        data={"start": "false"})
    else:
        assert isinstance(payload, list)
        r = client.post("/api/training/upload", headers=headers, data={"start": "false"},
                        files=[("files", (n, b, "image/jpeg")) for n, b in payload])
    return r.status_code, r.json()


def _proc_status(field: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) * 1024 if match else None


def _start_rss_window() -> int:
    """The RSS now; resets the kernel's high-water mark where Linux allows it, so the peak read
    afterwards belongs to this request and not to whatever ran before in this process."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
    now = _proc_status("VmRSS")
    return now if now is not None else _peak_rss()


def _peak_rss() -> int:
    peak = _proc_status("VmHWM")
    if peak is not None:
        return peak
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def assert_nothing_stored(client: TestClient, headers: dict[str, str], services: Services) -> None:
    blob_dir = services.settings.blob_dir
    assert not (blob_dir / "photos").exists() or not any((blob_dir / "photos").iterdir())
    assert not (blob_dir / "datasets").exists() or not any((blob_dir / "datasets").iterdir())
    assert client.get("/api/model", headers=headers).status_code == 404


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_hostile_upload_is_refused(case: Case, client: TestClient, services: Services) -> None:
    headers = auth(services, "mallory")
    payload = case.payload()
    rss_before = _start_rss_window()
    if case.bomb:
        tracemalloc.start()
    try:
        status, body = _post(client, headers, case, payload)
    finally:
        if case.bomb:
            _current, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
    assert status == 422, body
    error = body["error"]
    assert isinstance(error, dict)
    assert error["message"]
    assert "Traceback" not in str(body)
    if case.per_photo:
        assert error["code"] == "dataset_rejected", error
        assert case.code in {d["code"] for d in error["details"]}, error["details"]
    else:
        assert error["code"] == case.code, error
    assert_nothing_stored(client, headers, services)
    if case.bomb:
        growth = _peak_rss() - rss_before
        print(f"\n{case.id}: traced peak {peak / MB:.1f} MB, peak RSS growth {growth / MB:.1f} MB")
        assert peak < 200 * MB
        assert growth < 200 * MB


def test_every_accepted_format_is_read(client: TestClient, services: Services) -> None:
    """JPEG, PNG, WebP, HEIC and AVIF photos all make it into the dataset."""
    import pillow_heif

    headers = auth(services, "ann")

    def drawing(seed: int) -> Image.Image:
        # Five different pictures: one picture in five formats would be five near-duplicates.
        return Image.open(io.BytesIO(synthetic_photo(seed, size=160))).convert("RGB")

    heic = pillow_heif.from_pillow(drawing(4))
    heic_buf = io.BytesIO()
    heic.save(heic_buf, format="HEIF", quality=90)
    members = {
        "a.jpg": encode(drawing(1), "JPEG", quality=92),
        "b.png": encode(drawing(2), "PNG"),
        "c.webp": encode(drawing(3), "WEBP", quality=90),
        "d.heic": heic_buf.getvalue(),
        "e.avif": encode(drawing(5), "AVIF", quality=90),
    }
    r = client.post("/api/training/upload-zip", headers=headers, data={"start": "false"},
                    files={"file": ("p.zip", zip_of(members), "application/zip")})
    assert r.status_code == 202, r.text
    assert r.json()["dataset"]["images_accepted"] == 5


@pytest.fixture
def small_upload_client(tmp_path: Path) -> Iterator[tuple[TestClient, Services]]:
    settings = make_settings(tmp_path, max_upload_bytes=64 * 1024)
    services = build_services(settings, trainers={"local": FakeTrainer()},
                              generators={"local": FakeGenerator()},
                              face_analyzer=one_person_analyzer())
    app = create_app(settings, services=services, run_worker=False)
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client, services
    services.close()


def test_an_upload_over_the_limit_is_refused(
        small_upload_client: tuple[TestClient, Services]) -> None:
    client, services = small_upload_client
    headers = auth(services, "mallory")
    big = zip_of({f"{i}.jpg": jpeg((400, 300), seed=i) for i in range(10)},
                 compression=zipfile.ZIP_STORED)
    assert len(big) > 64 * 1024
    r = client.post("/api/training/upload-zip", headers=headers, data={"start": "false"},
                    files={"file": ("p.zip", big, "application/zip")})
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "upload_too_large"
    assert_nothing_stored(client, headers, services)


def test_an_oversized_photo_and_a_nested_zip_are_left_out_and_the_rest_stored(
        client: TestClient, services: Services) -> None:
    """A 51 MB ProRAW DNG and a stray zip beside good photos refused the whole upload (422
    member_too_large / nested_archive): now the good photos are stored, and each bad file is a
    finding of the set's, with what to do, through the zip upload and the files upload alike."""
    from tests.support.hostile import Raw, raw_zip, stored

    headers = auth(services, "ann")
    good = {f"selfie{i}.jpg": synthetic_photo(i, size=160) for i in range(5)}
    nested = zip_of({"more.jpg": synthetic_photo(9, size=160)})
    # Declared 51 MB, never decompressed: its bytes are no deflate stream at all.
    dng = Raw(name=b"IMG_0042.DNG", payload=bytes(300 * 1024), size=51 * MB, crc=0, method=8)
    data = raw_zip([*(stored(n, b) for n, b in good.items()), dng, stored("x.zip", nested)])
    r = client.post("/api/training/upload-zip", headers=headers, data={"start": "false"},
                    files={"file": ("p.zip", data, "application/zip")})
    assert r.status_code == 202, r.text
    dataset = r.json()["dataset"]
    assert dataset["images_total"] == 7
    assert dataset["images_accepted"] == 5
    by_photo = {f["photo"]: f for f in dataset["findings"] if f["severity"] == "reject"}
    assert by_photo["IMG_0042.DNG"]["code"] == "file_too_large"
    assert by_photo["IMG_0042.DNG"]["message"] == \
        "IMG_0042.DNG is 51 MB, over the 50 MB a photo may be"
    assert by_photo["x.zip"]["code"] == "nested_archive"
    assert by_photo["x.zip"]["advice"] == "unpack it and upload its photos"

    # A member with a password was the whole upload's 422 encrypted_member: now its finding.
    locked = stored("locked.jpg", synthetic_photo(8, size=160), flags=0x1)
    data = raw_zip([*(stored(n, b) for n, b in good.items()), locked])
    r = client.post("/api/training/upload-zip", headers=headers, data={"start": "false"},
                    files={"file": ("p.zip", data, "application/zip")})
    assert r.status_code == 202, r.text
    dataset = r.json()["dataset"]
    assert (dataset["images_total"], dataset["images_accepted"]) == (6, 5)
    assert [(f["photo"], f["code"], f["advice"]) for f in dataset["findings"]
            if f["severity"] == "reject"] == [
        ("locked.jpg", "password_protected",
         "make the zip again without a password, or upload the photo itself")]

    sent = [*good.items(), ("x.zip", nested)]
    r = client.post("/api/training/upload", headers=headers, data={"start": "false"},
                    files=[("files", (n, b, "image/jpeg")) for n, b in sent])
    assert r.status_code == 202, r.text
    dataset = r.json()["dataset"]
    assert dataset["images_accepted"] == 5
    assert [(f["photo"], f["code"]) for f in dataset["findings"] if f["severity"] == "reject"] \
        == [("x.zip", "nested_archive")]


def test_the_413_states_the_configured_upload_limit_in_the_guard_and_the_routes(
        tmp_path: Path) -> None:
    """With SELFIE_LORA_MAX_UPLOAD_BYTES at 1.5 MB, a 3 MB upload read 'the request body is
    larger than 2 MB' (the guard's padded limit, rounded) and a 2 MB one 'the upload is larger
    than 1 MB' (the route's, rounded down to whole MB; 0 MB below 1 MB): each now states the
    configured limit, as `selfie-lora check` does."""
    limit = 3 * 512 * 1024  # 1.5 MB
    with serving(make_settings(tmp_path, max_upload_bytes=limit)) as (client, services):
        headers = auth(services, "mallory")
        said = "the upload is larger than 1.5 MB"
        for size in (3 * 1024 * 1024, 2 * 1024 * 1024):  # refused by the guard, by the route
            r = client.post("/api/training/upload-zip", headers=headers,
                            files={"file": ("p.zip", bytes(size), "application/zip")})
            assert r.status_code == 413, (size, r.text)
            assert r.json()["error"] == {"code": "upload_too_large", "message": said,
                                         "details": []}, size
        # Photos sent one by one: the second one goes past what the first left.
        r = client.post("/api/training/upload", headers=headers, files=[
            ("files", ("a.jpg", bytes(1024 * 1024), "image/jpeg")),
            ("files", ("b.jpg", bytes(1024 * 1024), "image/jpeg"))])
        assert r.status_code == 413, r.text
        assert r.json()["error"]["message"] == said
        assert_nothing_stored(client, headers, services)


def test_a_file_sent_one_by_one_is_held_once_while_the_upload_is_read(
        client: TestClient, services: Services) -> None:
    """Each file of POST /api/training/upload was read as 1 MB chunks then joined, so a big
    one was held twice at once: a 20 MB file beside three photos peaked at 2x the upload
    (traced). Now each is read in one piece, of the size the form parser counted."""
    headers = auth(services, "ann")
    sent = [(f"selfie{i}.jpg", synthetic_photo(i, size=160)) for i in range(3)]
    sent.append(("big.jpg", random.Random(0).randbytes(20 * MB)))
    body, content_type = multipart(sent, {"start": "false"})
    del sent
    status, answer, peak = traced_post_in_messages(client, "/api/training/upload", headers,
                                                   body, content_type)
    assert status == 202, answer
    assert peak < 1.7 * len(body), f"peak {peak / MB:.1f} MB for {len(body) / MB:.1f} MB"


def test_a_file_larger_than_a_photo_may_be_is_refused_unread_among_the_files_sent(
        client: TestClient, services: Services) -> None:
    """A 51 MB camera raw file sent to POST /api/training/upload beside three photos was read
    whole into memory (the upload's peak: 51 MB and more) before it got its finding. Now its
    size, which the form parser counted, decides: file_too_large, and none of it is read."""
    headers = auth(services, "ann")
    sent = [(f"selfie{i}.jpg", synthetic_photo(i, size=160)) for i in range(3)]
    sent.append(("IMG_0042.DNG", bytes(51 * MB)))
    body, content_type = multipart(sent, {"start": "false"})
    del sent
    status, answer, peak = traced_post_in_messages(client, "/api/training/upload", headers,
                                                   body, content_type)
    assert status == 202, answer
    dataset = json.loads(answer)["dataset"]
    assert dataset["images_accepted"] == 3
    (refused,) = [f for f in dataset["findings"] if f["severity"] == "reject"]
    assert (refused["photo"], refused["code"], refused["message"]) == (
        "IMG_0042.DNG", "file_too_large", "IMG_0042.DNG is 51 MB, over the 50 MB a photo may be")
    assert peak < 10 * MB, f"peak {peak / MB:.1f} MB"
