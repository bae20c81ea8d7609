"""The command line and the standalone worker, as separate processes on one SELFIE_LORA_HOME."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from PIL import Image

from selfie_lora.domain.entities import Training, TrainingStatus, User
from selfie_lora.domain.lease import WORKER_STALE_FOR
from selfie_lora.services.common import utcnow
from selfie_lora.wiring import Services, build_services
from tests.conftest import make_settings, one_person_analyzer
from tests.e2e.conftest import ignores_sigterm, make_users, outside_env
from tests.support.photos import copy_person_photos, synthetic_photo

pytestmark = pytest.mark.slow
CLI = str(Path(sys.executable).parent / "selfie-lora")


def env_for(home: Path) -> dict[str, str]:
    env = outside_env()
    env.update({"SELFIE_LORA_HOME": str(home), "SELFIE_LORA_LOCAL_ISOLATION": "inline",
                "OMP_NUM_THREADS": "1", "SELFIE_LORA_MIN_PHOTOS": "3"})
    return env


def run(args: list[str], env: dict[str, str], timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CLI, *args], env=env, capture_output=True, text=True, timeout=timeout,
                          check=False)


def test_train_then_retrain_then_generate_from_the_command_line(tmp_path: Path) -> None:
    env = env_for(tmp_path / "home")
    created = run(["users", "create", "ann", "--json"], env)
    assert created.returncode == 0, created.stderr
    assert json.loads(created.stdout)["user"] == "ann"
    photos = copy_person_photos(tmp_path / "photos")
    first = run(["train", str(photos), "--user", "ann"], env)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "first training" in first.stdout
    assert "version 1 is active" in first.stdout
    second = run(["train", str(photos), "--user", "ann"], env)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "retraining" in second.stdout
    assert "version 2 is active" in second.stdout
    out = tmp_path / "out"
    gen = run(["generate", "a portrait", "--user", "ann", "--out", str(out), "-n", "2",
               "--seed", "3"], env)
    assert gen.returncode == 0, gen.stdout + gen.stderr
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 2
    for png in pngs:
        with Image.open(png) as img:
            assert img.format == "PNG"
            assert img.size[0] > 0
    unknown = run(["train", str(photos), "--user", "nobody"], env)
    assert unknown.returncode == 1
    assert "no user named 'nobody'" in unknown.stderr


def _queued_training(services: Services) -> tuple[User, Training]:
    """Ann's first training, queued for a worker."""
    from selfie_lora.dataset.limits import UploadedFile

    user, _ = services.users.create(name="ann")
    dataset = services.intake.ingest_files(user=user, files=[
        UploadedFile(name=f"p{i}.jpg", data=synthetic_photo(i)) for i in range(3)])
    return user, services.training.start(user=user, dataset_id=dataset.id).training


def _interrupt(worker: subprocess.Popen[bytes]) -> None:
    """Ctrl-C, as a user stops it (killed if it has not stopped within 30 s)."""
    worker.send_signal(signal.SIGINT)
    try:
        worker.wait(timeout=30)
    except subprocess.TimeoutExpired:
        worker.kill()
        worker.wait()


