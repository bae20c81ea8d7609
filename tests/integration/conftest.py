"""Fixtures of the integration tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from selfie_lora.adapters.db.repository import SqlRepository
from selfie_lora.config import get_settings
from tests.support.backends import DATABASES, migrated_engine


@pytest.fixture(params=DATABASES)
def repo(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SqlRepository]:
    """A migrated repository on each database the repository supports (the contract suites)."""
    engine = migrated_engine(request.param, tmp_path)
    yield SqlRepository(engine)
    engine.dispose()


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """SELFIE_LORA_HOME for commands run in this process (the CLI tests), fresh per test."""
    monkeypatch.setenv("SELFIE_LORA_HOME", str(tmp_path / "home"))
    get_settings.cache_clear()
    yield tmp_path / "home"
    get_settings.cache_clear()


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """torch on one thread for a module's tests: with two threads and other load on the machine,
    the tiny model's steps were 60-100x slower."""
    torch = pytest.importorskip("torch")
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
