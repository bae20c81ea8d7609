"""Ctrl-C during ``selfie-lora train``: the training is handed back as a worker's SIGTERM hands
it back (checkpointed, queued again, its checkpoints kept), the command says how it goes on and
exits 130, without a traceback; the trainer's child process ignores the SIGINT a terminal sends
to the whole foreground group (it would fail the training and delete its checkpoints)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from selfie_lora.config import Settings
from selfie_lora.domain.entities import TrainingStatus
from selfie_lora.wiring import build_services
from tests.e2e.conftest import ignores_sigterm, make_users, outside_env
from tests.support.photos import copy_person_photos

pytestmark = pytest.mark.slow
CLI = str(Path(sys.executable).parent / "selfie-lora")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl_c", "sigterm"])
def test_ctrl_c_or_sigterm_mid_training_hands_it_back_with_its_checkpoints(
        tmp_path: Path, sig: signal.Signals) -> None:
    """SIGTERM (``timeout``, an IDE's stop button, a CI job's cancellation) goes to the command
    alone and hands the training back as Ctrl-C does, with exit status 143; a second ``train``
    is then refused, saying that the training is queued and what trains it."""
    home = tmp_path / "home"
    env = outside_env()
    env.update({"SELFIE_LORA_HOME": str(home), "SELFIE_LORA_LOCAL_ISOLATION": "process",
                "OMP_NUM_THREADS": "1", "SELFIE_LORA_MIN_PHOTOS": "3"})
    # Ann by the service that ``users create`` calls, in this process: set-up here (a command
    # process, ~1.3 s of CPU, its imports mostly; the command is run by test_cli_worker).
    make_users(env, "ann")
    photos = copy_person_photos(tmp_path / "photos")
    services = build_services(Settings(home=home), trainers={}, generators={})
    try:
        ann = services.users.get_by_name(name="ann")
        # Its own session: the SIGINT goes to the command's whole group, as a terminal's Ctrl-C.
        train = subprocess.Popen([CLI, "train", str(photos), "--user", "ann"], env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 start_new_session=True)
        err_lines: list[str] = []
        winding_down = threading.Event()

        def read_stderr() -> None:
            assert train.stderr is not None
            for line in train.stderr:
                err_lines.append(line)
                if "handed back: stopping child" in line:
                    winding_down.set()

        out_chunks: list[str] = []

        def read_stdout() -> None:
            assert train.stdout is not None
            out_chunks.append(train.stdout.read())

        readers = [threading.Thread(target=read_stderr, daemon=True),
                   threading.Thread(target=read_stdout, daemon=True)]
        for reader in readers:
            reader.start()
        try:
            deadline = time.monotonic() + 240
            # Unfrozen until the training child runs its own code (it ignores SIGTERM first
            # thing): what comes before it, the imports of the training fork server (tens of
            # seconds), cannot step, and what comes next, the model's load, takes seconds.
            child = 0
            while not child or not ignores_sigterm(child):
                assert time.monotonic() < deadline, "".join(err_lines)
                assert train.poll() is None, "".join(err_lines)
                found = re.search(r"runs in child process (\d+)", "".join(err_lines))
                child = int(found[1]) if found else 0
                time.sleep(0.005)
            step = 0
            # The tiny training's 40 steps take half a second, and the command writes each step
            # the child sends to the database some time after: a poller once found the child done
            # (which rightly keeps the finished LoRA, not a checkpoint). So everything runs in
            # short slices; between them the group is frozen (SIGSTOP) but for the command, which
            # writes what the child sent until the step it shows stops moving: the child's own.
            while time.monotonic() < deadline and train.poll() is None:
                os.killpg(train.pid, signal.SIGCONT)
                time.sleep(0.015)
                os.killpg(train.pid, signal.SIGSTOP)
                os.kill(train.pid, signal.SIGCONT)
                seen, settled = -1, 0
                while settled < 2 and time.monotonic() < deadline:
                    try:
                        t = services.training.progress(user=ann).training
                    except Exception:  # no training yet
                        t = None
                    now = t.step if t is not None else -1
                    settled = settled + 1 if now == seen else 0
                    seen = now
                    time.sleep(0.01)
                if seen >= 12:  # past the first checkpoint (every 10)
                    step = seen
                    break
            assert step >= 12, "the training did not get going"
            # The child and the intake's processes are frozen, the command runs: the SIGINT is
            # pending in the child (which ignores it) and the command takes it in. A SIGTERM is
            # sent to the command alone, as ``timeout`` and ``kill`` send it.
            if sig is signal.SIGINT:
                os.killpg(train.pid, signal.SIGINT)
            else:
                os.kill(train.pid, signal.SIGTERM)
            assert winding_down.wait(timeout=120), "".join(err_lines)
            os.killpg(train.pid, signal.SIGCONT)  # the child now finds the stop at its next step
            train.wait(timeout=120)
            for reader in readers:
                reader.join(timeout=10)
            out, err = "".join(out_chunks), "".join(err_lines)
        finally:
            # The whole group, even once the command has gone: a frozen child or intake process
            # (killed without a hand-back) would hold the pipes open for ever.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(train.pid, signal.SIGKILL)
            train.wait(timeout=60)
            for reader in readers:
                reader.join(timeout=10)
            for pipe in (train.stdout, train.stderr):
                if pipe is not None:
                    pipe.close()
        t = services.training.progress(user=ann).training
        # Old code, SIGTERM: -15, killed with no hand-back, the training left 'processing'
        # under a lease that lapsed.
        assert train.returncode == (130 if sig is signal.SIGINT else 143), out + err
        assert "Traceback" not in err
        assert "KeyboardInterrupt" not in err
        said_back = " ".join(err.split())
        assert f"training {t.id} ({t.status} at step " in said_back
        assert "kept) waits in the queue" in said_back
        assert t.status in (TrainingStatus.STARTING, TrainingStatus.PROCESSING), t
        assert t.lease_owner is None
        assert 10 <= t.step < 40, t  # stopped mid-way, not at the end
        # Any worker continues it: the command's own worker never took the message the
        # training was queued with (it runs only its own training), and the hand-back rings
        # again; a ring for a training already held or ended does nothing.
        assert services.queue.queued_training_ids() == {t.id}
        assert list((home / "blobs" / "checkpoints" / t.id).glob("step-*.ckpt")), err
        again = subprocess.run([CLI, "train", str(photos), "--user", "ann"], env=env,
                               capture_output=True, text=True, timeout=120, check=False)
        said = " ".join(again.stderr.split())
        assert again.returncode == 1, again.stdout + again.stderr
        # Queued, as a worker's hand-back leaves it: the command (not the service, whose
        # message API users see too) says that a serve or worker trains it.
        at = f" at step {t.step}/{t.total_steps}" if t.total_steps > 0 else ""
        assert (f"a training of this model is already queued or running (training {t.id}, "
                f"{t.status}{at}); training {t.id} waits in the queue: a `selfie-lora serve` "
                "or `selfie-lora worker` running on these settings trains it in its turn (if "
                "none runs, start one)") in said
        assert "nobody is running it" not in said
    finally:
        services.close()
