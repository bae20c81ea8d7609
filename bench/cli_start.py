"""Benchmark of the command line's start: what a ``selfie-lora`` command costs before and around
its own work, against a bare interpreter's start, in the same run.

Each command runs ``--runs`` times (interleaved, so a load that comes and goes falls on all of
them alike) in a fresh interpreter, as ``python -m selfie_lora ARGS``, on a HOME of its own made
for the run (one user, ``ann``, created first and not timed): ``python -c pass`` (the floor),
``--help``, ``users create``, ``users list``, ``model --user ann`` (ann has no model: exit 1, a
read of the database), ``check`` on a missing folder (exit 2: the photo checks built, nothing
judged) and ``gc --dry-run``. Per command: the median CPU seconds (user + system, the child's
own: what the machine pays, whatever else runs) and wall seconds, and the CPU's ratio to the bare
interpreter's. With ``--compare SRC`` (another checkout's ``src``, e.g. the commit before a
change; repeatable) every command also runs on that code, interleaved with this one's, and its figures are
printed beside them: the same machine, the same minutes.

The children read and write their ``.pyc`` files under a cache folder of the run's own
(``PYTHONPYCACHEPREFIX``, ``PYTHONDONTWRITEBYTECODE`` taken from their environment), filled by
one untimed run of every command first: an installed package's start, not one that compiles
every module of the project again (~0.4 s of CPU a command where that variable is set and the
source folder holds no ``.pyc``; ``make test`` compiles them first for the same reason).

A benchmark, not a test: it always exits 0 (a command's exit status other than the one expected
is printed, not raised).

    .venv/bin/python bench/cli_start.py [--runs 5] [--compare /path/to/other/src ...]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"

# (label, arguments after `python`, the exit status expected)
COMMANDS: list[tuple[str, list[str], int]] = [
    ("python -c pass", ["-c", "pass"], 0),
    ("--help", ["-m", "selfie_lora", "--help"], 0),
    ("users create", ["-m", "selfie_lora", "users", "create", "{name}"], 0),
    ("users list", ["-m", "selfie_lora", "users", "list"], 0),
    ("model --user ann", ["-m", "selfie_lora", "model", "--user", "ann"], 1),
    ("check (missing)", ["-m", "selfie_lora", "check", "{home}/no-such-folder"], 2),
    ("gc --dry-run", ["-m", "selfie_lora", "gc", "--dry-run"], 0),
]


def _environment(src: Path, home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SELFIE_LORA_") and k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(home.parent / "pycache")
    env["PYTHONPATH"] = str(src)
    env["SELFIE_LORA_HOME"] = str(home)
    env["OMP_NUM_THREADS"] = "1"
    return env


def _run(args: list[str], env: dict[str, str]) -> tuple[float, float, int]:
    """One run: (CPU seconds of the child, wall seconds, exit status)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, *args], env=env, capture_output=True, check=False)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return cpu, wall, done.returncode


def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--compare", type=Path, action="append", default=[],
                        help="another checkout's src folder, timed in the same run (repeatable)")
    options = parser.parse_args()
    sources = {"this": SRC}
    for n, other in enumerate(options.compare, start=1):
        sources[f"other{n}"] = other.resolve()
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load before {_load()}")
    for label, src in sources.items():
        print(f"  {label}: {src}")
    with tempfile.TemporaryDirectory(prefix="cli-start-") as folder:
        homes = {label: Path(folder) / label for label in sources}
        for label, src in sources.items():
            env = _environment(src, homes[label])
            _run(["-m", "selfie_lora", "users", "create", "ann"], env)
            for _name, args, _expected in COMMANDS:  # every module's .pyc written, untimed
                _run([a.format(home=homes[label], name="warm") for a in args], env)
        cpu: dict[tuple[str, str], list[float]] = {}
        wall: dict[tuple[str, str], list[float]] = {}
        odd: list[str] = []
        for n in range(options.runs):
            for name, args, expected in COMMANDS:
                for label, src in sources.items():
                    home = homes[label]
                    filled = [a.format(home=home, name=f"user{n}") for a in args]
                    c, w, status = _run(filled, _environment(src, home))
                    cpu.setdefault((name, label), []).append(c)
                    wall.setdefault((name, label), []).append(w)
                    if status != expected:
                        odd.append(f"{label} {name}: exit {status}, expected {expected}")
    floor = {label: statistics.median(cpu[("python -c pass", label)]) for label in sources}
    header = f"{'command':<17}" + "".join(
        f"{label + ' cpu s':>13}{'x bare':>7}{'wall s':>7}" for label in sources)
    print(header)
    for name, _args, _expected in COMMANDS:
        row = f"{name:<17}"
        for label in sources:
            c = statistics.median(cpu[(name, label)])
            w = statistics.median(wall[(name, label)])
            ratio = c / floor[label] if floor[label] > 0 else float("nan")
            row += f"{c:>13.3f}{ratio:>7.1f}{w:>7.2f}"
        print(row)
    print(f"medians of {options.runs} runs; load after {_load()}")
    for line in odd:
        print(f"unexpected: {line}")


if __name__ == "__main__":
    main()
