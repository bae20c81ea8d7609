"""``selfie-lora demo``: the whole cycle on the embedded defaults, with a real retraining."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest

from selfie_lora.adapters.flux.tiny import TINY_CACHE_NAME
from selfie_lora.config import Settings
from selfie_lora.wiring import build_services
from tests.e2e.conftest import clean_env, run_cli

pytestmark = pytest.mark.slow


def test_the_demo_trains_then_really_retrains_and_says_what_changed(tmp_path: Path) -> None:
    out = tmp_path / "demo-output"
    env = clean_env(tmp_path / "unused-home")
    # `make demo` runs with the defaults: no lowered minimum from the test set-up.
    env.pop("SELFIE_LORA_MIN_PHOTOS")
    done = run_cli(["demo", "--out", str(out)], env, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    text = done.stdout
    assert "first training on 2 photos" in text
    assert "retraining with one more photo" in text
    assert "what the retraining changed (v1 -> v2)" in text
    # Two versions from two different photo sets: different weights, not a copy of v1.
    weights = sorted((out / "home" / "blobs" / "weights").glob("*.safetensors"))
    assert len(weights) == 2
    digests = {hashlib.sha256(w.read_bytes()).hexdigest() for w in weights}
    assert len(digests) == 2
    for name in ("v1-seed7.png", "v2-seed7.png", "compare-v1-v2.png", "likeness-v1-v2.png",
                 "likeness-chart.png"):
        assert (out / "generated" / name).stat().st_size > 0, name
    # Each written under a temporary name, then renamed (a kill leaves no truncated picture).
    assert list(out.rglob(".*.part")) == []
    assert sorted(p.name for p in (out / "photos").iterdir())[:1] == ["obama.jpg"]
    # It reads no setting from the environment, the run's shared model cache (which ``env``
    # keeps) included: a first run builds the tiny FLUX into its own HOME.
    assert env["SELFIE_LORA_CACHE_DIR"]
    assert (out / "home" / "cache" / TINY_CACHE_NAME / "model_index.json").is_file()
    # It ends by saying how to see it in a browser, and the account it prints signs in there.
    found = re.search(r"sign in as demo\s+password: (\S+)", text)
    assert found, text[-1500:]
    assert f"SELFIE_LORA_HOME={out / 'home'}" in " ".join(text.split())
    services = build_services(Settings(home=out / "home"), trainers={}, generators={})
    try:
        signed = services.users.sign_in(name="demo", password=found.group(1), client="test")
        assert signed.user.name == "demo"
        # Its API key too: made by the demo, it was never shown (a working key nobody had).
        key = re.search(r"API key \(for the HTTP API\): (\S+)", text)
        assert key, text[-1500:]
        assert services.users.authenticate(api_key=key.group(1)).name == "demo"
    finally:
        services.close()
