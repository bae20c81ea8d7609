"""Likeness tracking end to end on the local ``tiny`` backend: real trainings, real probe images
from the tiny FLUX, dlib, the API's grid and chart, and ``selfie-lora compare`` as a process."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from selfie_lora.api.app import create_app
from selfie_lora.likeness.chart import CHART_SIZE
from selfie_lora.likeness.grid import grid_size
from selfie_lora.wiring import build_services
from tests.conftest import auth, make_settings, wait_terminal
from tests.e2e.conftest import outside_env
from tests.support.photos import real_photo_zip

pytestmark = pytest.mark.slow
CLI = str(Path(sys.executable).parent / "selfie-lora")
PROBES = 4  # the default probe count
TINY_SIDE = 64  # the tiny model's default image side


def opened(data: bytes) -> tuple[int, int]:
    """The size of ``data``, which must open and decode fully as a PNG."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        assert img.format == "PNG"
        return img.size


def test_two_tiny_trainings_give_two_scored_versions_a_grid_and_a_chart(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    services = build_services(settings)
    try:
        app = create_app(settings, services=services, run_worker=True)
        with TestClient(app, raise_server_exceptions=False) as client:
            h = auth(services, "ann")
            r = client.post("/api/training/upload-zip", headers=h,
                            files={"file": ("me.zip", real_photo_zip(), "application/zip")})
            assert r.status_code == 202, r.text
            first = wait_terminal(client, h, r.json()["training"]["id"], timeout=240)
            assert first["training"]["status"] == "succeeded", first["training"]
            r = client.post("/api/training/start", headers=h, json={})
            assert r.status_code == 202, r.text
            second = wait_terminal(client, h, r.json()["training"]["id"], timeout=240)
            assert second["training"]["status"] == "succeeded", second["training"]
            # Random weights draw no face: both versions score as such, and the second has
            # nothing to lose against the first.
            assert second["training"]["gate"]["status"] == "passed"
            assert "no face" in second["training"]["gate"]["reason"]
            assert second["model"]["active_version"]["number"] == 2

            versions = client.get("/api/model/versions", headers=h).json()["versions"]
            assert [v["number"] for v in versions] == [2, 1]
            for v in versions:
                assert v["quality"]["status"] == "scored", v["quality"]
                assert v["quality"]["face_share"] == 0.0
                assert v["quality"]["embedding_model"] == "dlib_face_recognition_resnet_model_v1+5pt"
                report = client.get(v["quality_url"], headers=h).json()
                assert len(report["probes"]) == PROBES
                assert report["training"]["steps"] > 0
                assert report["training"]["final_loss"] is not None
                image = client.get(report["probes"][0]["image_url"], headers=h)
                assert opened(image.content) == (TINY_SIDE, TINY_SIDE)
            probes_1 = client.get(versions[1]["quality_url"], headers=h).json()["probes"]
            probes_2 = client.get(versions[0]["quality_url"], headers=h).json()["probes"]
            assert [(p["prompt"], p["seed"]) for p in probes_1] == [
                (p["prompt"], p["seed"]) for p in probes_2]

            compare = client.get("/api/model/compare", headers=h).json()
            assert (compare["a"]["number"], compare["b"]["number"]) == (1, 2)
            grid = client.get(compare["grid_url"], headers=h)
            assert grid.status_code == 200, grid.text
            assert opened(grid.content) == grid_size(PROBES)
            chart = client.get(compare["chart_url"], headers=h)
            assert chart.status_code == 200, chart.text
            assert opened(chart.content) == CHART_SIZE
            log = client.get("/api/model/log", headers=h).json()["trainings"]
            assert [e["kind"] for e in log] == ["retraining", "first_training"]
            assert log[0]["scores"]["before"] is not None
            assert log[0]["scores"]["after"] is not None
    finally:
        services.close()

    # The command line writes the same two pictures and prints the scores.
    env = outside_env()
    env.update({"SELFIE_LORA_HOME": str(settings.home), "OMP_NUM_THREADS": "1",
                "COLUMNS": "200"})
    out = tmp_path / "compare"
    done = subprocess.run([CLI, "compare", "--user", "ann", "--out", str(out)], env=env,
                          capture_output=True, text=True, timeout=240, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert opened((out / "compare-v1-v2.png").read_bytes()) == grid_size(PROBES)
    assert opened((out / "likeness-chart.png").read_bytes()) == CHART_SIZE
    assert "identity" in done.stdout
    assert "no face" in done.stdout
    unknown = subprocess.run([CLI, "compare", "--user", "nobody"], env=env, capture_output=True,
                             text=True, timeout=120, check=False)
    assert unknown.returncode == 1