def test_standalone_worker_runs_a_queued_training(tmp_path: Path) -> None:
    home = tmp_path / "home"
    settings = make_settings(tmp_path)
    assert settings.home == home
    services = build_services(settings, trainers={}, generators={},
                              face_analyzer=one_person_analyzer())
    try:
        user, training = _queued_training(services)
        assert services.queue.pending() == 1
        log = (tmp_path / "worker.log").open("w")
        worker = subprocess.Popen([CLI, "worker"], env=env_for(home), stdout=log,
                                  stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 180
            while True:
                current = services.repo.get_training(training.id)
                assert current is not None
                if current.status.is_terminal:
                    break
                assert worker.poll() is None, (tmp_path / "worker.log").read_text()[-3000:]
                assert time.monotonic() < deadline, (tmp_path / "worker.log").read_text()[-3000:]
                time.sleep(0.2)
            assert current.status is TrainingStatus.SUCCEEDED, current.error
            assert current.version_id is not None
            # Running, it is counted live by /metrics (selfie_lora_workers), whichever server.
            assert services.repo.count_workers(now=utcnow()) == {"live": 1, "stale": 0}
        finally:
            _interrupt(worker)
            log.close()
        assert worker.returncode == 0  # SIGINT stops it cleanly
        # Stopped cleanly, it is not counted, not even as a worker that died.
        assert services.repo.count_workers(now=utcnow()) == {"live": 0, "stale": 0}
        # One INFO line per change of the training's state, no DEBUG noise (huey's polling).
        text = (tmp_path / "worker.log").read_text()
        about = [line for line in text.splitlines() if training.id in line]
        for expected in ("runs attempt 1", "is processing", "version 1 stored", "succeeded"):
            assert sum(expected in line for line in about) == 1, (expected, about)
        assert len(about) <= 6, about
        assert " DEBUG " not in text
        assert re.search(r"worker \S+ stopped\n", text), text[-2000:]
        model = services.repo.get_model_for_user(user.id)
        assert model is not None
        assert model.active_version_id == current.version_id
    finally:
        services.close()


def test_a_killed_worker_counts_as_stale_and_live_again_when_it_restarts(tmp_path: Path) -> None:
    """A real worker killed with SIGKILL (no clean stop, its row left behind): counted stale once
    its lease ran out, not counted past ``WORKER_STALE_FOR``, and live again, not stale, when it
    restarts under its name. The "died" path was only tested with a hand-written row."""
    home = tmp_path / "home"
    services = build_services(make_settings(tmp_path), trainers={}, generators={},
                              face_analyzer=one_person_analyzer())  # migrates the database
    env = env_for(home)
    env.update({"SELFIE_LORA_LEASE_SECONDS": "2", "SELFIE_LORA_HEARTBEAT_SECONDS": "0.5"})

    def counted_live(worker: subprocess.Popen[bytes], log: Path) -> None:
        deadline = time.monotonic() + 120
        while services.repo.count_workers(now=utcnow()) != {"live": 1, "stale": 0}:
            assert worker.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)

    try:
        with (tmp_path / "killed.log").open("w") as log:
            killed = subprocess.Popen([CLI, "worker"], env=env, stdout=log,
                                      stderr=subprocess.STDOUT)
            try:
                counted_live(killed, tmp_path / "killed.log")
            finally:
                killed.kill()
                killed.wait()
        assert killed.returncode == -signal.SIGKILL
        time.sleep(2.5)  # past its lease
        assert services.repo.count_workers(now=utcnow()) == {"live": 0, "stale": 1}
        assert services.repo.count_workers(now=utcnow() + WORKER_STALE_FOR) == {
            "live": 0, "stale": 0}
        with (tmp_path / "restarted.log").open("w") as log:
            restarted = subprocess.Popen([CLI, "worker"], env=env, stdout=log,
                                         stderr=subprocess.STDOUT)
            try:
                counted_live(restarted, tmp_path / "restarted.log")  # its old row, renewed
            finally:
                _interrupt(restarted)
        assert restarted.returncode == 0
        assert services.repo.count_workers(now=utcnow()) == {"live": 0, "stale": 0}
    finally:
        services.close()


def test_users_keys_from_the_command_line(tmp_path: Path) -> None:
    env = env_for(tmp_path / "home")
    # Ann by the service that ``users create`` calls, in this process: set-up here (a command
    # process each, ~1.3 s of CPU, its imports mostly); the command is run by the test above.
    make_users(env, "ann")
    created = run(["users", "keys", "create", "ann", "--name", "laptop", "--json"], env)
    assert created.returncode == 0, created.stderr
    laptop = json.loads(created.stdout)
    assert laptop["name"] == "laptop"
    assert laptop["api_key"].startswith("sl_")
    listed = run(["users", "keys", "list", "ann"], env)
    assert listed.returncode == 0, listed.stderr
    assert "default" in listed.stdout
    assert "laptop" in listed.stdout
    rotated = run(["users", "keys", "rotate", "ann", laptop["id"], "--json"], env)
    assert rotated.returncode == 0, rotated.stderr
    new = json.loads(rotated.stdout)
    assert new["api_key"] != laptop["api_key"]
    revoked = run(["users", "keys", "revoke", "ann", new["id"]], env)
    assert revoked.returncode == 0, revoked.stderr
    assert "revoked" in revoked.stdout
    unknown = run(["users", "keys", "revoke", "ann", "no-such-key"], env)
    assert unknown.returncode == 1
    assert "no such API key" in unknown.stderr
    settings = make_settings(tmp_path)
    services = build_services(settings, trainers={}, generators={},
                              face_analyzer=one_person_analyzer())
    try:
        ann = services.users.get_by_name(name="ann")
        # The rotated laptop key is in its grace (a rotation's answer can be lost), then the
        # revoked new one.
        now = datetime.now(UTC)
        assert [(k.name, k.works_at(now), k.replaced_by) for k in
                services.users.keys(user=ann)] == [
            ("default", True, None), ("laptop", True, new["id"]), ("laptop", False, None)]
    finally:
        services.close()


