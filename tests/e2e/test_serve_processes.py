"""``selfie-lora serve --processes 2``: two processes answer on one port (the first also runs
the worker), their figures are one view whichever answers the scrape, one killed while serving
is started again, and Ctrl-C stops them all."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import (
    ServeProcess,
    clean_env,
    create_user,
    free_port,
    make_users,
    selfie_lora_exe,
    wait_training,
)
from tests.e2e.test_hostile_clients import descendants
from tests.integration.test_operations import samples
from tests.support.photos import real_photo_zip

pytestmark = pytest.mark.slow

SPAWNED = "multiprocessing.spawn"


def spawned_children(pid: int) -> set[int]:
    """The processes ``pid`` spawned itself (not their own helpers)."""
    found = set()
    for child in descendants(pid):
        try:
            stat = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if int(stat[1]) == pid and SPAWNED in cmdline:
            found.add(child)
    return found


def serve_two_processes(tmp_path: Path, *, by_command: bool = True, isolation: str = "process",
                        ) -> tuple[ServeProcess, dict[str, str]]:
    """``selfie-lora serve --processes 2`` on the local tiny model, HOME in ``tmp_path``, and a
    user's headers: a user made by ``users create`` (``by_command``), as for a new HOME, or
    in this process (``make_users``: the same database, made and migrated as the command
    makes it, without a process's ~2 s of CPU, its imports mostly). ``isolation``: how the
    local trainer runs (SELFIE_LORA_LOCAL_ISOLATION)."""
    env = clean_env(tmp_path / "home", SELFIE_LORA_TRAINER="local",
                    SELFIE_LORA_BASE_MODEL="tiny", SELFIE_LORA_PROBE_COUNT="1",
                    SELFIE_LORA_LOCAL_ISOLATION=isolation)
    ann = create_user(env, "ann") if by_command else make_users(env, "ann")["ann"]
    port = free_port()
    log_path = tmp_path / "serve.log"
    log_file = log_path.open("wb")
    proc = subprocess.Popen(
        [selfie_lora_exe(), "serve", "--processes", "2", "--host", "127.0.0.1", "--port",
         str(port)], env=env, stdout=log_file, stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL)
    return ServeProcess(proc=proc, port=port, log_path=log_path, env=env, log_file=log_file), ann


def test_two_processes_share_the_port_the_worker_and_the_figures(tmp_path: Path) -> None:
    # Inline: the training is only the figures' source here, and its own fork server's start (a
    # second import of torch, 5-7 s of CPU) is tested by the next test (SIGINT during it).
    server, ann = serve_two_processes(tmp_path, isolation="inline")
    proc = server.proc
    try:
        server.wait_healthy()
        children = spawned_children(proc.pid)
        assert len(children) == 2, server.why(f"spawned: {children}")

        with httpx.Client(base_url=server.base_url, timeout=60.0) as client:
            r = client.post("/api/training/upload-zip", headers=ann,
                            files={"file": ("me.zip", real_photo_zip(), "application/zip")})
            assert r.status_code == 202, server.why(r.text)
            done, _seen = wait_training(client, ann, r.json()["training"]["id"], server,
                                        deadline_s=240)
            assert done["training"]["status"] == "succeeded", server.why(str(done))

        # New connections: the kernel spreads them over the two processes.
        for _ in range(30):
            assert httpx.get(f"{server.base_url}/readyz", timeout=10).status_code == 200
        found = samples(httpx.get(f"{server.base_url}/metrics", timeout=10).text)
        readyz = ("selfie_lora_http_request_duration_seconds_count",
                  (("method", "GET"), ("route", "/readyz"), ("status", "200")))
        assert found[readyz] == 30  # every process's answers, whichever process was asked
        assert found[("selfie_lora_trainings", (("status", "succeeded"),))] == 1
        assert found[("selfie_lora_training_duration_seconds_count",
                      (("backend", "local"), ("status", "succeeded")))] == 1
        # Both processes answered requests: each wrote HTTP figures of its own.
        writers = {int(m.group(1)) for f in (tmp_path / "home" / "metrics").iterdir()
                   if (m := re.fullmatch(r"histogram_(\d+)\.db", f.name))}
        assert children <= writers, (children, writers)
    finally:
        code = server.stop()
    assert code == 0, server.why(f"exit code {code} after SIGINT")
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{c}").exists() for c in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(Path(f"/proc/{c}").exists() for c in children), "a process was left behind"
    assert "Traceback" not in server.log_path.read_text(errors="replace"), server.why("a stack trace")


def wait_for_line(server: ServeProcess, pattern: str, *, deadline_s: float = 90) -> re.Match[str]:
    """The first match of ``pattern`` in the server's log, once it is there."""
    deadline = time.monotonic() + deadline_s
    while (found := re.search(pattern, server.log_path.read_text(errors="replace"))) is None:
        assert server.proc.poll() is None, server.why(f"exited before logging {pattern!r}")
        assert time.monotonic() < deadline, server.why(f"no line {pattern!r}")
        time.sleep(0.1)
    return found


def test_a_process_killed_while_serving_is_started_again_with_the_worker(tmp_path: Path) -> None:
    """The OOM killer takes api-0, the process that runs the worker and the reconciler: the
    other went on answering /readyz 200 and taking uploads whose trainings stayed queued for
    good, nothing was logged, and Ctrl-C exited 0. Now api-0 is started again (logged), and a
    training uploaded afterwards runs."""
    # ann is this test's set-up only: the test before it makes its user with the command. The
    # training stays in a child process (the default): the stop lands during its start.
    server, ann = serve_two_processes(tmp_path, by_command=False)
    proc = server.proc
    try:
        serving = wait_for_line(server, r"2 API processes on \S+ \(api-0 pid (\d+), "
                                        r"api-1 pid (\d+)\)")
        first, second = int(serving.group(1)), int(serving.group(2))
        os.kill(first, signal.SIGKILL)
        wait_for_line(server, rf"API process api-0 \(pid {first}\) ended while serving \(killed "
                              r"by SIGKILL\); starting it again in 1 s")
        again = int(wait_for_line(server, r"API process api-0 \(pid (\d+)\) serves again")
                    .group(1))
        assert spawned_children(proc.pid) == {again, second}, server.why("not restarted")

        with httpx.Client(base_url=server.base_url, timeout=60.0) as client:
            r = client.post("/api/training/upload-zip", headers=ann,
                            files={"file": ("me.zip", real_photo_zip(), "application/zip")})
            assert r.status_code == 202, server.why(r.text)
            training_id = r.json()["training"]["id"]
            deadline = time.monotonic() + 60
            while True:  # the worker (back with api-0) takes it
                r = client.get("/api/training/progress", headers=ann,
                               params={"training_id": training_id})
                if r.json()["training"]["status"] != "queued":
                    break
                assert time.monotonic() < deadline, server.why("the training stayed queued")
                time.sleep(0.2)
    finally:
        code = server.stop()
    assert code == 0, server.why(f"exit code {code} after SIGINT")
    # The only test of a training's fork server under --processes (the first trains inline): a
    # Ctrl-C landing during its start is a clean stop, no stack trace.
    assert "Traceback" not in server.log_path.read_text(errors="replace"), server.why("a stack trace")


# The process runner alone, without the command's own check before it: what a process that
# ends while it starts does to the others.
RUNNER = """
import sys

from selfie_lora.api.server import run_server_processes
from selfie_lora.config import get_settings
from selfie_lora.errors import SelfieLoraError

if __name__ == "__main__":
    try:
        run_server_processes(get_settings(), host="127.0.0.1", port=int(sys.argv[1]),
                             processes=2, worker=True)
    except SelfieLoraError as exc:
        print("refused:", exc.message, flush=True)
        sys.exit(1)
"""


def test_a_process_that_ends_while_it_starts_stops_them_all(tmp_path: Path) -> None:
    """The first process refuses to start (its worker finds another deployment's storage):
    the second went on serving, /readyz said ready, and the command never ended. Now every
    process stops and the runner fails."""
    home = tmp_path / "home"
    # No upload: the second process would start photo-analysis processes for nothing.
    env = clean_env(home, SELFIE_LORA_INTAKE_WARM_UP="false")
    # The database, as the command's checks leave it: made and migrated in this process (the
    # users service's, as 'users create' builds it), not by a 'users create' process (~2 s of CPU).
    make_users(env, "ann")
    (home / "blobs").mkdir(parents=True, exist_ok=True)
    (home / "blobs" / "deployment.json").write_text('{"deployment_id": "someone-else"}')
    script = tmp_path / "runner.py"
    script.write_text(RUNNER)
    port = free_port()
    log_path = tmp_path / "runner.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen([sys.executable, str(script), str(port)], env=env,
                                stdout=log_file, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            children = spawned_children(proc.pid)
            ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=10).text
            proc.kill()
            proc.wait()
            pytest.fail(f"still serving after 60 s ({len(children)} processes; /readyz: "
                        f"{ready})")
    log = log_path.read_text(errors="replace")
    assert code == 1, log
    assert "refused: API process api-0 ended while it started (exit status 3" in log, log
    assert "belongs to deployment someone-else" in log, log  # the process's own log says why
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5)
