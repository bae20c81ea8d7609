"""Child processes never outlive their parent, even one killed with SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

# The service process: starts a child the way the trainer and `serve --processes` do (spawn) or
# the way the photo analysis does (forked by a fork server); each watches the pid the service
# gave it.
PARENT = r"""
import multiprocessing, os, sys, time

def child(path, watched):
    from selfie_lora.lifeline import exit_with
    exit_with(watched)
    open(path, "w").write(str(os.getpid()))
    time.sleep(600)

if __name__ == "__main__":
    method = sys.argv[2]
    context = multiprocessing.get_context(method)
    p = context.Process(target=child, args=(sys.argv[1], os.getpid()))
    p.start()
    time.sleep(600)
"""

# A child still starting (importing torch, as the trainer's does) when its service is killed:
# it reaches exit_with only once its parent is gone, and must stop then rather than watch init.
LATE_CHILD = r"""
import multiprocessing, os, sys, time

def child(path, watched):
    while not os.path.exists(path + ".parent-killed"):
        time.sleep(0.05)
    from selfie_lora.lifeline import exit_with
    exit_with(watched)
    open(path, "w").write(str(os.getpid()))
    time.sleep(600)

if __name__ == "__main__":
    context = multiprocessing.get_context("spawn")
    p = context.Process(target=child, args=(sys.argv[1], os.getpid()))
    p.start()
    print(p.pid, flush=True)
    time.sleep(600)
"""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead too; only its parent (init, here) has yet to reap it.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_a_child_exits_soon_after_its_service_is_killed(tmp_path: Path, method: str) -> None:
    script = tmp_path / "parent.py"
    script.write_text(PARENT)
    pid_file = tmp_path / "child.pid"
    parent = subprocess.Popen([sys.executable, str(script), str(pid_file), method])
    try:
        deadline = time.monotonic() + 60
        while not (pid_file.exists() and pid_file.read_text()):
            assert time.monotonic() < deadline, "the child never started"
            assert parent.poll() is None, "the parent died on its own"
            time.sleep(0.05)
        child = int(pid_file.read_text())
        assert alive(child)
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        deadline = time.monotonic() + 5
        while alive(child):
            assert time.monotonic() < deadline, f"child {child} outlived its killed parent"
            time.sleep(0.05)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()


def test_a_child_whose_service_died_while_it_started_exits(tmp_path: Path) -> None:
    script = tmp_path / "parent.py"
    script.write_text(LATE_CHILD)
    pid_file = tmp_path / "child.pid"
    with subprocess.Popen([sys.executable, str(script), str(pid_file)],
                          stdout=subprocess.PIPE, text=True) as parent:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        parent.send_signal(signal.SIGKILL)
    try:
        Path(f"{pid_file}.parent-killed").touch()  # only now does the child call exit_with
        deadline = time.monotonic() + 10
        while alive(child):
            assert time.monotonic() < deadline, f"child {child} outlived its killed parent"
            time.sleep(0.05)
        assert not pid_file.exists()  # it stopped in exit_with, before its work
    finally:
        if alive(child):
            os.kill(child, signal.SIGKILL)


def test_the_pid_to_watch_is_given_by_the_parent() -> None:
    # Read in the child, os.getppid() is init's once the parent is gone: no default for it.
    from selfie_lora.lifeline import exit_with

    with pytest.raises(TypeError):
        exit_with()  # type: ignore[call-arg]


# A training's child: its lifeline's line, logged from the watcher thread, names the training.
WITH_TRAINING = r"""
import subprocess, sys, time
from selfie_lora.lifeline import exit_with
from selfie_lora.logs import setup_logging, training_context

watched = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.5)"])
with training_context("t-lifeline"):
    exit_with(watched.pid)
    setup_logging(log_format="json")
    time.sleep(30)
"""


def test_the_lifeline_line_carries_the_training_id() -> None:
    done = subprocess.run([sys.executable, "-c", WITH_TRAINING], capture_output=True, text=True,
                          timeout=25, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert done.returncode == 1, done.stderr
    lines = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    gone = [line for line in lines if line["logger"] == "selfie_lora.lifeline"]
    assert len(gone) == 1, done.stderr
    assert gone[0]["message"].endswith("is gone; exiting")
    assert gone[0]["training_id"] == "t-lifeline"


# A service whose child was killed outright: multiprocessing's resource tracker (a process of
# its own, writing plain text on the service's stderr) warned at the service's exit about the
# semaphores the child never released ("There appear to be 5 leaked semaphore objects", after
# kill -9 of serve --processes 2's api-0, whose photo-analysis pool's queues they were).
KILLED_CHILD = r"""
import multiprocessing, os, signal, sys, time

def child(ready):
    lock = multiprocessing.get_context("spawn").Lock()  # registered with the tracker
    ready.set()
    time.sleep(600)

if __name__ == "__main__":
    if sys.argv[1] == "quiet":
        from selfie_lora.api.server import quiet_resource_tracker
        quiet_resource_tracker()
        # Only the tracker got the filter: the processes started after it keep their warnings.
        assert "PYTHONWARNINGS" not in os.environ, os.environ["PYTHONWARNINGS"]
    context = multiprocessing.get_context("spawn")
    ready = context.Event()
    p = context.Process(target=child, args=(ready,))
    p.start()
    assert ready.wait(60)
    os.kill(p.pid, signal.SIGKILL)
    p.join()
"""


@pytest.mark.parametrize("quiet", [False, True])
def test_semaphores_of_a_killed_child_leave_no_warning_on_stderr(tmp_path: Path,
                                                                 quiet: bool) -> None:
    script = tmp_path / "parent.py"
    script.write_text(KILLED_CHILD)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    done = subprocess.run([sys.executable, str(script), "quiet" if quiet else "loud"],
                          capture_output=True, text=True, timeout=60,
                          env={**env, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert done.returncode == 0, done.stderr
    # Without the filter the warning shows (the check is real); with it, nothing does.
    assert ("leaked semaphore" in done.stderr) is not quiet, done.stderr
    if quiet:
        assert done.stderr == ""
