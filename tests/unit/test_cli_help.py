"""``selfie-lora --help`` as a person reads it: a flag is shown as a flag, not as an option
that takes a ``<bool>``, and the command lists do not break mid-sentence."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

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
    ([], {"serve", "worker", "gc", "check", "train", "resume", "cancel", "generate", "export",
          "compare", "demo", "users"}),
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


def _options_without_help() -> list[str]:
    import typer

    def walk(command: Any, path: list[str], ctx: Any) -> Iterator[str]:
        for param in command.params:
            if param.param_type_name == "option" and not param.help:
                yield " ".join([*path, param.opts[0]])
        if hasattr(command, "list_commands"):
            for name in command.list_commands(ctx):
                sub = command.get_command(ctx, name)
                yield from walk(sub, [*path, name],
                                sub.context_class(sub, parent=ctx, info_name=name))

    root = typer.main.get_command(app)
    return list(walk(root, ["selfie-lora"], root.context_class(root, info_name="selfie-lora")))


def test_every_option_says_what_it_does() -> None:
    # `selfie-lora --help` showed '-v, --verbose' and `generate --help` '--lora-scale FLOAT'
    # with nothing beside them: what -v shows, and that a scale given here is not saved, were
    # in README only.
    assert _options_without_help() == []


def test_the_verbose_flag_and_the_scale_say_what_they_do() -> None:
    said = " ".join(CliRunner().invoke(app, ["--help"], env={"COLUMNS": "80"}).output.split())
    assert "-v, --verbose Debug-level log lines on standard error" in said
    said = " ".join(CliRunner().invoke(app, ["generate", "--help"],
                                       env={"COLUMNS": "80"}).output.split())
    assert "--lora-scale FLOAT The LoRA scale of these pictures, -1 to 3" in said


def test_gc_lists_with_its_own_flag_not_the_global_verbose_one() -> None:
    # `selfie-lora -v gc` (debug log lines) and `gc -v` (every key) meant two things: -v is the
    # global flag only, and gc's listing is --list (its old -v/--verbose hidden, still taken).
    said = " ".join(CliRunner().invoke(app, ["gc", "--help"], env={"COLUMNS": "80"}).output.split())
    assert "--list List every row and key." in said
    assert "-v" not in said
    assert "--verbose" not in said


def test_the_usage_line_brackets_an_optional_argument_once() -> None:
    # 'Usage: selfie-lora export [OPTIONS] [[VERSION]]': its metavar had brackets of its own.
    said = CliRunner().invoke(app, ["export", "--help"], env={"COLUMNS": "80"}).output
    assert "[OPTIONS] [VERSION]" in said, said
    assert "[[" not in said, said


@pytest.mark.parametrize("command", ["train", "resume"])
def test_no_wait_says_what_trains_the_queued_training(command: str) -> None:
    # '--wait / --no-wait  Wait for the end.': nothing said that with --no-wait this command
    # trains nothing, and that a serve or worker must run for the training to start.
    said = " ".join(CliRunner().invoke(app, [command, "--help"],
                                       env={"COLUMNS": "80"}).output.split())
    assert ("--no-wait: queue it and return; a `selfie-lora serve` or `selfie-lora worker` "
            "running on these settings trains it") in said, said


@pytest.mark.parametrize("command", [[], ["users"], ["users", "keys"], ["generations"]])
def test_a_bare_command_prints_its_help_on_stdout_and_exits_0(command: list[str]) -> None:
    # `selfie-lora` alone printed the help on stderr and exited 2, a usage error: a newcomer's
    # first try looked failed, and `selfie-lora | less` paged nothing.
    result = CliRunner().invoke(app, command, env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("Usage: "), result.output
    assert "Commands:" in result.stdout
    assert result.stderr == ""


def test_the_versions_help_names_a_rollback_that_runs() -> None:
    # It said "('selfie-lora activate N' rolls back)": run as written, that is 'Missing option
    # '--user''.
    said = " ".join(CliRunner().invoke(app, ["versions", "--help"],
                                       env={"COLUMNS": "80"}).output.split())
    assert "'selfie-lora activate N --user NAME' rolls back" in said, said


def test_the_number_of_pictures_and_the_seed_say_what_they_are() -> None:
    # '-n, --num-outputs INTEGER  1 to 4.' and '--seed INTEGER  0 to 4294967295.': neither said
    # what it counts or seeds, nor that a seed not given is drawn and printed to reuse.
    said = " ".join(CliRunner().invoke(app, ["generate", "--help"],
                                       env={"COLUMNS": "80"}).output.split())
    assert "-n, --num-outputs INTEGER How many pictures: 1 to 4." in said, said
    assert ("--seed INTEGER The first picture's seed, 0 to 4294967295 (picture n: that + n - 1); "
            "default: drawn at random and printed, to make the pictures again.") in said, said
