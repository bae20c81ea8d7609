"""Fixtures of the integration tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from selfie_lora.adapters.db.migrate import upgrade
from selfie_lora.adapters.db.repository import SqlRepository
from tests.support.backends import DATABASES, database_url, fresh_engine


@pytest.fixture(params=DATABASES)
def repo(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SqlRepository]:
    """A migrated repository on each database the repository supports (the contract suites)."""
    engine = fresh_engine(database_url(request.param, tmp_path))
    upgrade(engine)
    yield SqlRepository(engine)
    engine.dispose()
