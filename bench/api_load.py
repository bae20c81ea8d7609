"""Load benchmark of the HTTP API: a real ``selfie-lora serve`` under concurrent clients.

Starts ``selfie-lora serve`` (this checkout's code) on loopback as a subprocess, on each backend:

  embedded  the default: SQLite and a SQLite huey queue in a temporary SELFIE_LORA_HOME, the
            worker inside ``serve``;
  scale     PostgreSQL (SELFIE_LORA_TEST_POSTGRES_URL; a database of its own, dropped after) and
            Redis (SELFIE_LORA_TEST_REDIS_URL; database 12, emptied before and after) behind
            ``serve --no-worker``; a ``selfie-lora worker`` runs only while the users' models
            are trained. Skipped, with the reason, when either variable is unset.

On each it creates --users users (``selfie-lora users create NAME --json``), trains each a model
of the offline ``tiny`` FLUX on the demo photos, and then measures, in the same run:

  (a) baseline: one client, one request at a time: GET /api/model alone;
  (b) headline: --clients clients at once, each sending GET /api/model again as soon as its last
      answer came, spread over the users;
  (c) mix: the same clients on a mix of routes (--mix): model reads, progress polls, uploads of
      the demo photos (``start=false``: checked and stored, no training) and generations.

Goal (the embedded default): p99 of (b) under 200 ms at 200 clients, and no errors. The exit
status is 1 when the goal is missed (``--report-only``: always 0).

The clients speak HTTP/1.1 over asyncio streams, one keep-alive connection each: httpx's
AsyncClient costs ~1 ms of CPU a request (several with one pool of 200 connections), which on
two cores takes the CPU the server needs and measures the client instead. The trainings that give
the users their models run inside the worker (``SELFIE_LORA_LOCAL_ISOLATION=inline``: seconds,
not a child process importing torch per training); no training runs while anything is measured.

    .venv/bin/python bench/api_load.py [--users 20] [--clients 200] [--seconds 8 | --requests N]
        [--mix model=70,progress=25,upload=3,generate=2 | --only-reads] [--backend embedded]
        [--report-only]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
import zipfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO
from urllib.parse import urlsplit, urlunsplit

import httpx

ROOT = Path(__file__).resolve().parent.parent
DEMO_PHOTOS = ROOT / "src" / "selfie_lora" / "demo_photos"
POSTGRES_ENV = "SELFIE_LORA_TEST_POSTGRES_URL"
REDIS_ENV = "SELFIE_LORA_TEST_REDIS_URL"
# Tests use 2, 3 (xdist workers) and 13 (fault injection).
REDIS_DB = 12
GOAL_P99_MS = 200.0
GOAL_CLIENTS = 200
DEFAULT_MIX = "model=70,progress=25,upload=3,generate=2"
READS = ("model", "progress")
HEALTH_DEADLINE_S = 90.0
SEED_DEADLINE_S = 600.0
REQUEST_TIMEOUT_S = 120.0
# How long the one sequential client of the baseline runs.
BASELINE_S = 2.0

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Route:
    name: str
    method: str
    path: str
    ok: int


ROUTES = {
    "model": Route("model", "GET", "/api/model", 200),
    "progress": Route("progress", "GET", "/api/training/progress", 200),
    "upload": Route("upload", "POST", "/api/training/upload-zip", 202),
    "generate": Route("generate", "POST", "/api/generate", 200),
}


# --------------------------------------------------------------------------- the client


class Connection:
    """One keep-alive HTTP/1.1 connection of one client, as cheap on the CPU as a client can be:
    the request is written in one piece, the answer read by its Content-Length (or chunks)."""

    def __init__(self, port: int, key: str) -> None:
        self._port = port
        self._auth = f"authorization: Bearer {key}\r\n"
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, path: str, body: bytes = b"",
                      content_type: str | None = None) -> tuple[int, bytes]:
        if self._writer is None:
            self._reader, self._writer = await asyncio.open_connection("127.0.0.1", self._port)
        assert self._reader is not None
        head = f"{method} {path} HTTP/1.1\r\nhost: 127.0.0.1\r\n{self._auth}"
        if method != "GET":
            head += f"content-type: {content_type}\r\ncontent-length: {len(body)}\r\n"
        self._writer.write(head.encode("latin-1") + b"\r\n" + body)
        try:
            raw = await self._reader.readuntil(b"\r\n\r\n")
            lines = raw.decode("latin-1").split("\r\n")
            status = int(lines[0].split(" ", 2)[1])
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            if headers.get("transfer-encoding", "").lower() == "chunked":
                data = await self._chunks()
            else:
                data = await self._reader.readexactly(int(headers.get("content-length", "0")))
            if headers.get("connection", "").lower() == "close":
                await self.close()
            return status, data
        except BaseException:
            await self.close()  # a half-read answer leaves the connection unusable
            raise

    async def _chunks(self) -> bytes:
        assert self._reader is not None
        parts = []
        while True:
            size = int((await self._reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await self._reader.readuntil(b"\r\n")
                return b"".join(parts)
            parts.append(await self._reader.readexactly(size))
            await self._reader.readexactly(2)

    async def close(self) -> None:
        writer, self._writer, self._reader = self._writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


def photos_zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for path in sorted(DEMO_PHOTOS.glob("*.jpg")):
            zf.write(path, arcname=path.name)
    return buf.getvalue()


def multipart(zip_data: bytes) -> tuple[bytes, str]:
    """The upload's body: the zip as ``file`` and ``start=false`` (check and store, no
    training, so a measurement never waits for one)."""
    boundary = f"selfie-bench-{uuid.uuid4().hex}"
    body = (
        f"--{boundary}\r\ncontent-disposition: form-data; name=\"start\"\r\n\r\nfalse\r\n"
        f"--{boundary}\r\ncontent-disposition: form-data; name=\"file\"; "
        f"filename=\"photos.zip\"\r\ncontent-type: application/zip\r\n\r\n"
    ).encode() + zip_data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


@dataclass
class Tally:
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    # Generations refused with 429 because their user already had
    # SELFIE_LORA_MAX_GENERATIONS_PER_USER in flight: the service's answer, not a failure
    # (a closed-loop client per connection sends more at once than one person would).
    refused: int = 0
    samples: list[str] = field(default_factory=list)

    def error(self, what: str) -> None:
        self.errors += 1
        if len(self.samples) < 3:
            self.samples.append(what[:200])


@dataclass
class Phase:
    name: str
    seconds: float
    tallies: dict[str, Tally]
    server_cpu_s: float | None


class Requests:
    """What a client sends for each route."""

    def __init__(self, zip_data: bytes) -> None:
        self.upload_body, self.upload_type = multipart(zip_data)
        self._seed = 0

    def body(self, route: Route) -> tuple[bytes, str | None]:
        if route.name == "upload":
            return self.upload_body, self.upload_type
        if route.name == "generate":
            self._seed += 1
            return (json.dumps({"prompt": "a portrait in a park", "num_outputs": 1,
                                "seed": self._seed}).encode(), "application/json")
        return b"", None


async def send(conn: Connection, route: Route, requests: Requests, tally: Tally) -> float:
    body, content_type = requests.body(route)
    started = time.perf_counter()
    try:
        status, data = await asyncio.wait_for(
            conn.request(route.method, route.path, body, content_type), REQUEST_TIMEOUT_S)
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError,
            ValueError, IndexError) as exc:
        tally.error(f"{type(exc).__name__}: {exc}")
        return time.perf_counter() - started
    elapsed = time.perf_counter() - started
    if route.name == "generate" and status == 429:
        tally.refused += 1
    elif status != route.ok:
        tally.error(f"{status} {data[:160]!r}")
    else:
        tally.latencies.append(elapsed)
    return elapsed


def choose(mix: dict[str, int], rng: random.Random) -> Route:
    return ROUTES[rng.choices(list(mix), weights=list(mix.values()))[0]]


async def drive(port: int, keys: list[str], *, clients: int, mix: dict[str, int],
                seconds: float | None, total: int | None, requests: Requests,
                server_pid: int) -> tuple[dict[str, Tally], float, float | None]:
    """``clients`` closed-loop clients (client i is user i mod len(keys)) until ``seconds``
    passed or ``total`` requests were sent. Each first sends one unmeasured GET /api/model
    (it opens its connection)."""
    conns = [Connection(port, keys[i % len(keys)]) for i in range(clients)]
    warm = Tally()
    await asyncio.gather(*(send(c, ROUTES["model"], requests, warm) for c in conns))
    tallies = {name: Tally() for name in mix}
    left = [total if total is not None else -1]
    deadline = time.perf_counter() + (seconds or 0.0)

    async def client(i: int, conn: Connection) -> None:
        rng = random.Random(i)
        while True:
            if total is not None:
                if left[0] <= 0:
                    return
                left[0] -= 1
            elif time.perf_counter() >= deadline:
                return
            route = choose(mix, rng)
            await send(conn, route, requests, tallies[route.name])

    cpu_before = process_cpu(server_pid)
    started = time.perf_counter()
    await asyncio.gather(*(client(i, c) for i, c in enumerate(conns)))
    elapsed = time.perf_counter() - started
    cpu_after = process_cpu(server_pid)
    for conn in conns:
        await conn.close()
    cpu = cpu_after - cpu_before if cpu_before is not None and cpu_after is not None else None
    return tallies, elapsed, cpu


def process_cpu(pid: int) -> float | None:
    """User + system CPU seconds of process ``pid`` (not its children), or None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------- the servers


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def exe() -> str:
    beside = Path(sys.executable).parent / "selfie-lora"
    if not beside.exists():
        raise SystemExit(f"no selfie-lora beside {sys.executable}: run with the venv's python")
    return str(beside)


