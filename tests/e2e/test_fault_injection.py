"""Fault injection on the scale path: PostgreSQL, Redis, one ``selfie-lora serve --no-worker`` and
two ``selfie-lora worker`` processes, on the Replicate backend (the loopback stand-in), three
users training and retraining all the time while a seeded loop kills (SIGKILL or SIGTERM) the
process holding a training in each phase and restarts it (``tests/e2e/chaos.py`` says what is
checked). The embedded default (one ``selfie-lora serve``, SQLite, the local tiny FLUX) goes
through the same loop in ``test_fault_injection_embedded.py``.

Replay a failure with ``SELFIE_LORA_FAULT_SEED=<seed printed in the failure>``.
"""

from __future__ import annotations

import random
import signal
import time
from pathlib import Path

import httpx
import pytest

from selfie_lora.testing.replicate_standin import ReplicateStandIn
from tests.e2e.chaos import (
    SEED,
    Chaos,
    Cluster,
    Proc,
    check_outcome,
    collect_helpers,
    no_process_left,
    wait_healthy,
)
from tests.e2e.conftest import clean_env, free_port, make_users
from tests.support.photos import real_photo_zip

pytestmark = pytest.mark.slow


# --------------------------------------------------------------------------- the scale path


@pytest.mark.postgres
@pytest.mark.redis
def test_scale_path_survives_kills_in_every_phase(
        tmp_path: Path, postgres_database: str, redis_queue: str) -> None:
    rng = random.Random(SEED)
    owner = "fault-owner"
    with ReplicateStandIn(account=owner) as standin:
        # A Replicate training lasts ~1 s starting and ~3 s processing at this poll interval.
        standin.starting_polls = 5
        standin.processing_polls = 15
        env = clean_env(
            tmp_path / "home",
            SELFIE_LORA_DATABASE_URL=postgres_database,
            SELFIE_LORA_QUEUE_URL=redis_queue,
            SELFIE_LORA_TRAINER="replicate",
            REPLICATE_API_TOKEN=standin.token,
            SELFIE_LORA_REPLICATE_BASE_URL=standin.base_url,
            SELFIE_LORA_REPLICATE_OWNER=owner,
            SELFIE_LORA_REPLICATE_POLL_INTERVAL="0.2",
            SELFIE_LORA_PROBE_COUNT="2",
        )
        # Made by the service that `users create` calls, in this process: a command process each
        # (~2 s of CPU, its imports) for users that are the loop's set-up. The command itself on
        # PostgreSQL is run by test_scale_out.
        users = make_users(env, "ann", "bob", "cat")
        port = free_port()
        api = Proc("serve", ["serve", "--no-worker", "--port", str(port)], env, tmp_path)
        workers = [Proc(f"worker{i}", ["worker"], env, tmp_path) for i in range(2)]
        cluster = Cluster(base_url=f"http://127.0.0.1:{port}", workers=workers, others=[api])
        helpers: set[int] = set()
        try:
            api.start()
            for w in workers:
                w.start()
            wait_healthy(cluster.base_url, cluster.all())
            for w in workers:
                w.wait_worker_started()
            with httpx.Client(base_url=cluster.base_url, timeout=60) as client:
                for headers in users.values():
                    r = client.post("/api/training/upload-zip", headers=headers,
                                    files={"file": ("me.zip", real_photo_zip(),
                                                    "application/zip")},
                                    data={"start": "false"})
                    assert r.status_code == 202, r.text
                chaos = Chaos(cluster, client, users, rng)
                chaos.run(16, sigterm_share=0.3)
                collect_helpers(cluster, helpers)
                ended = chaos.wait_all_ended()
                check_outcome(chaos, ended, seed=SEED)
            # At most one Replicate training per training of ours: a create retried after a
            # kill is reconciled, never repeated.
            with standin.lock:
                remote = list(standin.trainings.values())
            assert len(remote) <= len(chaos.trainings), (len(remote), len(chaos.trainings))
        except BaseException:
            for proc in cluster.all():
                print(f"--- {proc.name} (start {proc.starts}) ---\n{proc.log_text()[-4000:]}")
            raise
        finally:
            no_process_left(cluster, helpers)


