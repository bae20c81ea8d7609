"""The layering contracts (``[tool.importlinter]`` in pyproject.toml) hold, and break when a
forbidden import is planted, so the check can fail."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINT = Path(sys.executable).parent / "lint-imports"


def lint(src: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    if not LINT.exists():
        pytest.fail("lint-imports is not installed (pip install -e '.[dev]')")
    # COLUMNS: its report must not wrap a contract's name.
    env = {"PYTHONPATH": str(src), "PATH": "/usr/bin:/bin", "COLUMNS": "300"}
    return subprocess.run([str(LINT), "--no-cache"], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=120, check=False)


def test_the_layers_hold() -> None:
    done = lint(ROOT / "src", ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout


@pytest.mark.parametrize(("module", "planted", "contract"), [
    ("domain/plan.py", "import selfie_lora.services.common", "the domain imports nothing"),
    ("services/models.py", "import selfie_lora.adapters.db.repository", "services never"),
    ("dataset/prepare.py", "import selfie_lora.services.layout", "the photo checks"),
    ("adapters/replicate/session.py", "import selfie_lora.adapters.flux.runtime",
     "adapters of one vendor"),
    ("api/model.py", "import selfie_lora.adapters.db.repository", "entry points reach"),
])
def test_a_planted_forbidden_import_breaks_its_contract(tmp_path: Path, module: str,
                                                        planted: str, contract: str) -> None:
    src = tmp_path / "src"
    shutil.copytree(ROOT / "src" / "selfie_lora", src / "selfie_lora",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    target = src / "selfie_lora" / module
    target.write_text(target.read_text() + f"\n{planted}  # planted by the test\n")
    done = lint(src, tmp_path)
    assert done.returncode != 0, done.stdout
    broken = [line for line in done.stdout.splitlines() if line.endswith("BROKEN")]
    assert len(broken) == 1, done.stdout
    assert broken[0].startswith(contract), broken


def test_no_entry_point_names_the_repository() -> None:
    pkg = ROOT / "src" / "selfie_lora"
    entry_points = [*sorted((pkg / "api").glob("*.py")), *sorted((pkg / "web").glob("*.py")),
                    *sorted((pkg / "web" / "templates").glob("*.html")), pkg / "cli.py",
                    pkg / "demo.py", pkg / "console.py", pkg / "worker.py"]
    import re

    naming = re.compile(r"\brepo\b|\bRepository\b|\brepository\b|_repo\b")
    offenders = [f"{path.name}:{n}: {line.strip()}" for path in entry_points
                 for n, line in enumerate(path.read_text().splitlines(), 1)
                 if naming.search(line)]
    assert offenders == []
