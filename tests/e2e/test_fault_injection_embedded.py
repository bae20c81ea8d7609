"""Fault injection on the embedded default: one ``selfie-lora serve`` (SQLite, its own worker, the
local tiny FLUX trained in a child process), three users training and retraining all the time
while a seeded loop kills (SIGKILL or SIGTERM) the server holding a training in each phase and
restarts it (``tests/e2e/chaos.py`` says what is checked). A file of its own, apart from the
scale path's (``test_fault_injection.py``): the longest end-to-end run, on its own xdist worker.

Replay a failure with ``SELFIE_LORA_FAULT_SEED=<seed printed in the failure>`` (this test uses
the seed plus one).
"""

from __future__ import annotations

import random
import signal
from pathlib import Path

import httpx
import pytest

from tests.e2e.chaos import (
    PHASES,
    SEED,
    Chaos,
    Cluster,
    Proc,
    check_outcome,
    collect_helpers,
    no_process_left,
    wait_healthy,
)
from tests.e2e.conftest import clean_env, create_user, free_port, make_users
from tests.support.photos import real_photo_zip

pytestmark = pytest.mark.slow


# --------------------------------------------------------------------------- the embedded default


def test_embedded_default_survives_kills_in_every_phase(tmp_path: Path) -> None:
    rng = random.Random(SEED + 1)
    env = clean_env(tmp_path / "home", SELFIE_LORA_PROBE_COUNT="2")
    # One user made by the command (which makes HOME, as for a new user), the other two in this
    # process: a ``users create`` process took ~2 s of CPU, for users that are the set-up here.
    users = {"ann": create_user(env, "ann"), **make_users(env, "bob", "cat")}
    port = free_port()
    server = Proc("serve", ["serve", "--port", str(port)], env, tmp_path)
    cluster = Cluster(base_url=f"http://127.0.0.1:{port}", workers=[server])
    helpers: set[int] = set()
    try:
        server.start()
        wait_healthy(cluster.base_url, cluster.all())
        server.wait_worker_started()
        with httpx.Client(base_url=cluster.base_url, timeout=60) as client:
            for headers in users.values():
                r = client.post("/api/training/upload-zip", headers=headers,
                                files={"file": ("me.zip", real_photo_zip(), "application/zip")},
                                data={"start": "false"})
                assert r.status_code == 202, r.text

            chaos = Chaos(cluster, client, users, rng)
            for i, phase in enumerate((*PHASES, "processing")):
                sig = signal.SIGTERM if i in (1, 3) else signal.SIGKILL
                collect_helpers(cluster, helpers)
                chaos.one_kill(phase, sig)
                wait_healthy(cluster.base_url, [server])
            collect_helpers(cluster, helpers)
            ended = chaos.wait_all_ended()
            check_outcome(chaos, ended, seed=SEED + 1)
    except BaseException:
        print(f"--- serve ---\n{server.log_text()[-6000:]}")
        raise
    finally:
        no_process_left(cluster, helpers)
