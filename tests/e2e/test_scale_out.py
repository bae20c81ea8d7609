"""The scale path with no shared disk: PostgreSQL, Redis, an S3 server on loopback, one
``selfie-lora serve --no-worker`` and two ``selfie-lora worker`` processes, each with its own
``SELFIE_LORA_HOME`` in a different temporary folder, as if each ran on a machine of its own.

Several users go through the whole cycle on each backend (the Replicate stand-in, and the local
tiny FLUX trained by the workers): upload, train, score, retrain, rollback, generate, download
weights. Every blob lives in the bucket; each HOME holds only that process's caches.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from selfie_lora.testing.replicate_standin import ReplicateStandIn
from tests.e2e.chaos import Proc, wait_healthy
from tests.e2e.conftest import clean_env, create_user, free_port, make_users
from tests.integration.test_operations import samples
from tests.support.photos import real_photo_zip
from tests.support.s3 import S3Server

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis]

TERMINAL = frozenset({"succeeded", "failed", "canceled"})
SECRET = "scale-out-test-secret-" + "x" * 24  # API servers of one service share it
OWNER = "scale-owner"
TRAINING_IN_MESSAGE = re.compile(r"^training ([0-9a-f-]{36})\b")


def wait_all(client: httpx.Client, pending: dict[str, tuple[dict[str, str], str]],
             procs: list[Proc], deadline_s: float) -> dict[str, dict[str, Any]]:
    """Polls every training until it ends; the last answer of each."""
    deadline = time.monotonic() + deadline_s
    ended: dict[str, dict[str, Any]] = {}
    while len(ended) < len(pending):
        for user, (headers, training_id) in pending.items():
            if user in ended:
                continue
            r = client.get("/api/training/progress", params={"training_id": training_id},
                           headers=headers)
            assert r.status_code == 200, r.text
            if r.json()["training"]["status"] in TERMINAL:
                ended[user] = r.json()
        for p in procs:
            assert p.popen is not None
            assert p.popen.poll() is None, f"{p.name} exited:\n{p.log_text()[-3000:]}"
        assert time.monotonic() < deadline, f"trainings did not end: {set(pending) - set(ended)}"
        time.sleep(0.2)
    return ended


# The local backend's run is in test_scale_out_local.py: the two are the longest of the
# end-to-end runs after the fault injection, and a file each lets pytest-xdist (--dist loadfile)
# put them on different workers.
@pytest.mark.parametrize("backend", ["replicate"])
def test_processes_that_share_no_disk_run_the_whole_cycle(
        backend: str, tmp_path: Path, postgres_database: str, redis_queue: str,
        s3_server: S3Server) -> None:
    the_whole_cycle(backend, tmp_path, postgres_database, redis_queue, s3_server)


def the_whole_cycle(backend: str, tmp_path: Path, postgres_database: str, redis_queue: str,
                    s3_server: S3Server) -> None:
    """Several users through the whole cycle on ``backend`` ("replicate" or "local"), with each
    process on a HOME of its own."""
    location = s3_server.new_location()
    names = ("ann", "bob", "cat") if backend == "replicate" else ("ann", "bob")
    with contextlib.ExitStack() as stack:
        common = {
            "SELFIE_LORA_DATABASE_URL": postgres_database,
            "SELFIE_LORA_QUEUE_URL": redis_queue,
            "SELFIE_LORA_TRAINER": backend,
            "SELFIE_LORA_SECRET_KEY": SECRET,
            "SELFIE_LORA_PROBE_COUNT": "2",
            "SELFIE_LORA_LOG_FORMAT": "json",
            **s3_server.env(location),
        }
        if backend == "replicate":
            standin = stack.enter_context(ReplicateStandIn(account=OWNER))
            standin.starting_polls = 2
            standin.processing_polls = 4
            common |= {"REPLICATE_API_TOKEN": standin.token,
                       "SELFIE_LORA_REPLICATE_BASE_URL": standin.base_url,
                       "SELFIE_LORA_REPLICATE_OWNER": OWNER,
                       "SELFIE_LORA_REPLICATE_POLL_INTERVAL": "0.2"}
        homes = {name: tmp_path / name / "home" for name in ("cli", "api", "worker0", "worker1")}

        metrics_ports = {"worker0": free_port(), "worker1": free_port()}

        def env(name: str) -> dict[str, str]:
            port = metrics_ports.get(name)
            # A cold cache: processes that share no disk keep their models in their own HOME
            # (checked at the end), not in the run's shared folder.
            return clean_env(homes[name], cold_cache=True, **common,
                             **({"SELFIE_LORA_METRICS_PORT": str(port)} if port else {}))

        # The first user by ``users create`` (on PostgreSQL and the bucket, its JSON checked),
        # the others by the same service in this process (~1.3 s of CPU a process, its imports
        # mostly): they are set-up for the cycle, not what is tested.
        users = {names[0]: create_user(env("cli"), names[0]),
                 **make_users(env("cli"), *names[1:])}
        shutil.rmtree(homes["cli"])  # what the CLI wrote is in the database, not on its disk
        port = free_port()
        api = Proc("serve", ["serve", "--no-worker", "--port", str(port)], env("api"), tmp_path)
        workers = [Proc(f"worker{i}", ["worker"], env(f"worker{i}"), tmp_path) for i in range(2)]
        procs = [api, *workers]
        try:
            for p in procs:
                p.start()
            base_url = f"http://127.0.0.1:{port}"
            wait_healthy(base_url, procs)
            for w in workers:
                w.wait_worker_started()
            with httpx.Client(base_url=base_url, timeout=120) as client:
                run_the_cycle(client, users, procs)
                check_the_operator_view(client, metrics_ports, trainings=2 * len(users))
        except BaseException:
            for p in procs:
                print(f"--- {p.name} ---\n{p.log_text()[-4000:]}")
            raise
        finally:
            for p in procs:
                if p.popen is not None and p.popen.poll() is None:
                    p.stop(signal.SIGTERM)
                elif p.log is not None:
                    # One that exited by itself (a refusal to start): its log file is closed
                    # here, or its ResourceWarning fails whichever test the collection lands in.
                    p.log.close()

    for p in procs:
        check_json_logs(p)
    # Every blob is in the bucket; no HOME holds one, nor a training's work folder.
    for name, home in homes.items():
        assert not (home / "blobs").exists(), f"{name} wrote blobs to its own disk"
        work = home / "work"
        assert not work.exists() or not any(work.iterdir()), f"{name} left {list(work.iterdir())}"
    if backend == "local":
        # The API server generated from its own cached copy of the weights, fetched from the
        # bucket; a worker that trained built its own base model, in its own HOME.
        assert list((homes["api"] / "blob-cache" / "weights").glob("*.safetensors"))
        assert any((homes[name] / "cache").is_dir() for name in ("worker0", "worker1"))
    bucket = s3_server.store(location, tmp_path / "reader")
    weights = {info.key for info in bucket.list("weights")}
    assert len(weights) >= len(names)  # retrainings may reproduce a LoRA byte for byte (replicate)
    assert {info.key.split("/")[0] for info in bucket.list("photos")} == {"photos"}


def run_the_cycle(client: httpx.Client, users: dict[str, dict[str, str]],
                  procs: list[Proc]) -> None:
    # Upload and train, every user at once.
    pending = {}
    for name, headers in users.items():
        r = client.post("/api/training/upload-zip", headers=headers,
                        files={"file": ("me.zip", real_photo_zip(), "application/zip")},
                        data={"start": "true"})
        assert r.status_code == 202, r.text
        pending[name] = (headers, r.json()["training"]["id"])
    first = wait_all(client, pending, procs, deadline_s=300)
    assert {b["training"]["status"] for b in first.values()} == {"succeeded"}, first

    # Retrain: the same model gets its second version.
    pending = {}
    for name, headers in users.items():
        r = client.post("/api/training/start", headers=headers, json={})
        assert r.status_code == 202, r.text
        pending[name] = (headers, r.json()["training"]["id"])
    second = wait_all(client, pending, procs, deadline_s=300)
    assert {b["training"]["status"] for b in second.values()} == {"succeeded"}, second

    for name, headers in users.items():
        versions = client.get("/api/model/versions", headers=headers).json()["versions"]
        assert sorted(v["number"] for v in versions) == [1, 2], (name, versions)
        for v in versions:
            assert v["quality"] is not None, f"{name} v{v['number']} was not scored"
            # The API server streams the file from the bucket; the bytes are the version's.
            answer = client.get(v["weights_url"], headers=headers)
            assert answer.status_code == 200, answer.text
            assert hashlib.sha256(answer.content).hexdigest() == v["weights_sha256"]
        # Rollback to the first version, then generate with it.
        r = client.post("/api/model/versions/1/activate", headers=headers)
        assert r.status_code == 200, r.text
        assert r.json()["active_version"]["number"] == 1
        r = client.post("/api/generate", headers=headers, json={"prompt": "a portrait",
                                                                "seed": 7})
        assert r.status_code == 200, r.text
        generation = r.json()["generation"]
        assert generation["version_id"] == next(v["id"] for v in versions if v["number"] == 1)
        image = client.get(generation["images"][0], headers=headers)
        assert image.status_code == 200
        assert image.content[:4] in (b"\x89PNG", b"\xff\xd8\xff\xe0", b"\xff\xd8\xff\xe1",
                                     b"RIFF"), image.content[:8]


def check_the_operator_view(client: httpx.Client, metrics_ports: dict[str, int], *,
                            trainings: int) -> None:
    ready = client.get("/readyz")
    assert ready.status_code == 200, ready.text
    # On PostgreSQL the clocks are checked too (SELFIE_LORA_MAX_CLOCK_SKEW_SECONDS).
    assert ready.json()["checks"] == {"database": "ok", "queue": "ok", "storage": "ok",
                                      "clock": "ok"}
    api = samples(client.get("/metrics").text)
    assert api[("selfie_lora_trainings", (("status", "succeeded"),))] == trainings
    # Each worker counts the trainings it ran; together, every training once.
    ran = 0.0
    for port in metrics_ports.values():
        found = samples(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text)
        ran += sum(v for (name, _labels), v in found.items()
                   if name == "selfie_lora_training_duration_seconds_count")
    assert ran == trainings


def check_json_logs(proc: Proc) -> None:
    """Every line is a JSON object; every line that names a training in its message carries
    that training's id."""
    about = 0
    for line in proc.log_text().splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise AssertionError(f"{proc.name} wrote a line that is not JSON: {line!r}") from None
        named = TRAINING_IN_MESSAGE.search(str(record.get("message", "")))
        if named and proc.name != "serve":
            about += 1
            assert record.get("training_id") == named.group(1), (proc.name, record)
    if proc.name != "serve":
        assert about > 0 or "runs attempt" not in proc.log_text()