def _alive(pid: int) -> bool:
    """Running or stopped, neither gone nor a zombie."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("State:"):
                return line.split()[1] != "Z"
    except FileNotFoundError:
        return False
    return False


def test_a_worker_stopped_as_systemd_stops_it_hands_its_training_back(tmp_path: Path) -> None:
    """systemd's stop (KillMode control-group) sends SIGTERM to every process of the unit: the
    worker and its training child. The child ignores it, and the worker hands the training
    back at its next step; the child once died of it and the training failed for good ("it may
    have run out of memory")."""
    home = tmp_path / "home"
    services = build_services(make_settings(tmp_path), trainers={}, generators={},
                              face_analyzer=one_person_analyzer())
    try:
        _user, training = _queued_training(services)
        log_path = tmp_path / "worker.log"
        log = log_path.open("w")
        env = {**env_for(home), "SELFIE_LORA_LOCAL_ISOLATION": "process"}
        # Its own session: a process group to signal as a whole, as systemd signals the unit.
        worker = subprocess.Popen([CLI, "worker"], env=env, stdout=log,
                                  stderr=subprocess.STDOUT, start_new_session=True)
        child = 0

        def logged() -> str:
            return log_path.read_text()

        try:
            deadline = time.monotonic() + 180
            # The child, once it runs its own code (its signals are set first thing), is frozen
            # before its first step: the tiny training is over in a second.
            while not child or not ignores_sigterm(child):
                assert time.monotonic() < deadline, logged()[-3000:]
                assert worker.poll() is None, logged()[-3000:]
                found = re.search(r"runs in child process (\d+)", logged())
                child = int(found[1]) if found else 0
                time.sleep(0.005)
            os.kill(child, signal.SIGSTOP)
            # The SIGTERM reaches the child first (a stopped process dies of it all the same),
            # then the worker: the order in which the old child died before its worker stopped.
            os.kill(child, signal.SIGTERM)
            time.sleep(1.0)
            assert _alive(child), logged()[-3000:]
            os.killpg(worker.pid, signal.SIGTERM)
            while "handed back: stopping child" not in logged():
                assert time.monotonic() < deadline, logged()[-3000:]
                assert worker.poll() is None, logged()[-3000:]
                time.sleep(0.05)
            # A child frozen before its first step is still loading the model: the worker kills
            # it at once (nothing to checkpoint), so it may be gone already.
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGCONT)
            worker.wait(timeout=120)
        finally:
            # Whether or not the worker exited: a child it left behind (frozen, it would stay
            # so for good, as one did for hours) is noted for the assertion below, then killed
            # with the rest of the group, its fork server included.
            left_alive = bool(child) and _alive(child)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(worker.pid, signal.SIGKILL)
            if child:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child, signal.SIGCONT)
                    os.kill(child, signal.SIGKILL)
            worker.wait(timeout=60)
            log.close()
        assert worker.returncode == 0, logged()[-3000:]
        t = services.repo.get_training(training.id)
        assert t is not None
        assert t.status in (TrainingStatus.STARTING, TrainingStatus.PROCESSING), t.error
        assert t.error is None
        assert t.lease_owner is None
        assert services.queue.pending() == 1  # any worker continues it
        assert not left_alive
    finally:
        services.close()
