"""What the browser tests share: users (``Account``: made in the test process by the users
service, as ``users create`` makes them; ``create`` runs the command itself), signing in on the
page, photos uploaded through the API (quicker to set up than the page, where the page is not
what a test is about)."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from selfie_lora.web.app import WEB_ROOT
from tests.e2e.conftest import ServeProcess, selfie_lora_exe
from tests.support.photos import FIXTURES

PASSWORD = "a long password for tests"


def create(env: dict[str, str], name: str) -> str:
    """A user with a password (read from standard input, as a script would); its API key."""
    done = subprocess.run([selfie_lora_exe(), "users", "create", name, "--password", "--json"],
                          env=env, input=f"{PASSWORD}\n{PASSWORD}\n", capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    key: str = json.loads(done.stdout.strip().splitlines()[-1])["api_key"]
    return key


@dataclass(frozen=True)
class Account:
    """A user of its own on the test file's shared server (``serve --no-worker``: a training
    stays queued): its name, its API key, and the server's data folder."""

    server: ServeProcess
    name: str
    key: str

    @property
    def home(self) -> Path:
        return Path(self.server.env["SELFIE_LORA_HOME"])


def sign_in(page: Any, base: str, name: str, path: str = "/versions") -> None:
    page.goto(f"{base}{path}")
    assert "/signin" in page.url  # signed out: sent to sign in, and back after
    page.get_by_label("Name").fill(name)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(f"{base}{path}")


def upload_photos(base: str, key: str,
                  names: tuple[str, ...] = ("obama.jpg", "obama2.jpg", "obama3.jpg"), *,
                  start: bool = False) -> None:
    """A photo set for the user of ``key``; with ``start``, a training started on it."""
    files = [("files", (name, (FIXTURES / name).read_bytes(), "image/jpeg")) for name in names]
    with httpx.Client(base_url=base, timeout=120) as api:
        r = api.post("/api/training/upload", files=files,
                     data={"start": "true" if start else "false"},
                     headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 202, r.text


def fulfil_static(route: Any, path: str) -> None:
    """Answer a routed request for ``/static/...`` with the app's own file (its query left
    out), for tests that serve a page of their own around the real scripts and styles."""
    file = WEB_ROOT / path.split("?")[0].lstrip("/")
    route.fulfill(status=200, body=file.read_bytes(), content_type=(
        "text/javascript" if file.suffix == ".js" else "text/css"))
