"""Browser tests: Playwright driving Debian's Chromium (Playwright cannot download its own
browsers here) against a real ``selfie-lora serve``. They skip, with the reason, where either is
missing; ``.ci/run`` installs the ``chromium`` package."""

from __future__ import annotations

import itertools
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from selfie_lora.services.users import UserService
from tests.browser.support import PASSWORD, Account
from tests.e2e.conftest import (  # serve: the fixture, for these tests too
    ServeProcess,
    clean_env,
    serve,  # noqa: F401
    servers,
    user_service,
)

CHROMIUM = os.environ.get("SELFIE_LORA_TEST_CHROMIUM", "/usr/bin/chromium")
# Chromium's own background connections are refused on a machine without a network: off.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]


# One browser per test file, not per run: Playwright's sync API keeps an asyncio event loop
# running in the main thread while it is open, and every later test on that pytest-xdist worker
# would run inside it (``asyncio.run`` then fails, as the HTTP alerter's does). Closed at the end
# of the file, the loop is gone before the next file runs.
@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    if not Path(CHROMIUM).exists() and shutil.which("chromium") is None:
        pytest.skip(f"browser tests need Chromium at {CHROMIUM} (Debian: apt-get install "
                    "chromium; .ci/run installs it)")
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="browser tests need playwright (pip install playwright)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


# Every user of a shared server has a name of its own: ann1, ann2, ...
_NAMES = itertools.count(1)


# One ``selfie-lora serve --no-worker`` per test file, not per test: its start (and its
# face-analysis processes' start and first model load) and stop took seconds of CPU for each
# test. Each test has a user of its own on it (``account``), so no test sees another's photos,
# trainings, keys or versions.
@pytest.fixture(scope="module")
def shared_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    folder = tmp_path_factory.mktemp("shared-serve")
    # The Train page polls 4 times a second, not once: its tests wait for a number of polls,
    # or for the one that shows a change, and sat out a second for each. test_journey's own
    # server keeps the default.
    env = clean_env(folder / "home", SELFIE_LORA_TRAINER="local", SELFIE_LORA_BASE_MODEL="tiny",
                    SELFIE_LORA_PAGE_POLL_SECONDS="0.25")
    with servers(folder) as start:
        yield start(env, args=("--no-worker",))


# The users of the shared server are made by the service that ``selfie-lora users create``
# calls, in this process, on the server's database (SQLite: the server sees each new user at
# once, as it sees one the command makes while it runs): a ``users create`` process for each
# test took ~2 s of CPU (its imports, mostly) for a user that is only the test's set-up. The
# command itself, the password read from standard input, is run by test_journey, on a server
# of its own (``support.create``).
@pytest.fixture(scope="module")
def shared_users(shared_server: ServeProcess) -> Iterator[UserService]:
    with user_service(shared_server.env) as users:
        yield users


@pytest.fixture
def account(shared_server: ServeProcess, shared_users: UserService) -> Account:
    """A new user with a password and an API key, on the test file's shared server."""
    if shared_server.proc.poll() is not None:
        pytest.fail(shared_server.why("the test file's server has exited"))
    name = f"ann{next(_NAMES)}"
    user, key = shared_users.create(name=name, password=PASSWORD)
    assert user.name == name
    return Account(server=shared_server, name=name, key=key)
