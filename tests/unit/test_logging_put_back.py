"""A command run in a test (CliRunner) sets up logging as its own process would; the next test
in the same worker must find the root logger as it was (tests/conftest.py puts it back). The two
tests run in this order: pytest keeps a file's order, and --dist loadfile keeps a file in one
worker."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from typer.testing import CliRunner

from selfie_lora.cli import app

_BEFORE: dict[str, object] = {}


def _own_handlers() -> list[logging.Handler]:
    return [h for h in logging.getLogger().handlers
            if not type(h).__module__.startswith("_pytest.")]


def test_a_command_sets_up_logging_on_its_own_stderr(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    root = logging.getLogger()
    _BEFORE.update(level=root.level, handlers=_own_handlers())
    monkeypatch.setenv("SELFIE_LORA_HOME", str(tmp_path))
    result = CliRunner().invoke(app, ["users", "list"])  # any command: this one finds no database
    assert result.exit_code == 1, result.output
    assert "no database" in result.output
    # What the next test must not inherit: a handler on CliRunner's (now closed) stderr.
    added = [h for h in _own_handlers() if h not in _BEFORE["handlers"]]  # type: ignore[operator]
    assert [type(h) for h in added] == [logging.StreamHandler]
    handler = added[0]
    assert isinstance(handler, logging.StreamHandler)
    assert handler.stream.closed


def test_the_next_test_finds_the_root_logger_as_it_was(capsys: pytest.CaptureFixture[str]) -> None:
    assert _BEFORE, "runs after the test above"
    root = logging.getLogger()
    assert _own_handlers() == _BEFORE["handlers"]
    assert root.level == _BEFORE["level"]
    logging.getLogger("selfie_lora.tests").warning("a line after a command")
    assert "Logging error" not in capsys.readouterr().err
