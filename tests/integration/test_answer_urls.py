"""The URLs in answers (a version's weights_url, a generation's images, ...): absolute, built
from SELFIE_LORA_PUBLIC_URL, when it is set, so a client fetches them as given; paths on this
service when it is not, never built from the request's Host header (anyone can forge it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from tests.conftest import auth, make_settings, serving, wait_terminal
from tests.support.photos import photo_zip

PUBLIC = "https://lora.example.com/selfies"


def trained(client: TestClient, h: dict[str, str]) -> dict[str, Any]:
    r = client.post("/api/training/upload-zip", headers=h,
                    files={"file": ("p.zip", photo_zip(3), "application/zip")})
    assert r.status_code == 202, r.text
    done = wait_terminal(client, h, r.json()["training"]["id"])
    assert done["training"]["status"] == "succeeded", done
    return done


def answered_urls(client: TestClient, h: dict[str, str]) -> list[str]:
    versions = client.get("/api/model/versions", headers=h).json()["versions"]
    model = client.get("/api/model", headers=h).json()
    r = client.post("/api/generate", headers=h, json={"prompt": "on a hike"})
    assert r.status_code == 200, r.text
    quality = client.get(f"/api/model/versions/{versions[0]['id']}/quality", headers=h).json()
    listed = client.get("/api/generations", headers=h).json()["generations"]
    return [versions[0]["weights_url"], versions[0]["quality_url"],
            model["active_version"]["weights_url"], *r.json()["generation"]["images"],
            *(url for g in listed for url in g["images"]),
            quality["chart_url"], *(p["image_url"] for p in quality["probes"])]


def test_with_a_public_url_the_answers_urls_are_absolute(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, public_url=PUBLIC + "/")
    with serving(settings, run_worker=True) as (client, svc):
        h = auth(svc, "ann")
        trained(client, h)
        urls = answered_urls(client, h)
        assert len(urls) >= 5
        for url in urls:
            # Old code: "/api/model/versions/<id>/weights", which no HTTP client can fetch.
            assert url.startswith(PUBLIC + "/api/"), url
        # They name this service's routes: the path after PUBLIC_URL is served.
        weights = client.get(urls[0].removeprefix(PUBLIC), headers=h)
        assert weights.status_code == 200
        image = client.get(urls[3].removeprefix(PUBLIC), headers=h)
        assert (image.status_code, image.headers["content-type"]) == (200, "image/png")


def test_without_a_public_url_they_are_paths_whatever_the_host_header_says(
        tmp_path: Path) -> None:
    with serving(make_settings(tmp_path), run_worker=True) as (client, svc):
        h = auth(svc, "ann")
        trained(client, h)
        forged = {**h, "Host": "attacker.example"}
        for url in answered_urls(client, forged):
            assert url.startswith("/api/"), url
            assert "attacker" not in url
