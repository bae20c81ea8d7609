"""``selfie-lora demo``'s set-up. ``--out DIR`` replaces only what a demo wrote: a folder it did
not make is refused (exit status 2) and left as it is, so ``--out .`` in a project deletes
nothing; its own folder is reused run after run (``make demo`` twice). Its settings are the
embedded defaults, whatever the environment says."""

from __future__ import annotations

import io
import shlex
import subprocess
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from selfie_lora.cli import app
from selfie_lora.demo import (
    DEMO_MARKER,
    DemoFolderError,
    demo_settings,
    prepare_demo_folder,
    print_serve_command,
    running_executable,
    serve_command,
    where_everything_is,
)


def what_a_demo_leaves(out: Path) -> None:
    for name in ("photos/obama.jpg", "home/selfie-lora.db", "generated/v1-seed7.png"):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(b"demo")


def test_a_folder_with_a_users_files_is_refused_and_left_alone(tmp_path: Path) -> None:
    project = tmp_path / "project"
    (project / ".git").mkdir(parents=True)
    (project / "notes.txt").write_text("mine")
    result = CliRunner().invoke(app, ["demo", "--out", str(project)])
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)
    assert "did not make" in result.output
    assert "Traceback" not in result.output
    assert sorted(p.name for p in project.iterdir()) == [".git", "notes.txt"]
    assert (project / "notes.txt").read_text() == "mine"


def test_a_file_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "afile"
    target.write_text("mine")
    with pytest.raises(DemoFolderError, match="not a folder"):
        prepare_demo_folder(target)
    assert target.read_text() == "mine"


def test_the_demos_own_folder_is_reused_keeping_anything_else(tmp_path: Path) -> None:
    out = tmp_path / "demo-output"
    prepare_demo_folder(out)  # a new folder: taken and marked
    assert (out / DEMO_MARKER).is_file()
    what_a_demo_leaves(out)
    (out / "my-notes.txt").write_text("mine")  # put there by the user afterwards
    prepare_demo_folder(out)  # the second run
    assert sorted(p.name for p in out.iterdir()) == [DEMO_MARKER, "my-notes.txt"]