def test_a_training_whose_worker_died_is_canceled_even_with_no_worker_left(
        tmp_path: Path) -> None:
    """Cancel with its worker killed and none started again: the API server's reconciler ends it
    once the dead worker has missed a few heartbeats, and cancels it on Replicate too."""
    owner = "fault-owner"
    with ReplicateStandIn(account=owner) as standin:
        standin.processing_polls = 100_000  # it would run for hours
        env = clean_env(
            tmp_path / "home", SELFIE_LORA_TRAINER="replicate",
            REPLICATE_API_TOKEN=standin.token, SELFIE_LORA_REPLICATE_BASE_URL=standin.base_url,
            SELFIE_LORA_REPLICATE_OWNER=owner, SELFIE_LORA_REPLICATE_POLL_INTERVAL="0.2",
            # A dead holder is one silent for 3 heartbeats: 6 s at these (15 s by default, then
            # up to a 10 s reconciler round, both sat out), still far past the moment the cancel
            # below is asked, so that the reconciler, not the cancel itself, ends it.
            SELFIE_LORA_HEARTBEAT_SECONDS="2", SELFIE_LORA_RECONCILE_SECONDS="1",
        )
        ann = make_users(env, "ann")["ann"]  # set-up, as in the test above
        port = free_port()
        api = Proc("serve", ["serve", "--no-worker", "--port", str(port)], env, tmp_path)
        worker = Proc("worker", ["worker"], env, tmp_path)
        cluster = Cluster(base_url=f"http://127.0.0.1:{port}", workers=[worker], others=[api])
        try:
            api.start()
            worker.start()
            wait_healthy(cluster.base_url, cluster.all())
            worker.wait_worker_started()
            with httpx.Client(base_url=cluster.base_url, timeout=60) as client:
                r = client.post("/api/training/upload-zip", headers=ann,
                                files={"file": ("me.zip", real_photo_zip(), "application/zip")})
                assert r.status_code == 202, r.text
                tid = r.json()["training"]["id"]
                deadline = time.monotonic() + 60
                while (t := client.get("/api/training/progress", headers=ann).json()[
                        "training"])["status"] != "processing" or not t["remote_id"]:
                    assert time.monotonic() < deadline, t
                    time.sleep(0.1)
                worker.stop(signal.SIGKILL)
                r = client.post("/api/training/cancel", headers=ann, json={"training_id": tid})
                assert r.status_code == 200, r.text
                asked = time.monotonic()
                while (t := r.json()["training"])["status"] != "canceled":
                    # silent for 3 heartbeats (6 s), then a reconciler round (1 s)
                    assert time.monotonic() - asked < 45, t
                    time.sleep(0.5)
                    r = client.get("/api/training/progress", headers=ann)
                assert t["error"]
                # Ended by the reconciler (its reason logged by the API server), not by the
                # cancel's own answer: the heartbeats here leave a margin of seconds only.
                assert "its worker was gone" in api.log_text(), "not ended by the reconciler"
                assert t["version_id"] is None
                assert client.get("/api/model", headers=ann).json()["active_version"] is None
            # Canceled on Replicate right after the cancel is committed here.
            deadline = time.monotonic() + 10
            while standin.trainings[t["remote_id"]].cancel_requests == 0:
                assert time.monotonic() < deadline, "the Replicate training was not canceled"
                time.sleep(0.1)
            assert standin.trainings[t["remote_id"]].cancel_requests == 1
        except BaseException:
            for proc in cluster.all():
                print(f"--- {proc.name} ---\n{proc.log_text()[-4000:]}")
            raise
        finally:
            no_process_left(cluster, set())
