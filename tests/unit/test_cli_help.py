"""``selfie-lora --help`` as a person reads it: a flag is shown as a flag, not as an option
that takes a ``<bool>``, and the command lists do not break mid-sentence."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from selfie_lora.cli import app


@pytest.mark.parametrize("command", [[], ["export"], ["gc"], ["users", "create"], ["serve"]])
def test_flags_are_shown_as_flags(command: list[str]) -> None:
    result = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    # typer's rich help showed every flag as '--force <bool>', as if it took a value.
    assert "<bool>" not in result.output, result.output


@pytest.mark.parametrize(("command", "names"), [
    ([], {"serve", "worker", "gc", "check", "train", "resume", "generate", "export", "compare",
          "demo", "users"}),
    (["users", "keys"], {"list", "create", "revoke", "rotate"}),
])
def test_each_command_is_one_line_of_the_list(command: list[str], names: set[str]) -> None:
    # The lists kept the docstrings' line breaks: 'photos never trained on' / '(after' /
    # 'SELFIE_LORA_GC_DATASET_DAYS), ...' broke the gc entry mid-sentence.
    result = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    listing = result.output.split("Commands")[1].splitlines()[1:]
    entries = [line.strip(" │╭╰─╯") for line in listing]
    first_words = [entry.split()[0] for entry in entries if entry]
    assert set(first_words) >= names, result.output
    assert len(first_words) == len(set(first_words)), result.output  # no continuation lines


def test_a_value_after_force_is_not_taken_for_the_version() -> None:
    # It was read as VERSION: 'error: no such version: true', exit 1.
    result = CliRunner().invoke(app, ["export", "--user", "ann", "--force", "true"])
    assert result.exit_code == 2, result.output
    assert "'true' is not a version" in result.output
    assert "--force takes no value" in result.output