def base_env(home: Path, cache: Path, **extra: str) -> dict[str, str]:
    """This environment without any selfie-lora setting; this checkout's code first."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SELFIE_LORA_") and k != "REPLICATE_API_TOKEN"}
    env.update({
        "SELFIE_LORA_HOME": str(home), "SELFIE_LORA_CACHE_DIR": str(cache),
        "SELFIE_LORA_BASE_MODEL": "tiny", "SELFIE_LORA_TRAINER": "local",
        # Seconds per training instead of a child process importing torch for each; one at a
        # time: two inline trainings loading the pipeline at once fail ("device type 'meta'").
        "SELFIE_LORA_LOCAL_ISOLATION": "inline", "SELFIE_LORA_WORKER_THREADS": "1",
        # The demo photos are three.
        "SELFIE_LORA_MIN_PHOTOS": "3",
        "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT / "src"),
                                                  os.environ.get("PYTHONPATH")) if p),
    })
    env.update(extra)
    return env


@dataclass
class Process:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    log_file: IO[bytes]

    def tail(self, chars: int = 3000) -> str:
        self.log_file.flush()
        text = self.log_path.read_text(errors="replace")
        lines = [line for line in text.splitlines() if '"GET /api/' not in line]
        return "\n".join(lines)[-chars:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        self.log_file.close()


def start(name: str, args: list[str], env: dict[str, str], folder: Path) -> Process:
    log_path = folder / f"{name}.log"
    log_file = log_path.open("wb")
    proc = subprocess.Popen([exe(), *args], env=env, stdout=log_file, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)
    return Process(name=name, proc=proc, log_path=log_path, log_file=log_file)


def wait_healthy(server: Process, port: int) -> None:
    deadline = time.monotonic() + HEALTH_DEADLINE_S
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"{server.name} exited:\n{server.tail()}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2.0).status_code == 200:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{server.name}: /healthz not 200 in {HEALTH_DEADLINE_S:.0f} s\n"
                       f"{server.tail()}")


def create_user(env: dict[str, str], name: str) -> str:
    done = subprocess.run([exe(), "users", "create", name, "--json"], env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"users create {name}: {done.stdout}\n{done.stderr}")
    key: str = json.loads(done.stdout.strip().splitlines()[-1])["api_key"]
    return key


def seed_models(port: int, keys: list[str], zip_data: bytes, *, generate: bool,
                server: Process) -> None:
    """A trained model for every user (an upload each, then their trainings), and with
    ``generate`` one generation, so the generator is loaded before anything is timed."""
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=REQUEST_TIMEOUT_S) as client:
        trainings = []
        for key in keys:
            r = client.post("/api/training/upload-zip", headers={"Authorization": f"Bearer {key}"},
                            files={"file": ("photos.zip", zip_data, "application/zip")})
            if r.status_code != 202:
                raise RuntimeError(f"seeding upload: {r.status_code} {r.text[:300]}\n{server.tail()}")
            trainings.append((key, r.json()["training"]["id"]))
        deadline = time.monotonic() + SEED_DEADLINE_S
        for key, training_id in trainings:
            while True:
                r = client.get("/api/training/progress", params={"training_id": training_id},
                               headers={"Authorization": f"Bearer {key}"})
                status = r.json()["training"]["status"] if r.status_code == 200 else r.text
                if status == "succeeded":
                    break
                if status in ("failed", "canceled") or time.monotonic() > deadline:
                    raise RuntimeError(f"seeding training {training_id}: {status}\n{server.tail()}")
                time.sleep(0.2)
        if generate:
            r = client.post("/api/generate", headers={"Authorization": f"Bearer {keys[0]}"},
                            json={"prompt": "a portrait", "num_outputs": 1, "seed": 0})
            if r.status_code != 200:
                raise RuntimeError(f"warm-up generation: {r.status_code} {r.text[:300]}")


@contextlib.contextmanager
def scale_backing() -> Iterator[dict[str, str]]:
    """A PostgreSQL database and a Redis database of the bench's own, emptied after."""
    import redis
    from sqlalchemy import create_engine, text

    pg, rd = os.environ[POSTGRES_ENV], os.environ[REDIS_ENV]
    name = f"selfie_bench_{uuid.uuid4().hex[:10]}"
    admin = create_engine(pg, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    queue = urlunsplit(urlsplit(rd)._replace(path=f"/{REDIS_DB}"))
    client = redis.Redis.from_url(queue)
    client.flushdb()
    try:
        yield {"SELFIE_LORA_DATABASE_URL": urlunsplit(urlsplit(pg)._replace(path=f"/{name}")),
               "SELFIE_LORA_QUEUE_URL": queue}
    finally:
        client.flushdb()
        client.close()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


# --------------------------------------------------------------------------- one backend


@dataclass
class Result:
    backend: str
    phases: list[Phase]

    def phase(self, name: str) -> Phase | None:
        return next((p for p in self.phases if p.name == name), None)


def run_backend(backend: str, args: argparse.Namespace, mix: dict[str, int], tmp: Path,
                zip_data: bytes) -> Result:
    folder = tmp / backend
    folder.mkdir()
    with contextlib.ExitStack() as stack:
        extra = stack.enter_context(scale_backing()) if backend == "scale" else {}
        env = base_env(folder / "home", tmp / "cache", **extra)
        names = [f"user{i:03d}" for i in range(args.users)]
        t0 = time.perf_counter()
        # The first user migrates the new database; the others then only find it at head.
        keys = [create_user(env, names[0])]
        port = free_port()
        serve_args = ["serve", "--host", "127.0.0.1", "--port", str(port)]
        if backend == "scale":
            serve_args.append("--no-worker")
        if args.processes > 1:
            serve_args += ["--processes", str(args.processes)]
        server = start("serve", serve_args, env, folder)
        stack.callback(server.stop)
        worker = None
        if backend == "scale":  # only the users' first trainings need one
            worker = start("worker", ["worker", "--threads", "1"], env, folder)
            stack.callback(worker.stop)
        with ThreadPoolExecutor(2) as pool:
            keys += list(pool.map(lambda n: create_user(env, n), names[1:]))
        wait_healthy(server, port)
        seed_models(port, keys, zip_data, generate="generate" in mix, server=server)
        if worker is not None:
            worker.stop()
        print(f"[{backend}] {args.users} users with a trained model, server ready "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)

        requests = Requests(zip_data)
        # The server's CPU per request is read off its process; with several processes the
        # parent only waits, so the column is left empty (-1: no such process).
        pid = server.proc.pid if args.processes == 1 else -1
        phases = []
        tallies, elapsed, cpu = asyncio.run(drive(
            port, keys, clients=1, mix={"model": 1}, seconds=BASELINE_S, total=None,
            requests=requests, server_pid=pid))
        phases.append(Phase("baseline", elapsed, tallies, cpu))
        seconds = None if args.requests else args.seconds
        tallies, elapsed, cpu = asyncio.run(drive(
            port, keys, clients=args.clients, mix={"model": 1}, seconds=seconds,
            total=args.requests, requests=requests, server_pid=pid))
        phases.append(Phase("headline", elapsed, tallies, cpu))
        if mix and set(mix) != {"model"}:
            tallies, elapsed, cpu = asyncio.run(drive(
                port, keys, clients=args.clients, mix=mix, seconds=seconds,
                total=args.requests, requests=requests, server_pid=pid))
            phases.append(Phase("mix", elapsed, tallies, cpu))
        if server.proc.poll() is not None:
            raise RuntimeError(f"the server died during the run:\n{server.tail()}")
        return Result(backend, phases)


# --------------------------------------------------------------------------- the report


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def report(results: list[Result], args: argparse.Namespace) -> bool:
    """Prints the table and the verdicts; True when the goal is met."""
    print()
    print(f"{'backend':9} {'phase':9} {'route':31} {'clients':>7} {'requests':>8} {'req/s':>7} "
          f"{'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'errors':>6} {'server CPU/req':>14}")
    for result in results:
        for phase in result.phases:
            clients = 1 if phase.name == "baseline" else args.clients
            count = sum(len(t.latencies) + t.errors for t in phase.tallies.values())
            for name, tally in phase.tallies.items():
                route = ROUTES[name]
                n = len(tally.latencies) + tally.errors
                cpu = (f"{phase.server_cpu_s / count * 1000:10.2f} ms"
                       if phase.server_cpu_s is not None and count and len(phase.tallies) == 1
                       else "")
                print(f"{result.backend:9} {phase.name:9} {route.method + ' ' + route.path:31} "
                      f"{clients:7d} {n:8d} {n / phase.seconds:7.1f} "
                      f"{quantile(tally.latencies, 0.5) * 1000:8.1f} "
                      f"{quantile(tally.latencies, 0.99) * 1000:8.1f} "
                      f"{max(tally.latencies, default=float('nan')) * 1000:8.1f} "
                      f"{tally.errors:6d} {cpu:>14}")
                if tally.refused:
                    print(f"{'':20}{tally.refused} more refused with 429: their user already "
                          "had the most generations at once in flight")
                for sample in tally.samples:
                    print(f"{'':20}error: {sample}")
            if len(phase.tallies) > 1:
                every = [x for t in phase.tallies.values() for x in t.latencies]
                errors = sum(t.errors for t in phase.tallies.values())
                cpu = (f"{phase.server_cpu_s / count * 1000:10.2f} ms"
                       if phase.server_cpu_s is not None and count else "")
                print(f"{result.backend:9} {phase.name:9} {'all':31} {args.clients:7d} "
                      f"{count:8d} {count / phase.seconds:7.1f} {quantile(every, 0.5) * 1000:8.1f} "
                      f"{quantile(every, 0.99) * 1000:8.1f} "
                      f"{max(every, default=float('nan')) * 1000:8.1f} {errors:6d} {cpu:>14}")
    print()
    print(f"goal: p99 < {GOAL_P99_MS:.0f} ms at {GOAL_CLIENTS} concurrent GET /api/model, "
          "no errors, on the embedded default (the scale path is reported, not judged)")
    met = True
    for result in results:
        base, head = result.phase("baseline"), result.phase("headline")
        assert base is not None
        assert head is not None
        alone = quantile(base.tallies["model"].latencies, 0.5)
        tally = head.tallies["model"]
        p50, p99 = quantile(tally.latencies, 0.5), quantile(tally.latencies, 0.99)
        ok = p99 * 1000 < GOAL_P99_MS and tally.errors == 0 and bool(tally.latencies)
        verdict = ("PASS" if ok else "FAIL") if result.backend == "embedded" else (
            "meets it" if ok else "misses it")
        if result.backend == "embedded":
            met = met and ok
        print(f"{result.backend}: one request alone p50 {alone * 1000:.1f} ms; at {args.clients} "
              f"clients p50 {p50 * 1000:.0f} ms ({p50 / alone:.0f}x), p99 {p99 * 1000:.0f} ms "
              f"({p99 / alone:.0f}x), {len(tally.latencies) / head.seconds:.0f} req/s, "
              f"{tally.errors} errors: {verdict}")
    if args.clients != GOAL_CLIENTS:
        print(f"(the goal is stated for {GOAL_CLIENTS} clients; this run had {args.clients})")
    return met


def parse_mix(text: str) -> dict[str, int]:
    if text in ("", "none"):
        return {}
    mix: dict[str, int] = {}
    for part in text.split(","):
        name, _, weight = part.partition("=")
        if name.strip() not in ROUTES:
            raise argparse.ArgumentTypeError(f"unknown route {name!r}: one of {', '.join(ROUTES)}")
        mix[name.strip()] = int(weight or "1")
    return {k: v for k, v in mix.items() if v > 0}


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=20)
    parser.add_argument("--clients", type=int, default=GOAL_CLIENTS)
    amount = parser.add_mutually_exclusive_group()
    amount.add_argument("--seconds", type=float, default=8.0,
                        help="how long each concurrent phase runs")
    amount.add_argument("--requests", type=int, default=None,
                        help="requests per concurrent phase, instead of --seconds")
    parser.add_argument("--mix", type=parse_mix, default=parse_mix(DEFAULT_MIX),
                        help=f"weights of the mixed phase (default {DEFAULT_MIX}; 'none': "
                             "no mixed phase)")
    parser.add_argument("--only-reads", action="store_true",
                        help="the mixed phase only reads (model, progress): no uploads, no "
                             "generations")
    parser.add_argument("--backend", choices=("embedded", "scale", "both"), default="both")
    parser.add_argument("--processes", type=int, default=2,
                        help="serve --processes N: processes sharing the port (default 2, one a "
                             "core here; 1 measures a single process)")
    parser.add_argument("--report-only", action="store_true",
                        help="exit 0 even when the goal is missed")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    mix = {k: v for k, v in args.mix.items() if k in READS} if args.only_reads else args.mix

    backends = ["embedded", "scale"] if args.backend == "both" else [args.backend]
    if "scale" in backends and not (os.environ.get(POSTGRES_ENV) and os.environ.get(REDIS_ENV)):
        print(f"scale path skipped: it needs {POSTGRES_ENV} and {REDIS_ENV} (e.g. "
              "postgresql+psycopg://postgres@127.0.0.1:5432/test, redis://127.0.0.1:6379/0)")
        backends.remove("scale")
    print(f"cores: {os.cpu_count()}, load average: {load_average()}; {args.users} users, "
          f"{args.clients} clients, "
          f"{f'{args.requests} requests' if args.requests else f'{args.seconds:g} s'} a phase; "
          f"mix: {', '.join(f'{k}={v}' for k, v in mix.items()) or 'none'}", flush=True)
    zip_data = photos_zip()
    results = []
    with tempfile.TemporaryDirectory(prefix="selfie-bench-load-") as tmp:
        for backend in backends:
            results.append(run_backend(backend, args, mix, Path(tmp), zip_data))
    print(f"load average after: {load_average()}")
    met = report(results, args)
    return 0 if met or args.report_only else 1


if __name__ == "__main__":
    sys.exit(main())
