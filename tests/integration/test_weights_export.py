"""``GET /api/model/versions/{id}/weights?format=kohya`` and ``selfie-lora export``: the stored
file as it is, or converted to kohya's layout; weights the converter cannot read are a 422 / exit 1.
(That the files load in diffusers: tests/integration/test_lora_exports.)"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from selfie_lora import cli
from selfie_lora.adapters.flux.lora_formats import RawTensor, read_safetensors, write_safetensors
from selfie_lora.config import Settings
from selfie_lora.domain.weights import WeightsFormat
from selfie_lora.services.ports import ProgressSink, TrainingJob, TrainingResult
from selfie_lora.testing.fakes import FakeTrainer
from selfie_lora.wiring import Services
from tests.conftest import auth, wait_terminal
from tests.integration.test_api import upload
from tests.support.owners import own_model

RANK, ALPHA, WIDTH = 2, 6.0, 16


def our_lora() -> bytes:
    """A file as save_lora writes one (bf16 weights, fp32 alpha per module), FLUX-shaped but
    narrow: one double block's image attention and one single block's q, k, v."""
    rng = np.random.default_rng(7)
    tensors: dict[str, RawTensor] = {}
    for module in ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k",
                   "transformer_blocks.0.attn.to_v", "transformer_blocks.0.attn.to_out.0",
                   "single_transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.attn.to_k",
                   "single_transformer_blocks.0.attn.to_v"):
        for part, shape in (("lora_A", (RANK, WIDTH)), ("lora_B", (WIDTH, RANK))):
            values = rng.standard_normal(shape).astype(np.float32)
            tensors[f"transformer.{module}.{part}.weight"] = RawTensor.from_float32(values, "BF16")
        tensors[f"transformer.{module}.alpha"] = RawTensor.from_float32(np.array(ALPHA), "F32")
    return write_safetensors(tensors, {"format": "pt", "selfie_lora.trigger_word": "TOK"})


@dataclass
class LoraFileTrainer(FakeTrainer):
    """The fake trainer, writing ``weights`` (None: the fake's own file, metadata only)."""

    weights: bytes | None = None

    def train(self, job: TrainingJob, *, sink: ProgressSink) -> TrainingResult:
        result = super().train(job, sink=sink)
        if self.weights is not None:
            result.weights_path.write_bytes(self.weights)
        return result


@pytest.fixture
def fake_trainer() -> FakeTrainer:
    return LoraFileTrainer(weights=our_lora())


def trained_version(client: TestClient, headers: dict[str, str]) -> dict[str, str]:
    done = wait_terminal(client, headers, upload(client, headers)["training"]["id"])
    assert done["training"]["status"] == "succeeded"
    version: dict[str, str] = done["model"]["active_version"]
    return version


def test_weights_as_stored_and_in_kohyas_layout(client: TestClient, services: Services) -> None:
    h = auth(services, "ann")
    version = trained_version(client, h)
    url = f"/api/model/versions/{version['id']}/weights"

    stored = client.get(url, headers=h)
    assert stored.status_code == 200
    assert stored.content == our_lora()
    assert client.get(url, params={"format": "diffusers"}, headers=h).content == stored.content
    assert 'filename="lora-v1.safetensors"' in stored.headers["content-disposition"]

    kohya = client.get(url, params={"format": "kohya"}, headers=h)
    assert kohya.status_code == 200, kohya.text
    assert 'filename="lora-v1-kohya.safetensors"' in kohya.headers["content-disposition"]
    # The digest header is the export's own, so a client can check what it got.
    assert kohya.headers["x-weights-sha256"] == hashlib.sha256(kohya.content).hexdigest()
    assert kohya.headers["x-weights-sha256"] != stored.headers["x-weights-sha256"]
    tensors, metadata = read_safetensors(kohya.content)
    assert metadata["selfie_lora.trigger_word"] == "TOK"
    assert {k.split(".")[0] for k in tensors} == {
        "lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_double_blocks_0_img_attn_proj",
        "lora_unet_single_blocks_0_linear1"}
    assert tensors["lora_unet_double_blocks_0_img_attn_proj.alpha"].scalar() == ALPHA
    assert tensors["lora_unet_double_blocks_0_img_attn_qkv.alpha"].scalar() == 3 * ALPHA
    assert tensors["lora_unet_single_blocks_0_linear1.alpha"].scalar() == 4 * ALPHA
    assert {t.dtype for k, t in tensors.items() if not k.endswith(".alpha")} == {"BF16"}

    assert client.get(url, params={"format": "ckpt"}, headers=h).status_code == 422
    # Another user's version is not found, in any layout: Bob has a version of his own, so it
    # is the version lookup, scoped to his model, that refuses (not "you have no model yet").
    bob = own_model(client, services, "bob")
    assert bob.version is not None
    for weights_format in ("diffusers", "kohya"):
        refused = client.get(url, params={"format": weights_format}, headers=bob.headers)
        assert refused.status_code == 404, (weights_format, refused.status_code)
        assert refused.json()["error"]["message"].startswith("no such version: ")
        own = client.get(f"/api/model/versions/{bob.version['id']}/weights",
                         params={"format": weights_format}, headers=bob.headers)
        assert own.status_code == 200, own.text


def test_weights_the_converter_cannot_read_are_a_422(
    client: TestClient, services: Services, fake_trainer: LoraFileTrainer
) -> None:
    fake_trainer.weights = None  # the fake's own file: no tensors (like a foreign trainer's file)
    h = auth(services, "ann")
    version = trained_version(client, h)
    url = f"/api/model/versions/{version['id']}/weights"
    assert client.get(url, headers=h).status_code == 200  # as stored: always
    refused = client.get(url, params={"format": "kohya"}, headers=h)
    assert refused.status_code == 422
    assert refused.json()["error"]["code"] == "unsupported_weights"
    assert "diffusers' layout" in refused.json()["error"]["message"]


def test_cli_export_writes_the_route_s_bytes(
    client: TestClient, services: Services, settings: Settings, fake_trainer: LoraFileTrainer,
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli, "_settings", lambda: settings)
    h = auth(services, "ann")
    version = trained_version(client, h)
    runner = CliRunner()

    out = tmp_path / "exports"
    out.mkdir()
    done = runner.invoke(cli.app, ["export", "--user", "ann", "--format", "kohya", "--out", str(out)])
    assert done.exit_code == 0, done.output
    written = out / "lora-v1-kohya.safetensors"
    route = client.get(f"/api/model/versions/{version['id']}/weights", params={"format": "kohya"},
                       headers=h)
    assert written.read_bytes() == route.content
    assert f"sha256 {hashlib.sha256(route.content).hexdigest()}" in done.output.replace("\n", "")
    assert [p.name for p in out.iterdir()] == ["lora-v1-kohya.safetensors"]  # no partial left

    named = tmp_path / "mine.safetensors"
    stored = runner.invoke(cli.app, ["export", "--user", "ann", "--version", "v1", "--out", str(named)])
    assert stored.exit_code == 0, stored.output
    assert named.read_bytes() == our_lora()

    missing = runner.invoke(cli.app, ["export", "--user", "ann", "--version", "9", "--out", str(named)])
    assert missing.exit_code == 1
    assert "no such version" in missing.output

    fake_trainer.weights = None
    wait_terminal(client, h, upload(client, h)["training"]["id"])
    refused = runner.invoke(cli.app, ["export", "--user", "ann", "--version", "2", "--format",
                                      WeightsFormat.KOHYA.value, "--out", str(tmp_path / "v2.safetensors")])
    assert refused.exit_code == 1
    assert "not a FLUX transformer LoRA" in refused.output
    assert not (tmp_path / "v2.safetensors").exists()


def test_cli_export_takes_the_version_as_its_argument_and_names_the_file_after_it(
    client: TestClient, services: Services, settings: Settings, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    # The contract: selfie-lora export VERSION [--format diffusers/kohya] [--out FILE].
    monkeypatch.setattr(cli, "_settings", lambda: settings)
    h = auth(services, "ann")
    trained_version(client, h)
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    runner = CliRunner()

    done = runner.invoke(cli.app, ["export", "1", "--user", "ann"])
    assert done.exit_code == 0, done.output
    written = here / "lora-v1.safetensors"
    assert written.read_bytes() == our_lora()

    written.write_bytes(b"mine")  # an existing file is never replaced silently
    again = runner.invoke(cli.app, ["export", "1", "--user", "ann"])
    assert again.exit_code == 1
    assert "exists" in again.output
    assert "--force" in again.output
    assert written.read_bytes() == b"mine"

    forced = runner.invoke(cli.app, ["export", "v1", "--user", "ann", "--force"])
    assert forced.exit_code == 0, forced.output
    assert written.read_bytes() == our_lora()

    clash = runner.invoke(cli.app, ["export", "1", "--version", "2", "--user", "ann"])
    assert clash.exit_code == 2


def test_weights_missing_from_the_storage_are_a_409_not_a_500(
    client: TestClient, services: Services, settings: Settings, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    # The version's file is gone from the storage (lost, restored from an older backup). Its
    # download and export answered 500 ("something went wrong"), which the user can only retry,
    # where generating with it answers 409 weights_missing.
    monkeypatch.setattr(cli, "_settings", lambda: settings)
    h = auth(services, "ann")
    version = trained_version(client, h)
    services.blobs.delete(services.repo.get_version(version["id"]).weights_key)
    sentence = ("version 1's weights are missing from the storage, so they cannot be downloaded; "
                "download another version (or train again)")
    url = f"/api/model/versions/{version['id']}/weights"
    for params in ({}, {"format": "diffusers"}, {"format": "kohya"}):
        r = client.get(url, params=params, headers=h)
        assert r.status_code == 409, (params, r.text)
        assert r.json()["error"]["code"] == "weights_missing"
        assert r.json()["error"]["message"] == sentence

    for fmt in ("diffusers", "kohya"):
        out = tmp_path / f"{fmt}.safetensors"
        done = CliRunner().invoke(cli.app, ["export", "1", "--user", "ann", "--format", fmt,
                                            "--out", str(out)])
        assert done.exit_code == 1, done.output
        assert "weights are missing from the storage" in done.output
        assert not out.exists()
