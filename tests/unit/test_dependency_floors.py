"""The lowest versions pyproject.toml allows have what the code uses (review daydiff2: the
generator catches ``torch.OutOfMemoryError``, new in torch 2.5, while ``torch>=2.4`` was
allowed; on 2.4 that line raised AttributeError in place of the memory error)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _floor(package: str) -> tuple[int, ...]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = [*project["dependencies"],
                    *(r for extra in project.get("optional-dependencies", {}).values()
                      for r in extra)]
    floors = [tuple(int(part) for part in m.group(1).split("."))
              for r in requirements
              if (m := re.fullmatch(rf"{package}\s*>=\s*([0-9.]+)\b.*", r.strip()))]
    assert floors, f"no {package}>= in pyproject.toml"
    return min(floors)


def test_torch_s_floor_has_out_of_memory_error() -> None:
    assert _floor("torch") >= (2, 5)  # torch.OutOfMemoryError


def test_huey_s_floor_shares_one_sqlite_connection() -> None:
    # HueyJobQueue.close closes huey's SQLite storage from one thread; huey 2.x kept one
    # connection per thread (threading.local), so the others stayed open with their -wal file
    # (review of fix-queueclose, B1). 3.0 shares one connection behind a lock.
    assert _floor("huey") >= (3, 0)