def test_an_empty_folder_is_taken(tmp_path: Path) -> None:
    prepare_demo_folder(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [DEMO_MARKER]


def test_a_folder_an_earlier_demo_made_before_the_marker_is_reused(tmp_path: Path) -> None:
    out = tmp_path / "demo-output"
    what_a_demo_leaves(out)
    prepare_demo_folder(out)
    assert sorted(p.name for p in out.iterdir()) == [DEMO_MARKER]
    # ... but not one that holds anything else beside that layout.
    what_a_demo_leaves(out)
    (out / DEMO_MARKER).unlink()
    (out / "thesis.tex").write_text("mine")
    with pytest.raises(DemoFolderError):
        prepare_demo_folder(out)
    assert (out / "home" / "selfie-lora.db").exists()


def test_the_demo_reads_no_setting_from_the_environment(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {
            "SELFIE_LORA_STORAGE_URL": "s3://production-bucket/loras",
            "AWS_ENDPOINT_URL": "https://s3.example.com",
            "SELFIE_LORA_ALERT_URL": "https://hooks.slack.com/services/T0/B0/secret",
            "SELFIE_LORA_WORKER_THREADS": "abc",  # invalid: must not stop the demo
            "SELFIE_LORA_PROBE_SIZE": "1024",
            "SELFIE_LORA_DATABASE_URL": "postgresql+psycopg://u:pw@db.example.com/prod",
            "SELFIE_LORA_QUALITY_GATE": "false"}.items():
        monkeypatch.setenv(name, value)
    (tmp_path / ".env").write_text("SELFIE_LORA_TRAINER=replicate\n")
    monkeypatch.chdir(tmp_path)
    settings = demo_settings(tmp_path / "out")
    assert settings.home == tmp_path / "out" / "home"
    assert settings.storage_url is None
    assert settings.storage_endpoint is None
    assert settings.alert_url is None
    assert settings.worker_threads == 2
    assert settings.probe_size is None
    assert settings.database_url is None
    assert settings.quality_gate is True
    assert (settings.trainer, settings.base_model, settings.local_isolation) == (
        "local", "tiny", "inline")
    assert settings.min_photos == 2


def test_a_demo_run_again_while_its_serve_runs_is_refused_and_changes_nothing(
        tmp_path: Path) -> None:
    # The README's path: demo, then the serve it prints (which holds home/.in-use shared), then
    # demo again. Deleting home/ would leave that server answering from deleted files.
    from selfie_lora.adapters.home_lock import using_home

    out = tmp_path / "demo-output"
    prepare_demo_folder(out)
    what_a_demo_leaves(out)
    with using_home(out / "home"):  # the running serve
        before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
        result = CliRunner().invoke(app, ["demo", "--out", str(out)])
        assert result.exit_code == 1, result.output  # as restore's refusal
        assert "a server or worker runs on" in result.output
        assert "stop it first" in result.output
        assert "nothing was changed" in result.output
        assert "Traceback" not in result.output
        assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before
        assert (out / "home" / "selfie-lora.db").read_bytes() == b"demo"
    prepare_demo_folder(out)  # the serve stopped: the demo replaces its folder again
    assert sorted(p.name for p in out.iterdir()) == [DEMO_MARKER]


def _fake_selfie_lora(folder: Path) -> Path:
    """An executable that prints the SELFIE_LORA_HOME it got and its arguments, one a line."""
    folder.mkdir(parents=True)
    exe = folder / "selfie-lora"
    exe.write_text('#!/bin/sh\nprintf "%s\\n" "$SELFIE_LORA_HOME" "$@"\n')
    exe.chmod(0o755)
    return exe


def test_the_serve_line_pastes_into_a_shell_with_a_space_and_an_accent_in_the_paths(
        tmp_path: Path) -> None:
    home = tmp_path / "demo out ü" / "home"
    exe = _fake_selfie_lora(tmp_path / "my bin é")
    text = io.StringIO()
    # A narrow terminal: the line must not be wrapped either.
    print_serve_command(Console(file=text, width=30), home, argv0=str(exe))
    line = text.getvalue().strip()
    assert "\n" not in line
    assert shlex.split(line) == [f"SELFIE_LORA_HOME={home}", str(exe), "serve"]
    assert subprocess.run(["bash", "-n", "-c", line], check=False).returncode == 0
    # Pasted from another folder: the executable is found and gets the home as one value.
    ran = subprocess.run(["bash", "-c", line], cwd=tmp_path, capture_output=True, text=True,
                         check=True)
    assert ran.stdout.splitlines() == [str(home), "serve"]


def test_the_serve_line_names_an_absolute_executable_even_when_run_by_a_relative_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    exe = _fake_selfie_lora(tmp_path / "venv" / "bin")
    monkeypatch.chdir(tmp_path)
    named = running_executable("venv/bin/selfie-lora")
    assert named == str(exe)
    # Run as `python -m` (argv[0] is a .py file): still an executable that exists.
    fallback = running_executable(str(tmp_path / "cli.py"))
    assert fallback == "selfie-lora" or (Path(fallback).is_absolute() and Path(fallback).is_file())


def test_the_serve_line_names_an_absolute_home_even_when_out_is_relative(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`make demo` runs the demo with --out demo-output: the line said
    SELFIE_LORA_HOME=demo-output/home, which pasted from another folder served an empty HOME."""
    monkeypatch.chdir(tmp_path)
    line = serve_command(Path("demo-output") / "home",
                         argv0=str(_fake_selfie_lora(tmp_path / "bin")))
    assert shlex.split(line)[0] == f"SELFIE_LORA_HOME={tmp_path / 'demo-output' / 'home'}"


@pytest.mark.parametrize("out", [Path("demo-output"), Path("/tmp/a demo")])
def test_where_everything_is_names_each_path_as_out_was_given(out: Path) -> None:
    # The database was printed absolute (the settings' URL, resolved) among paths relative to
    # the folder the demo ran in: `make demo`'s table mixed /abs/demo-output/home/selfie-lora.db
    # with demo-output/generated.
    rows = dict(where_everything_is(out, demo_settings(out)))
    assert rows["database"] == out / "home" / "selfie-lora.db"
    assert all(path.is_relative_to(out) for path in rows.values()), rows
    assert {path.is_absolute() for path in rows.values()} == {out.is_absolute()}
