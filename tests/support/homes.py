"""A HOME made once per module (its trainings were most of each test's time) and copied per test.

Each test starts from its own copy, so one that deletes or adds something is not seen by the
next. The HOME is made with the app closed after it (``Services.close`` closes the database's
engine and the job queue's SQLite connection): both databases are checkpointed (no ``-wal``
file left, checked), and nothing is open that could checkpoint one in the middle of a copy. A
copy carries everything the tests read from it: the database (which stores blob keys and ids,
no absolute path), the blobs with their modification times (``copy2``: the copy is the HOME as
it was made, each blob as old as it was then, so what a test does by age, or after backdating a
blob, starts from the maker's clock, not from the moment of the copy), the deployment marker.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import pytest
from fastapi.testclient import TestClient

from selfie_lora.wiring import Services
from tests.conftest import make_settings, serving

T = TypeVar("T")


@dataclass(frozen=True)
class MadeHome(Generic[T]):
    """A HOME made once, and what its maker returned (owners, snapshots taken on the way)."""

    home: Path
    made: T

    def copy_to(self, tmp_path: Path) -> Path:
        """A copy of the HOME at ``tmp_path / "home"``, where ``make_settings(tmp_path)``
        looks (it keeps a database that is there)."""
        return copy_home(self.home, tmp_path)


def copy_home(home: Path, tmp_path: Path) -> Path:
    """``home`` copied to ``tmp_path / "home"`` (modification times kept): for a fixture that
    keeps its made HOME as a bare path (test_cli_out's ``trained_home``); ``MadeHome.copy_to``
    is this same copy."""
    return Path(shutil.copytree(home, tmp_path / "home"))


def made_once(tmp_path_factory: pytest.TempPathFactory,
              make: Callable[[TestClient, Services], T], **build: Any) -> MadeHome[T]:
    """A HOME where ``make`` ran on the app on fake backends with its worker (``serving``),
    closed before it is returned. ``build``: more arguments to ``serving``."""
    base = tmp_path_factory.mktemp("made-once")
    with serving(make_settings(base), run_worker=True, **build) as (client, services):
        made = make(client, services)
    home = base / "home"
    assert not list(home.glob("*-wal")), f"a database of the made HOME is still open: {home}"
    return MadeHome(home=home, made=made)
