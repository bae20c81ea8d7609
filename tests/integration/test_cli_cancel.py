"""``selfie-lora cancel``: the Train page's Cancel and ``POST /api/training/cancel`` from a
shell, through the same service call (``TrainingService.cancel_with_outcome``) and in its
words; exit 0 when the training is canceled or stopping, 1 when nothing was canceled."""

from __future__ import annotations

import dataclasses
from datetime import timedelta
from typing import Any

import pytest
from typer.testing import CliRunner

from selfie_lora import cli, wiring
from selfie_lora.config import Settings
from selfie_lora.dataset.limits import UploadedFile
from selfie_lora.domain.entities import Training, TrainingStatus, User
from selfie_lora.services.common import utcnow
from selfie_lora.testing.fakes import FakeGenerator, FakeTrainer
from selfie_lora.wiring import Services
from tests.conftest import one_person_analyzer
from tests.support.photos import synthetic_photo


@pytest.fixture
def ann(services: Services, settings: Settings, fake_trainer: FakeTrainer,
        monkeypatch: pytest.MonkeyPatch) -> User:
    """ann, no model yet; the CLI on the same data and fake backends (no worker runs: a
    training started stays queued)."""
    real = wiring.build_services

    def build(s: Settings, **kw: Any) -> Services:
        return real(s, **{**kw, "trainers": {"local": fake_trainer},
                          "face_analyzer": one_person_analyzer(),
                          "generators": {"local": FakeGenerator()}})

    monkeypatch.setattr(cli, "_settings", lambda: settings)
    monkeypatch.setattr(wiring, "build_services", build)
    user, _ = services.users.create(name="ann")
    return user


def queued(services: Services, user: User) -> Training:
    dataset = services.intake.ingest_files(
        user=user, files=[UploadedFile(name="a.jpg", data=synthetic_photo(1))])
    return services.training.start(user=user, dataset_id=dataset.id).training


def run(*args: str) -> tuple[int, str]:
    """The exit status and what the command said: on stdout when it canceled, else on stderr
    (a one-shot command logs no INFO line there: c7a9423)."""
    result = CliRunner().invoke(cli.app, ["cancel", *args])
    assert "Traceback" not in result.output, result.output
    said = result.stdout if result.exit_code == 0 else result.stderr
    return result.exit_code, " ".join(said.split())


def status_of(services: Services, training: Training) -> TrainingStatus:
    now = services.repo.get_training(training.id)
    assert now is not None
    return now.status


def test_cancel_ends_the_user_s_queued_training_as_the_train_page_does(
        services: Services, ann: User) -> None:
    training = queued(services, ann)
    code, said = run("--user", "ann")
    assert (code, said) == (0, f"training {training.id} of ann: Training canceled.")
    assert status_of(services, training) is TrainingStatus.CANCELED


def test_cancel_by_id_of_a_training_that_had_ended_says_so_and_exits_1(
        services: Services, ann: User) -> None:
    training = queued(services, ann)
    assert run(training.id, "--user", "ann")[0] == 0
    code, said = run(training.id, "--user", "ann")
    assert (code, said) == (1, f"training {training.id} of ann: The training had already ended "
                               "(canceled): nothing to cancel.")


def test_cancel_with_nothing_queued_or_running_cancels_nothing(
        services: Services, ann: User) -> None:
    assert run("--user", "ann") == (1, "nothing to cancel: ann has no training yet")
    training = queued(services, ann)
    assert run("--user", "ann")[0] == 0
    code, said = run("--user", "ann")
    assert (code, said) == (1, f"nothing to cancel: ann has no training queued or running (the "
                               f"latest, {training.id}, canceled)")


def test_cancel_of_a_training_a_live_worker_runs_asks_that_worker_to_stop_it(
        services: Services, ann: User) -> None:
    training = queued(services, ann)
    now = utcnow()
    services.repo.save_training(dataclasses.replace(
        training, status=TrainingStatus.PROCESSING, started_at=now, lease_owner="otherhost/w1",
        lease_expires_at=now + timedelta(minutes=5), heartbeat_at=now))
    code, said = run(training.id, "--user", "ann")
    assert (code, said) == (0, f"training {training.id} of ann: Canceling the training: it "
                               "stops within a few seconds.")
    held = services.repo.get_training(training.id)
    assert held is not None
    assert held.cancel_requested
    assert held.status is TrainingStatus.PROCESSING  # its worker ends it


def test_cancel_refuses_a_training_that_is_not_the_user_s(services: Services, ann: User) -> None:
    queued(services, ann)
    code, said = run("no-such-id", "--user", "ann")
    assert (code, said) == (1, "error: no such training")
    assert run("--user", "nobody")[0] == 1


@pytest.mark.parametrize("verbose", [False, True])
def test_a_one_shot_command_s_info_lines_are_shown_with_v_only(
        services: Services, ann: User, verbose: bool) -> None:
    # `selfie-lora cancel` printed '... INFO ...: training X: cancel requested of its worker'
    # on stderr before its own line: a service's INFO line, where the command says what it did.
    training = queued(services, ann)
    now = utcnow()
    services.repo.save_training(dataclasses.replace(
        training, status=TrainingStatus.PROCESSING, started_at=now, lease_owner="otherhost/w1",
        lease_expires_at=now + timedelta(minutes=5), heartbeat_at=now))
    result = CliRunner().invoke(cli.app, [*(["-v"] if verbose else []), "cancel", training.id,
                                          "--user", "ann"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"training {training.id} of ann: Canceling the training")
    assert ("cancel requested of its worker" in result.stderr) is verbose, result.stderr
    assert (" INFO " in result.stderr) is verbose, result.stderr


@pytest.mark.parametrize(("command", "quiet"), [("compare", False), ("versions", True)])
def test_compare_which_may_render_probes_for_minutes_logs_its_progress(
        command: str, quiet: bool) -> None:
    # `selfie-lora compare` scores the versions not scored yet (probe images rendered, a
    # pipeline loaded: minutes), and its INFO lines ('loading base pipeline ...', 'version N
    # scored') were hidden as a one-shot command's (found in review); `versions` stays quiet.
    from selfie_lora import logs

    result = CliRunner().invoke(cli.app, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert logs.logging_setup() == ("text", False, quiet)  # old code: compare quiet
