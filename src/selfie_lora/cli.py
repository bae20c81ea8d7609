"""The ``selfie-lora`` command line (typer + rich)."""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import sys
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from pydantic import ValidationError
from rich.table import Table

from selfie_lora.config import (
    MAX_WORKER_THREADS,
    Settings,
    file_in_the_way,
    get_settings,
    settings_errors,
)
from selfie_lora.console import (
    console,
    err_console,
    fewer_photos_hint,
    follow_training,
    literal,
    print_findings,
    print_report,
)
from selfie_lora.domain.entities import Finding, GateStatus, Training, User, Version
from selfie_lora.domain.lease import lease_is_live, wait_text
from selfie_lora.domain.likeness import (
    UNDECIDED_AGAINST,
    UNDECIDED_WORDS,
    gate_reason_now,
    unscored_words,
)
from selfie_lora.domain.plan import lora_scale_from_text, lora_scale_text
from selfie_lora.domain.recipes import CheckTarget
from selfie_lora.domain.weights import WeightsFormat
from selfie_lora.errors import (
    ConflictError,
    DatabaseLockedError,
    DatabaseRefusedError,
    ErrorCode,
    InvalidInputError,
    NoModelError,
    SelfieLoraError,
)
from selfie_lora.logs import logging_setup, setup_logging
from selfie_lora.outputs import write_whole

if TYPE_CHECKING:
    from selfie_lora.services.backup import BackupService
    from selfie_lora.services.generation import GenerationRequest, NoVersionError
    from selfie_lora.services.likeness import Comparison
    from selfie_lora.wiring import Services
    from selfie_lora.worker import Worker

logger = logging.getLogger(__name__)


def _help_when_bare(ctx: typer.Context) -> None:
    # A group run with nothing after it (`selfie-lora`, `selfie-lora users`) prints its help on
    # stdout and exits 0: typer's no_args_is_help printed it on stderr with exit status 2, a
    # usage error, so a newcomer's first try looked failed and `selfie-lora | less` paged
    # nothing. (A comment, not a docstring: a group's callback's docstring is its help.)
    if ctx.invoked_subcommand is None:
        typer.echo(ctx.get_help())
        raise typer.Exit(0)


# rich_markup_mode None: the help texts are plain text, and in typer's "rich" mode the command
# lists kept the docstrings' line breaks (entries broke mid-sentence).
app = typer.Typer(help="Personal FLUX LoRAs from selfies, retrained without losing anything.",
                  pretty_exceptions_enable=False, rich_markup_mode=None)
users_app = typer.Typer(help="Manage users and API keys.", callback=_help_when_bare,
                        invoke_without_command=True, rich_markup_mode=None)
keys_app = typer.Typer(help="A user's API keys: list, create, revoke, rotate.",
                       callback=_help_when_bare, invoke_without_command=True,
                       rich_markup_mode=None)
generations_app = typer.Typer(help="A user's generations: list, delete.",
                              callback=_help_when_bare, invoke_without_command=True,
                              rich_markup_mode=None)
app.add_typer(users_app, name="users")
users_app.add_typer(keys_app, name="keys")
app.add_typer(generations_app, name="generations")


# The commands that log their INFO lines on stderr: those that run until stopped (their log is
# what an operator reads) and those that train or load a model (the lines are their progress:
# a training's steps, a pipeline loading for minutes). Every other command is one-shot and says
# what it did in its own words: the services' INFO lines (cancel's 'training X: cancel
# requested of its worker' before its own line, a migration's) were noise there, shown with -v.
# A JSON log (SELFIE_LORA_LOG_FORMAT=json) is a collector's, which filters itself: INFO always.
LOGGING_COMMANDS = frozenset({"serve", "worker", "train", "resume", "generate", "demo",
                              # scores the versions not scored yet: probes rendered, minutes
                              "compare"})


@app.callback(invoke_without_command=True)
def _main(ctx: typer.Context, verbose: Annotated[bool, typer.Option(
        "--verbose", "-v", help="Debug-level log lines on standard error, and the import-time "
                                "notices of torch, transformers and diffusers (before the "
                                "command's name: selfie-lora -v train ...).")] = False) -> None:
    try:
        log_format = get_settings().log_format
    except ValueError:
        log_format = "text"  # the settings' own error is reported by the command that reads them
    setup_logging(log_format=log_format, verbose=verbose,
                  quiet=log_format == "text" and ctx.invoked_subcommand not in LOGGING_COMMANDS)
    _help_when_bare(ctx)


def _one_shot() -> None:
    """A command of ``LOGGING_COMMANDS`` that does not wait this time (``train --no-wait``):
    its INFO lines quiet, as a one-shot command's are."""
    configured = logging_setup()
    if configured is not None and configured[0] == "text":
        setup_logging(log_format="text", verbose=configured[1], quiet=True)


def _settings(*, code: int = 1) -> Settings:
    """The settings, or one line per invalid one on stderr and exit status ``code``: pydantic's
    own report is a long traceback, and no value (a token, a key) is ever printed."""
    try:
        return get_settings()
    except ValidationError as exc:
        _invalid_settings(exc, code=code)


def _invalid_settings(exc: ValidationError, *, code: int) -> NoReturn:
    for line in settings_errors(exc):
        err_console.print(f"[red]invalid setting:[/red] {literal(line)}", highlight=False,
                          soft_wrap=True)
    raise typer.Exit(code) from None


def _fail(message: str, *, label: str = "error", code: int = 1,
          details: Sequence[Any] = ()) -> NoReturn:
    """``label: message`` as one line on stderr (then ``details``, see ``_print_details``), and
    exit status ``code``. The message is printed as it is: a path or a name such as
    'Pictures/[me]' is text, not rich markup."""
    err_console.print(f"[red]{label}:[/red] {literal(message)}", highlight=False, soft_wrap=True)
    _print_details(details)
    raise typer.Exit(code) from None


def _database_shown(settings: Settings) -> str:
    """Which database a message is about: the variable and its URL, every secret in it masked
    (``database_url_shown``), or the SQLite file in HOME."""
    from selfie_lora.database_url import database_url_shown

    if settings.database_url is None:
        return f"{settings.effective_database_url.removeprefix('sqlite:///')} in SELFIE_LORA_HOME"
    try:
        shown = database_url_shown(settings.database_url)
    except Exception:  # the settings checked it parses; never print it raw
        return "SELFIE_LORA_DATABASE_URL"
    return f"SELFIE_LORA_DATABASE_URL {shown}"


def _data_shown(settings: Settings) -> str:
    """Where a server's data is, for its start line. On the scale path HOME holds only this
    machine's caches: naming it alone sent operators to back up the wrong folder. HOME as an
    absolute path (links kept as named): the default's 'data in .selfie-lora' did not say which
    folder's, and a command run from another one makes another HOME there."""
    home = settings.home.absolute()
    if settings.database_url is None and settings.storage_url is None:
        return f"data in {home}"
    if settings.database_url is None:
        # The SQLite file is in HOME: calling HOME 'caches' only there sent an operator to
        # back up the bucket alone.
        return (f"data in {home} (the database, and this machine's caches) and "
                f"{settings.storage_url} (files)")
    files = settings.storage_url or f"{home} (files)"
    return f"data in {_database_shown(settings)} and {files}; this machine's caches in {home}"


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C raises KeyboardInterrupt (``_terminate_as_interrupt``)."""


@contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM (what ``timeout``, a cron or systemd time limit, ``docker stop``, an IDE's stop
    button send) stops the command as Ctrl-C does: its ``except KeyboardInterrupt`` and
    ``finally`` run (a garbage collection releases its lease, a training is handed back)
    instead of the process dying on the spot. ``_interrupted_status`` says its exit status."""
    import signal

    def terminate(_signum: int, _frame: FrameType | None) -> None:
        raise _Terminated

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interrupted_status(exc: KeyboardInterrupt) -> int:
    """128 + the signal, as a shell reports a process that signal ended: 130 for Ctrl-C, 143
    for SIGTERM."""
    return 143 if isinstance(exc, _Terminated) else 130


def _reason(exc: BaseException | None) -> str:
    text = str(exc).strip() if exc is not None else ""
    return text.splitlines()[0] if text else "unknown"


@contextmanager
def _starting(settings: Settings, *, code: int = 1) -> Iterator[None]:
    """What stops a command before its work starts is one line on stderr and exit status
    ``code`` (1; ``check`` keeps 1 for its verdict), as the README promises, not a traceback.
    ``-v`` also logs the traceback."""
    try:
        yield
    except typer.Exit:
        raise
    except Exception as exc:
        message = _start_failure(settings, exc)
        if message is None:
            raise
        logger.debug("could not start", exc_info=True)
        _fail(message, code=code)


def _start_failure(settings: Settings, exc: Exception) -> str | None:
    """What ``exc`` says as a line, when it is one of what stops a start: settings that cannot
    work together (ConfigError), a database that cannot be reached or is not one, a HOME that
    cannot be written, a driver or module not installed. A database URL is never printed with
    its password."""
    import sqlite3

    from sqlalchemy.exc import ArgumentError, DBAPIError, OperationalError, SQLAlchemyError

    if isinstance(exc, SelfieLoraError):
        return exc.message
    full = _full_disk(settings, exc.orig if isinstance(exc, DBAPIError) else exc,
                      database=isinstance(exc, DBAPIError))
    if full is not None:
        return full
    if isinstance(exc, OperationalError):
        # The driver's first line says why without the URL (which may hold a password).
        # A SQLite file is not reached but opened: read-only, locked, not permitted.
        how = "used" if settings.database_url is None else "reached"
        return f"the database ({_database_shown(settings)}) cannot be {how}: {_reason(exc.orig)}"
    if isinstance(exc, DBAPIError):  # e.g. a SQLite file that is not a database
        return f"the database ({_database_shown(settings)}) cannot be used: {_reason(exc.orig)}"
    if isinstance(exc, ArgumentError):
        return "SELFIE_LORA_DATABASE_URL is not a database URL"
    if isinstance(exc, SQLAlchemyError):
        return f"the database ({_database_shown(settings)}) cannot be used: {type(exc).__name__}"
    if isinstance(exc, sqlite3.Error):  # the queue's SQLite file in HOME
        return f"the queue in SELFIE_LORA_HOME ({settings.home}) cannot be used: {_reason(exc)}"
    if isinstance(exc, OSError):  # HOME a file, on a read-only disk, not permitted
        # The raw strerror said the opposite of the problem ('File exists').
        in_the_way = file_in_the_way(settings.home)
        if in_the_way is not None:
            return (f"SELFIE_LORA_HOME ({settings.home}) cannot be used: "
                    f"{_is_a_file(in_the_way, settings.home)}; name a folder")
        why = exc.strerror or _reason(exc)
        if exc.filename is None or str(exc.filename) == str(settings.home):
            return f"SELFIE_LORA_HOME ({settings.home}) cannot be used: {why}"
        return f"cannot use {exc.filename}: {why} (SELFIE_LORA_HOME is {settings.home})"
    if isinstance(exc, ImportError):
        return f"a module this needs is not installed: {exc.name or _reason(exc)}"
    if isinstance(exc, ValueError):
        return f"cannot start: {_reason(exc)}"
    return None


def _full_disk(settings: Settings, exc: BaseException | None, *, database: bool) -> str | None:
    """The line for a start that failed because the disk of HOME (or of the SQLite database) is
    full; None otherwise. SQLite says "disk I/O error" when it cannot make its ``-wal`` and
    ``-shm`` files, which sounds like failing hardware: with that little room left, the disk's
    free space says what it is."""
    from sqlalchemy.engine import make_url

    from selfie_lora.disk_space import (
        LOW_SPACE_BYTES,
        QUOTA_ADVICE,
        free_bytes,
        full_disk_words,
        is_full_error,
        is_io_error,
        is_quota_error,
    )

    if not (is_full_error(exc) or is_io_error(exc)):
        return None
    where, named = settings.home, f"SELFIE_LORA_HOME ({settings.home})"
    move = "move SELFIE_LORA_HOME to a disk with room"
    if database and settings.database_url is not None:
        url = make_url(settings.database_url)
        if url.get_backend_name() != "sqlite" or not url.database:
            return None  # the server's disk: its own words say so, this machine's cannot
        where = Path(url.database)
        named = f"the database {url.database}"
        # Moving HOME does not move a database that SELFIE_LORA_DATABASE_URL names elsewhere.
        move = "move the database to a disk with room (SELFIE_LORA_DATABASE_URL)"
    if is_quota_error(exc):
        # statvfs (and df) do not see a quota: the disk may well have room.
        return (f"{full_disk_words(where, exc, label=named)}: {QUOTA_ADVICE}, or {move}, and "
                "run the command again")
    free = free_bytes(where)
    if free is None or (not is_full_error(exc) and free >= LOW_SPACE_BYTES):
        return None  # an I/O error with room to spare is not a full disk
    return (f"{full_disk_words(where, exc, label=named)}: free some space on it, or {move}, "
            "and run the command again")


@contextmanager
def opened(*, label: str = "error", existing: str | None = None,
           **build: Any) -> Iterator[Services]:
    """The services for one command, closed after it; what stops them being built is one line
    (``_starting``), and an error of ours in the command becomes its message on stderr (with its
    details) and exit status 1. ``existing``: a command that only reads (``gc --dry-run``,
    ``users list``) refuses a HOME with no database, in one line starting with that text and
    exit status 1, as ``backup`` does, instead of making a new, empty one there that a later
    ``serve`` from that folder would use; and it refuses a database whose schema is behind this
    release's instead of upgrading it (for good: the older release's processes would then
    refuse to start on it), as ``backup`` leaves it."""
    from selfie_lora.wiring import build_services, sharing_home

    settings = _settings()
    missing = settings.missing_database()
    # A file where HOME should be is said by ``_starting``, more precisely.
    if existing is not None and missing is not None and file_in_the_way(settings.home) is None:
        _fail(f"{existing}: {missing}")
    fresh = missing is not None
    if existing is not None:
        build["migrate"] = "require"
    with ExitStack() as hold:
        with _starting(settings):
            # HOME shared until the command ends, taken before its database is opened (made,
            # migrated): refused untouched during a restore, and no restore meanwhile, which
            # set HOME aside under the command (a user it created was in the kept HOME). One
            # that may make HOME makes it first, to lock it: unlocked until it made it, a
            # restore could take it meanwhile.
            hold.enter_context(sharing_home(settings, make=existing is None))
            services = build_services(settings, **build)
        if fresh:
            _say_new_home(settings)
        try:
            yield services
        except NoModelError as exc:
            # The service's words are the user's ("upload photos", in the web app); here an
            # operator reads them, and the command line's way to start a model is `train`.
            _fail(f"{exc.user} has no model yet: run 'selfie-lora train PATH --user "
                  f"{exc.user}' to start one", label=label)
        except SelfieLoraError as exc:
            _fail(exc.message, label=label, details=exc.details)
        finally:
            services.close()


def _say_new_home(settings: Settings) -> None:
    """A command that made the database in a new HOME says where, on stderr: run from another
    folder, 'users create' made a second, empty one there, and its key got 401 from the
    server running on the first."""
    home = settings.home.resolve()
    if settings.log_format == "json":  # stderr is a log collector's: lines of JSON only
        logger.info("new data folder %s (SELFIE_LORA_HOME)", home)
        return
    err_console.print(f"selfie-lora: made a new data folder, {literal(str(home))} "
                      "(SELFIE_LORA_HOME, default ./.selfie-lora of the current folder); "
                      "'serve' and other commands see what is in it only when run from the same "
                      "folder or with the same SELFIE_LORA_HOME", highlight=False, soft_wrap=True)


def _is_a_file(found: Path, path: Path) -> str:
    return "it is a file, not a folder" if found == path else f"{found} is a file, not a folder"


def _print_details(details: Sequence[Any]) -> None:
    """An error's details on stderr: photo findings (a rejected set's) as the table `check`
    prints, anything else a line each."""
    if details and all(isinstance(d, dict) and {"severity", "code", "message"} <= d.keys()
                       for d in details):
        findings = [Finding.from_dict(d) for d in details]
        print_findings(findings, title="Findings", out=err_console)
        hint = fewer_photos_hint(findings, min_photos=_settings().min_photos)
        if hint:
            err_console.print(hint, markup=False, highlight=False)
        return
    for detail in details:
        # A dict (the API's structured details, e.g. a rotated key's successor) as words, not
        # as Python's repr.
        shown = (", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in detail.items())
                 if isinstance(detail, dict) else str(detail))
        err_console.print(f"  - {literal(shown)}", highlight=False, soft_wrap=True)


@app.command()
def serve(
    ctx: typer.Context,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535,
                                      help="Port to listen on (0: any free one).")] = 8000,
    worker: Annotated[bool, typer.Option("--worker/--no-worker",
                                         help="Run a background worker in this process.")] = True,
    processes: Annotated[int, typer.Option(
        min=1, max=64, help="Processes sharing the port (one Python process serves on one "
                            "core); the first runs the worker. Each loads its own generator: "
                            "keep 1 with a local FLUX.1 on a GPU.")] = 1,
) -> None:
    """The web app and the HTTP API, with a background worker, in one process."""
    # Read first: an invalid setting is said before the web app's imports (~1 s of CPU).
    settings = _settings()
    from selfie_lora.api.server import listening_socket, run_server, run_server_processes

    if processes == 1:
        # Before the app starts and before the address is said: uvicorn bound it only after
        # both, so a taken port announced the other program's server, then exited 3. Before
        # the web app's imports too: a taken port is said without them (~1 s of CPU).
        try:
            sock = listening_socket(host, port)
        except OSError as exc:
            _fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}")
        # Closed when the command ends, also when the app cannot start.
        ctx.call_on_close(sock.close)
        port = sock.getsockname()[1]  # the one chosen for port 0
    with _starting(settings):
        # Inside: a module they need not installed is the start's one line, not a traceback.
        from selfie_lora.api.app import create_app
        from selfie_lora.wiring import open_database, using_home

        # Until this command ends (the processes' parent holds it for them): no restore
        # meanwhile. First: one started during a restore must not make nor migrate a database.
        ctx.with_resource(using_home(settings))
        fresh = settings.missing_database() is not None
        # Once, before the server processes start: a database that cannot be reached is one
        # line here rather than a traceback from each of them.
        open_database(settings)
        # As every other command that makes one says it (``opened``): a server started from
        # another folder than its users' was made serves an empty new one.
        if fresh:
            _say_new_home(settings)
        if processes == 1:
            application = create_app(settings, run_worker=worker, warm_up=True, reconcile=True,
                                     collect_garbage=worker)
            # Here, not only in the app's start: a storage that is another deployment's is one
            # line and exit status 1, not uvicorn's traceback and its 3. The app's start asks
            # again (for library users) and gets this answer.
            try:
                application.state.services.operations.bind_deployment()
            except BaseException:
                # The app never starts, so its end never closes the services it built. An error
                # of that close must not replace the refusal's one line with a traceback (as in
                # run_worker's refusals); the process exits and lets go of them anyway.
                with suppress(Exception):
                    application.state.services.close()
                raise
        else:
            # Before any process starts: only the first would run the app's start that binds,
            # and the others would serve another deployment's storage, ready.
            _bind_deployment(settings)
    if processes > 1:
        # The address is logged once they serve (port 0: the one chosen for them all).
        logger.info("starting %d API processes on %s; %s", processes,
                    f"{host}:{port}" if port else f"{host}, any free port", _data_shown(settings))
        try:
            run_server_processes(settings, host=host, port=port, processes=processes,
                                 worker=worker)
        except SelfieLoraError as exc:  # a process could not start, or crash-looped: all stopped
            _fail(exc.message)
        return
    shown = f"[{host}]" if ":" in host else host
    if settings.log_format == "json":  # a log collector reads this output: lines of JSON only
        logger.info("serving on http://%s:%d/ (API docs at /docs); %s", shown, port,
                    _data_shown(settings))
    else:
        console.print(f"selfie-lora: open [bold]http://{shown}:{port}/[/bold] in a browser "
                      f"(API docs at /docs); {literal(_data_shown(settings))}")
    run_server(application, settings, sock=sock)


def _bind_deployment(settings: Settings) -> None:
    """Binds the storage to the database, or refuses (``services.deployment``), with services
    built for that alone."""
    from selfie_lora.wiring import build_services

    # The queue too: the server processes use it (their app opens it), and a queue they cannot
    # use is one line here, not a refusal from each of them.
    services = build_services(settings, trainers={}, generators={}, open_queue=True)
    try:
        services.operations.bind_deployment()
    finally:
        services.close()


@app.command("worker")
def worker_cmd(
    ctx: typer.Context,
    threads: Annotated[int | None, typer.Option(
        min=1, max=MAX_WORKER_THREADS,
        help="Trainings run at once (default: SELFIE_LORA_WORKER_THREADS).")] = None,
) -> None:
    """A queue worker only (the scale path)."""
    settings = _settings()  # before the imports, as in ``serve``
    from selfie_lora.wiring import build_services, using_home
    from selfie_lora.worker import run_worker

    with _starting(settings):
        # Until this command ends: no restore meanwhile. Before the database is opened (and
        # migrated): one started during a restore is refused without touching it.
        ctx.with_resource(using_home(settings))
        fresh = settings.missing_database() is not None
        # The queue built now: one it cannot use stops it here, in one line (_start_failure),
        # not a worker that runs on and takes nothing.
        services = build_services(settings, open_queue=True)
    if fresh:
        _say_new_home(settings)
    try:
        run_worker(services, threads=threads)
    # It could not start: the metrics port is taken, or the store is another deployment's.
    except SelfieLoraError as exc:
        _fail(exc.message)


@users_app.command("create")
def users_create(
    name: Annotated[str, typer.Argument(metavar="NAME", help="The user's name.")],
    password: Annotated[bool, typer.Option(
        "--password", help="Also set a password for the web app: asked twice, or read as two "
                           "lines from standard input when it is not a terminal.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON on stdout.")] = False,
) -> None:
    """Create a user and print its API key (shown once)."""
    secret = _read_new_password(command="--password") if password else None
    with opened(trainers={}, generators={}) as services:
        user, key = services.users.create(name=name, password=secret)
    if as_json:
        sys.stdout.write(json.dumps({"user": user.name, "api_key": key,
                                     "password_set": secret is not None}) + "\n")
    else:
        console.print(f"created user [bold]{literal(user.name)}[/bold]")
        console.print(f"API key (shown once, keep it safe): [bold]{key}[/bold]")
        if secret is not None:
            console.print("password set: sign in at the address `selfie-lora serve` prints")


@users_app.command("password")
def users_password(name: Annotated[str, typer.Argument(metavar="NAME", help="The user's name.")]) -> None:
    """Set or change a user's password for the web app (their browser sessions end)."""
    with opened(trainers={}, generators={}) as services:
        # The account first: a name that is none was said only after the password was typed
        # twice.
        user = services.users.get_by_name(name=name)
        services.users.check_password_settable(user=user)
        secret = _read_new_password(command="users password")
        services.users.set_password(user=user, password=secret)
    # The account's own name: 'ALICE' finds alice, and it is alice's password that was set.
    console.print(f"password of [bold]{literal(user.name)}[/bold] set; their browser sessions "
                  "have ended")


def _ask(text: str, *, nothing: str, **prompt: Any) -> str:
    """``typer.prompt``, with Ctrl-C said as everywhere else in the command line: one line
    ("interrupted: nothing was <nothing>") and exit status 130, where click printed "Aborted!"
    and exited 1, the status of a refusal. Ctrl-D (no answer) stays exit status 1."""
    try:
        return str(typer.prompt(text, **prompt))
    except typer.Abort as exc:
        interrupted = isinstance(exc.__context__, KeyboardInterrupt)
        err_console.print(f"\n{'interrupted' if interrupted else 'no answer'}: nothing was "
                          f"{nothing}", markup=False, highlight=False)
        raise typer.Exit(130 if interrupted else 1) from None


def _read_new_password(*, command: str) -> str:
    """A new password, typed twice (hidden) at a terminal, or two lines of standard input;
    ``command`` (the option or command that asked for it) names it in the error."""
    if sys.stdin.isatty():
        first = _ask("password", nothing="changed", hide_input=True)
        second = _ask("the same password again", nothing="changed", hide_input=True)
    else:
        lines = sys.stdin.read().splitlines()
        if len(lines) < 2:
            err_console.print(f"error: {command} reads the new password twice: two lines on "
                              "standard input (or run it at a terminal, which asks twice)",
                              highlight=False, soft_wrap=True)
            raise typer.Exit(1)
        first, second = lines[0], lines[1]
    if first != second:
        err_console.print("error: the two passwords differ; nothing was changed")
        raise typer.Exit(1)
    return str(first)


# The id that 'users keys list' shows whole (its prefix is not enough).
KEY_ID_HELP = "The key's id, as 'users keys list' shows it."


@keys_app.command("list")
def keys_list(
    user: Annotated[str, typer.Argument(metavar="NAME", help="The user's name.")],
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print JSON on stdout: what GET /api/keys answers.")] = False,
) -> None:
    """The user's API keys (their prefixes; secrets are never shown again)."""
    from selfie_lora.api.serializers import api_key_json
    from selfie_lora.services.common import utcnow

    with opened(existing="no keys to list", trainers={}, generators={}) as services:
        owner = services.users.get_by_name(name=user)
        keys = services.users.keys(user=owner)
    now = utcnow()
    if as_json:
        sys.stdout.write(json.dumps({"keys": [api_key_json(k, now=now) for k in keys]}) + "\n")
        return
    table = Table(title=literal(f"API keys of {owner.name}"))
    # The id whole, whatever the terminal's width: revoke and rotate take nothing less, and a
    # cut one ('679bdd9f-d184-4e2…') was 'no such API key'. Three columns, not five: beside a
    # whole id, five squeezed the times to '2026-12' '-06' '16:51' at 80 columns (a pipe's
    # width). A time is never cut inside (min_width: one line of 'YYYY-MM-DD HH:MM').
    table.add_column("id", no_wrap=True, min_width=max((len(k.id) for k in keys), default=2))
    table.add_column("name, prefix", overflow="fold", min_width=13)
    table.add_column("created, revoked (UTC)", min_width=len("2026-12-06 16:51"))
    for key in keys:
        if key.in_grace_at(now) and key.revoked_at:
            revoked = f"rotated: works until {_minute(key.revoked_at)}"
        else:
            revoked = f"revoked {_minute(key.revoked_at)}" if key.revoked_at else ""
        table.add_row(key.id, f"{literal(key.name)}\n{key.prefix}...",
                      "\n".join(filter(None, (_minute(key.created_at), revoked))))
    console.print(table)


def _minute(at: datetime) -> str:
    """A time as the lists show it, to the minute in UTC: short, and it wraps at its space."""
    return at.astimezone(UTC).strftime("%Y-%m-%d %H:%M")


def _print_key(key: object, secret: str, *, as_json: bool) -> None:
    from selfie_lora.domain.entities import ApiKey

    assert isinstance(key, ApiKey)
    if as_json:
        sys.stdout.write(json.dumps({"id": key.id, "name": key.name, "api_key": secret}) + "\n")
    else:
        console.print(f"API key {key.id} ({literal(key.name)}); shown once, keep it safe: "
                      f"[bold]{secret}[/bold]")


@keys_app.command("create")
def keys_create(
    user: Annotated[str, typer.Argument(metavar="NAME", help="The user's name.")],
    name: Annotated[str, typer.Option("--name", help="What the key is for.")] = "api",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON on stdout.")] = False,
) -> None:
    """A new API key for the user (shown once)."""
    with opened(trainers={}, generators={}) as services:
        key, secret = services.users.create_key(user=services.users.get_by_name(name=user),
                                                name=name)
    _print_key(key, secret, as_json=as_json)


@keys_app.command("revoke")
def keys_revoke(
    user: Annotated[str, typer.Argument(metavar="NAME", help="The user's name.")],
    key_id: Annotated[str, typer.Argument(metavar="KEY_ID", help=KEY_ID_HELP)],
) -> None:
    """Revoke one of the user's API keys: it stops working within a second."""
    with opened(trainers={}, generators={}) as services:
        key = services.users.revoke_key(user=services.users.get_by_name(name=user),
                                        key_id=key_id)
    console.print(f"API key {key.id} ({key.prefix}...) is revoked")


@keys_app.command("rotate")
def keys_rotate(
    user: Annotated[str, typer.Argument(metavar="NAME", help="The user's name.")],
    key_id: Annotated[str, typer.Argument(metavar="KEY_ID", help=KEY_ID_HELP)],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON on stdout.")] = False,
) -> None:
    """Replace one of the user's API keys: a new one with its name; the old one works for
    SELFIE_LORA_KEY_ROTATION_GRACE_MINUTES more (revoke it to stop it within a second). A key rotated
    already is refused: only its holder asks again, through the API, with the key itself."""
    with opened(trainers={}, generators={}) as services:
        key, secret = services.users.rotate_key(user=services.users.get_by_name(name=user),
                                                key_id=key_id)
    _print_key(key, secret, as_json=as_json)


@app.command("gc")
def gc_cmd(
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Only say what would be deleted; delete nothing.")] = False,
    listed: Annotated[bool, typer.Option(
        "--list", help="List every row and key.")] = False,
    # Its name before --list: hidden, and still taken, so a script's `gc -v` lists as it did.
    # -v is the global flag (debug log lines) before any command's name: `selfie-lora -v gc`
    # and `gc -v` meant two things.
    old_list: Annotated[bool, typer.Option(
        "--verbose", "-v", hidden=True, help="The same as --list.")] = False,
    force: Annotated[bool, typer.Option(
        "--force", help="Collect from a storage no server or worker has bound to a database "
                        "yet although this database names no upload and no version.")] = False,
) -> None:
    """Delete what nothing refers to any more: photos never trained on (after
    SELFIE_LORA_GC_DATASET_DAYS), generations past SELFIE_LORA_GC_GENERATION_DAYS, work folders
    of ended trainings, orphaned blobs. Never a version's weights, nor the photos of a dataset
    any training used."""
    with opened(label="gc", existing="nothing to collect" if dry_run else None,
                trainers={}, generators={}) as services:
        try:
            with _terminate_as_interrupt():
                # The collection first: it refuses a storage bound to another database (or
                # none, or a lease held elsewhere) before it deletes anything. Only then the
                # account deletions whose process died (a server killed while deleting one
                # through the API): they check the marker themselves, but not the collection's
                # other refusals, and a refused gc must finish no deletion.
                summary = services.gc.collect(dry_run=dry_run, force=force)
                finished = [] if dry_run else services.erasure.finish_pending()
            # Those not finished (not yet due, or refused: a training that does not stop):
            # else gc says nothing of them until they are due again.
            pending = [
                f"deletion of user {name} pending: finished by the check of a worker, serve or "
                f"gc from {when:%Y-%m-%d %H:%M} UTC, or now by `selfie-lora users delete "
                f"{name} --yes --force`" for name, when in services.erasure.pending()]
        except KeyboardInterrupt as exc:
            # The collection's own ``finally`` has released its lease, and ``finish_pending``
            # its claim of a deletion: the next one can start at once, and goes on with them.
            err_console.print("interrupted: what was deleted stays deleted; run gc again to "
                              "go on", highlight=False)
            raise typer.Exit(_interrupted_status(exc)) from None
    for line in [*(line for erased in finished for line in erased.lines()), *pending,
                 *summary.lines(verbose=listed or old_list)]:
        console.print(line, markup=False, highlight=False, soft_wrap=True)


@app.command()
def check(
    path: Annotated[Path, typer.Argument(
        metavar="PATH", help="A folder of photos, or a zip of them.", show_default=False)],
    target: Annotated[CheckTarget | None, typer.Option(
        "--for", help="The training to judge the photos for (its resolution): by default the "
                      "one a new model would get.")] = None,
) -> None:
    """Report on a folder or zip of photos; exit 0 when trainable, 1 when not, 2 when it could
    not judge them (no such path, an unreadable file, invalid settings). Needs no database."""
    from selfie_lora.errors import ErrorCode
    from selfie_lora.wiring import build_photo_checks

    # Scripts branch on 1 ('not trainable'): nothing else may end with it, not even a crash.
    settings = _settings(code=2)
    with _starting(settings, code=2):
        checks = build_photo_checks(settings)
    try:
        report = checks.check_path(path, target=target)
    except SelfieLoraError as exc:
        if not isinstance(exc, InvalidInputError) or exc.code == ErrorCode.NO_SUCH_PATH:
            _fail(exc.message, code=2)
        # The upload as a whole is refused (too large, not a zip, an archive inside): it is not
        # trainable, as `train` and the API would say.
        _fail(exc.message, label="not trainable", details=exc.details)
    except OSError as exc:  # a folder or file that cannot be read
        _fail(f"cannot read {exc.filename or path}: {exc.strerror or _reason(exc)}", code=2)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    except Exception:
        logger.exception("the check of %s could not run", path)
        raise typer.Exit(2) from None
    print_report(report, title=f"Findings for {path}", min_photos=settings.min_photos)
    raise typer.Exit(0 if report.trainable else 1)


# What --no-wait leaves to others: said in --help too, not only once the training is queued.
WAIT_HELP = ("Train it here and wait for the end (--no-wait: queue it and return; a "
             "`selfie-lora serve` or `selfie-lora worker` running on these settings trains it).")


def _hold_home(ctx: typer.Context) -> None:
    """``train`` and ``resume`` run a worker here (for hours, with a local training): they hold
    HOME as ``worker`` does, until the command ends, so no restore replaces it meanwhile."""
    from selfie_lora.wiring import using_home

    settings = _settings()
    with _starting(settings):
        ctx.with_resource(using_home(settings))


@app.command()
def train(
    ctx: typer.Context,
    path: Annotated[Path, typer.Argument(
        metavar="PATH", help="A folder of photos, or a zip of them.", show_default=False)],
    user: Annotated[str, typer.Option("--user", help="The user's name.")],
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help=WAIT_HELP)] = True,
) -> None:
    """Upload a folder or zip of photos and (re)train the user's model."""
    if wait:
        _hold_home(ctx)
    else:
        _one_shot()
    # The queue built at the start, as serve's and worker's is: one it cannot use (a queue.db
    # that is not SQLite's, a Redis URL option redis-py refuses, the redis extra not installed)
    # is one line and exit status 1 before a photo is stored or a training made. Built at its
    # first use, it let the photos and a queued training be stored with a warning only, which
    # no serve or worker on these settings could ever take (each refuses that queue at its
    # start). A Redis that is down is still a start (building connects to nothing): accepted as
    # the API's start is, the reconciler queueing it once Redis answers (and --wait runs it).
    with _terminate_as_interrupt(), opened(open_queue=True) as services:
        owner = services.users.get_by_name(name=user)
        # Before the photos go into the storage and a training is queued: not into another
        # deployment's storage (the training's own worker would refuse only after both).
        services.operations.bind_deployment()
        try:
            t = services.training.upload_path(user=owner, path=path).training
        except ConflictError as exc:
            raise _said_what_queued_waits_for(services, owner=owner, refused=exc) from None
        except KeyboardInterrupt as exc:
            err_console.print("interrupted while uploading the photos: no training was "
                              "started here; run the command again", highlight=False)
            raise typer.Exit(_interrupted_status(exc)) from None
        assert t is not None
        kind = "retraining" if t.is_retraining else "first training"
        console.print(f"{kind} {t.id}: trigger word [bold]{t.trigger_word}[/bold], destination "
                      f"{t.destination}, trainer {t.trainer_version}")
        if wait:
            _follow(services, owner=owner, user=user, training_id=t.id)
        else:
            _queued_hint()


# True whether or not a serve or worker runs: "it trains once one runs" sent a user whose
# worker already ran to start another. This command cannot see workers on other machines (the
# scale path), and HOME's lock is also held by a `train` that runs only its own training.
def _left_to_a_process(does: str) -> str:
    """Who ``does`` (trains, scores) a training no process of this command holds: one sentence
    for the queued training and the version left to score, which ``compare`` says too."""
    return (f"a `selfie-lora serve` or `selfie-lora worker` running on these settings {does} it "
            "in its turn (if none runs, start one)")


QUEUED_WAITS_FOR = _left_to_a_process("trains")


def _queued_hint() -> None:
    """After ``--no-wait``: this command runs nothing, and a HOME where no server or worker runs
    would keep the training queued for ever, with nothing said."""
    console.print(f"queued: {QUEUED_WAITS_FOR}; follow it on the Train page or with GET "
                  "/api/training/progress", markup=False, highlight=False)


def _said_what_queued_waits_for(services: Services, *, owner: Any,
                                refused: ConflictError) -> ConflictError:
    """A ``train`` or ``resume`` refused because a training of the model is queued (one this
    command's Ctrl-C or SIGTERM handed back, or a ``--no-wait``'s), or a ``resume`` of it: it
    waits for a serve or worker, which someone who uses only the command line may not run. The
    service cannot say so (its message is the API's and the web's too, where workers run), so
    the command adds it, as ``--no-wait`` does."""
    from selfie_lora.services.common import utcnow

    # Busy, or (``resume`` of the latest training) not canceled but queued.
    if refused.code not in (ErrorCode.TRAINING_IN_PROGRESS, ErrorCode.NOT_RESUMABLE):
        return refused
    try:
        latest = services.training.progress(user=owner).training
    except SelfieLoraError:
        return refused
    if not latest.status.is_active or lease_is_live(latest, utcnow()):
        return refused  # a live process holds it: it is running
    if latest.lease_owner is None:
        # Queued, or handed back (its lease released): waiting for a worker's turn. One whose
        # version is stored has only its scoring left, as the hand-back said ("scores it").
        waits_for = _left_to_a_process("scores") if latest.is_scoring else QUEUED_WAITS_FOR
        return ConflictError(f"{refused.message}; training {latest.id} waits in the queue: "
                             f"{waits_for}", details=refused.details)
    # Its holder's lease lapsed: a process that stepped away (its message queued again) or
    # one that is gone (a serve's or worker's reconciler queues it again); either way a
    # serve or worker continues it.
    return ConflictError(f"{refused.message}; training {latest.id} is held by no running "
                         f"process: a `selfie-lora serve` or `selfie-lora worker` running on "
                         f"these settings continues it (if none runs, start one)",
                         details=refused.details)


@app.command()
def resume(
    ctx: typer.Context,
    user: Annotated[str, typer.Option("--user", help="The user's name.")],
    training_id: Annotated[str | None, typer.Argument(
        metavar="TRAINING_ID", help="The canceled training (default: the user's latest training).")] = None,
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help=WAIT_HELP)] = True,
) -> None:
    """Continue a canceled local training from its last checkpoint (as a new training)."""
    if wait:
        _hold_home(ctx)
    else:
        _one_shot()
    # The queue built at the start, as train's (an unusable one stops it before anything).
    with _terminate_as_interrupt(), opened(open_queue=True) as services:
        owner = services.users.get_by_name(name=user)
        services.operations.bind_deployment()  # as train: before a training is queued
        if training_id is None:
            training_id = services.training.progress(user=owner).training.id
        try:
            t = services.training.resume(user=owner, training_id=training_id).training
        except ConflictError as exc:
            raise _said_what_queued_waits_for(services, owner=owner, refused=exc) from None
        console.print(f"training {t.id} resumes {training_id} at step {t.step}/{t.total_steps}: "
                      f"trigger word [bold]{t.trigger_word}[/bold], trainer {t.trainer_version}")
        if wait:
            _follow(services, owner=owner, user=user, training_id=t.id)
        else:
            _queued_hint()


@app.command()
def cancel(
    user: Annotated[str, typer.Option("--user", help="The user's name.")],
    training_id: Annotated[str | None, typer.Argument(
        metavar="TRAINING_ID", help="The training to cancel (default: the user's queued or running one).",
        show_default=False)] = None,
) -> None:
    """Cancel a queued or running training, as the Train page's Cancel and POST
    /api/training/cancel do: the active version is unchanged. Exit 0 when it is canceled (or
    its worker was asked to stop it), 1 when nothing was canceled."""
    from selfie_lora.errors import NotFoundError

    # The deployment's trainers: a Replicate run of a training nobody holds is canceled now,
    # as the API's cancel does, not left owed to a worker.
    with opened(trainers=None, generators={}) as services:
        owner = services.users.get_by_name(name=user)
        try:
            outcome = services.training.cancel_with_outcome(user=owner, training_id=training_id)
        except (NoModelError, NotFoundError):
            if training_id is not None:
                raise  # no such training: the service's words, as the API's 404
            _fail(f"{owner.name} has no training yet", label="nothing to cancel")
    t = outcome.training
    if outcome.already_ended and training_id is None:
        # The user named none: "the training had already ended" would speak of one they did
        # not ask about.
        _fail(f"{owner.name} has no training queued or running (the latest, {t.id}, "
              f"{t.status})", label="nothing to cancel")
    # The service's sentence, as the Train page and the API's answer say it.
    line = f"training {t.id} of {owner.name}: {outcome.message}"
    if outcome.already_ended:
        err_console.print(line, markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(1)
    console.print(line, markup=False, highlight=False, soft_wrap=True)


def _follow(services: Services, *, owner: Any, user: str, training_id: str) -> None:
    """Run the training here until it ends and say how it ended (exit 1 unless it succeeded)."""
    from selfie_lora.worker import start_embedded

    # Its own training only: other users' queued trainings wait for a serve or worker, not
    # for this command (which would otherwise take N trainings' time and hand theirs back).
    worker = start_embedded(services, threads=1, only=training_id)
    try:
        final = follow_training(
            lambda: services.training.progress(user=owner, training_id=training_id).training)
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (``_terminate_as_interrupt``)
        _hand_back_on_interrupt(services, worker, owner=owner, training_id=training_id)
        raise typer.Exit(_interrupted_status(exc)) from None
    finally:
        worker.stop()  # a second call (after the hand-back) does nothing
    if final.status != "succeeded":
        err_console.print(f"[red]training {final.status}:[/red] {literal(final.error or '')}",
                          highlight=False, soft_wrap=True)
        raise typer.Exit(1)
    overview = services.models.overview(user=owner)
    active, model = overview.active, overview.model
    new = services.training.view(final).version
    if new is not None and new.gate_status is GateStatus.HELD:
        # The training worked; the likeness gate kept the previous version active.
        console.print(f"[yellow]succeeded, but version {new.number} is held back[/yellow]: "
                      f"{literal(new.gate_reason or '')}")
        console.print(f"version {active.number if active else '?'} stays active; compare "
                      f"them with 'selfie-lora compare --user {literal(user)}', or activate version "
                      f"{new.number} yourself ('selfie-lora activate {new.number} --user "
                      f"{literal(user)}')")
    else:
        console.print(f"[green]succeeded[/green]: version {active.number if active else '?'} "
                      f"is active (LoRA scale {model.lora_scale})")


def _hand_back_on_interrupt(services: Services, worker: Worker, *, owner: Any,
                            training_id: str) -> None:
    """Ctrl-C or SIGTERM while a training runs here: stop this worker the way a worker's
    SIGTERM does (the training is checkpointed, handed back and queued again) and say how it
    goes on; never a training failed by the interrupt, nor a traceback."""
    import signal

    # A second Ctrl-C or SIGTERM during the hand-back (a checkpoint is being written) would
    # break it off half-way; it takes seconds.
    previous = {sig: signal.signal(sig, signal.SIG_IGN)
                for sig in (signal.SIGINT, signal.SIGTERM)}
    err_console.print("interrupted: handing the training back (saving a checkpoint) ...",
                      highlight=False)
    try:
        worker.stop()
        t = services.training.progress(user=owner, training_id=training_id).training
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if t.status.is_terminal:
        err_console.print(f"training {t.id} {t.status} before it could be handed back",
                          highlight=False)
        return
    try:
        kept = services.training.checkpoint_step(training_id=t.id)
    except SelfieLoraError:  # the storage cannot be listed now: say nothing of checkpoints
        kept = -1
    err_console.print(handed_back_message(t, checkpoint_step=kept), highlight=False,
                      soft_wrap=True)


def handed_back_message(t: Training, *, checkpoint_step: int | None) -> str:
    """What a training handed back by Ctrl-C waits for, and who goes on with it.
    ``checkpoint_step``: its newest kept checkpoint's step, None with none, -1 when unknown."""
    # Its status as a refusal of 'train' or 'resume' names it afterwards ("starting at step
    # 0/40"), and "waits in the queue" as they say it: one training, one word for its state.
    at = f" at step {t.step}/{t.total_steps}" if t.total_steps > 0 else ""
    # Its child can finish the last steps while the command winds down: then the new version is
    # stored and only its scoring is left, with no checkpoint to continue from.
    if t.version_id is not None:
        where, goes_on = ", its version stored, to be scored", "scores it and ends it"
    elif t.remote_id is not None:
        # A Replicate run: it has no local checkpoints, and Ctrl-C stops only this command's
        # polling; the run goes on remotely and the next worker adopts it (the trainer's
        # "resuming Replicate training"), so nothing is started over.
        where = f", its Replicate run {t.remote_id} going on"
        goes_on = "follows that run from where it is"
    elif checkpoint_step is None:
        # Stopped before its first checkpoint: nothing was kept, the next run starts over.
        where, goes_on = ", no checkpoint yet", "starts it over from step 0"
    elif checkpoint_step < 0:
        where, goes_on = "", "continues it"
    else:
        where = f", its checkpoint of step {checkpoint_step} kept"
        goes_on = "continues it from that checkpoint"
    return (f"training {t.id} ({t.status}{at}{where}) waits in the queue: any 'selfie-lora "
            f"worker' or 'selfie-lora serve' on this data {goes_on} (follow it in the web app "
            "or GET /api/training/progress)")


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(metavar="PROMPT", help="What to picture.")],
    user: Annotated[str, typer.Option("--user", help="The user's name.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for the images.")] = Path("."),
    # Text, read by the Generate form's parser: the option parser took "1.0" and "1_0".
    num_outputs: Annotated[str, typer.Option(
        "--num-outputs", "-n", metavar="INTEGER", help="How many pictures: 1 to 4.")] = "1",
    seed: Annotated[str | None, typer.Option(
        metavar="INTEGER", help="The first picture's seed, 0 to 4294967295 (picture n: that + n "
                                "- 1); default: drawn at random and printed, to make the "
                                "pictures again.")] = None,
    # Text too, read by the web's parser: the option parser's float() took "0.2_5" and "٣".
    lora_scale: Annotated[str | None, typer.Option(
        "--lora-scale", metavar="FLOAT",
        help="The LoRA scale of these pictures, -1 to 3 (default: the model's own, which "
             "'model --lora-scale' sets); not saved.")] = None,
    version_ref: Annotated[str | None, typer.Option(
        "--version", help="The version to generate with: its number as 'versions' lists it (2 "
                          "or v2), or its id; default: the active one, which stays active.",
        show_default=False)] = None,
) -> None:
    """Generate with the user's active LoRA version (or the one --version names)."""
    from selfie_lora.services.common import new_id
    from selfie_lora.services.generation import (
        GenerationRequest,
        num_outputs_from_text,
        seed_from_text,
    )

    try:
        seed_value = seed_from_text(seed)
        outputs = num_outputs_from_text(num_outputs)
        scale = lora_scale_from_text(lora_scale)
    except InvalidInputError as exc:
        _fail(exc.message)
    # Before generating: a generation is stored (and, on Replicate, paid for) whether or not
    # its images can be written here afterwards.
    _writable_folder(out)
    with opened() as services:
        owner = services.users.get_by_name(name=user)
        # Named here: a Ctrl-C or SIGTERM (a time limit's) that ends the command says whether
        # the pictures were stored, looked up by it. Both ended it with no word (SIGTERM killing
        # it outright), the pictures perhaps in the gallery and not in --out.
        generation_id = new_id()
        # One signal handler from before the generation to the last picture written: a SIGTERM
        # between the two (the version read, the seed printed) killed the command outright, and
        # a Ctrl-C there ended it with no word, the generation stored. The pictures are stored
        # under generation_id, so the words are the same wherever it stops.
        try:
            with _terminate_as_interrupt():
                _generate_and_write(services, owner=owner, out=out, request=GenerationRequest(
                    prompt=prompt, num_outputs=outputs, seed=seed_value,
                    lora_scale=scale,
                    # As the API's version_id: another version's pictures without activating
                    # it, which changed every client's default (and the model's log) to make one.
                    version_id=version_ref, generation_id=generation_id))
        except KeyboardInterrupt as exc:
            _generate_interrupted(exc, services, owner=owner, generation_id=generation_id,
                                  out=out)


def _generate_and_write(services: Services, *, owner: User, out: Path,
                        request: GenerationRequest) -> None:
    """``generate``'s work: the generation, what it says of it, its pictures written to
    ``out``. Ctrl-C and SIGTERM are ``generate``'s to handle."""
    from selfie_lora.services.generation import NoVersionError, withheld_pictures
    from selfie_lora.services.ports import MAX_SEED

    try:
        generation = services.generation.generate(user=owner, request=request)
    except NoVersionError as exc:
        _fail(_no_version_words(exc))
    version = services.models.version(user=owner, version_id=generation.version_id)
    # The seed drawn when none was given was only in a log line: it is what makes the
    # pictures again.
    pictures = generation.pictures()
    # Numbered from 1, as the API and the web page number them.
    count = len(pictures) + len(generation.withheld)
    each = " (picture n: that + n - 1)" if count > 1 else ""
    if count > 1 and generation.seed is not None and generation.seed + count - 1 > MAX_SEED:
        # Seeds wrap (image_seed): "that + n - 1" alone named a seed past MAX_SEED, one
        # --seed refuses, so the hint could not make that picture again.
        each = f" (picture n: that + n - 1, wrapping to 0 after {MAX_SEED})"
    console.print(f"generation {generation.id}: version {version.number}, LoRA scale "
                  f"{lora_scale_text(generation.lora_scale)}, seed {generation.seed}{each}", markup=False,
                  highlight=False, soft_wrap=True)
    for picture in withheld_pictures(generation):
        # The files are named by the place in the batch (from 0): the one it would have had.
        console.print(f"picture {picture.number} (seed {picture.seed}; no "
                      f"{generation.id}-{picture.number - 1}.png) was withheld by "
                      "Replicate's safety checker", markup=False, highlight=False,
                      soft_wrap=True)
    # Named by the picture's place in the batch (its seed's offset), not its rank.
    for i, place in enumerate(pictures):
        target = out / f"{generation.id}-{place}.png"
        _write(target, services.generation.image(
            user=owner, generation_id=generation.id, index=i), also=(
            f"generation {generation.id} is stored: its images are at "
            f"GET /api/generations/{generation.id}/images/<n>"))
        console.print(f"wrote {target}", markup=False, highlight=False)


def _generate_interrupted(exc: KeyboardInterrupt, services: Services, *, owner: User,
                          generation_id: str, out: Path) -> NoReturn:
    """``generate`` stopped by Ctrl-C or SIGTERM: one line saying whether its pictures were
    stored (a generation is stored whole or not at all: pictures stored before the row are
    left to the garbage collection's orphan sweep), and exit status 130 or 143."""
    try:
        stored = services.generation.find(user=owner, generation_id=generation_id)
    except KeyboardInterrupt:  # Ctrl-C pressed again while it looks: not waited for
        # The status of the first stop, as every other branch here: a SIGTERM (a time limit's)
        # followed by an impatient Ctrl-C is still a SIGTERM's 143.
        err_console.print(f"interrupted: whether generation {generation_id} was stored is "
                          f"unknown; 'selfie-lora generations list --user {owner.name}' lists "
                          "it if it was", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(_interrupted_status(exc)) from None
    except SelfieLoraError as error:  # the database out of reach as it was interrupted
        err_console.print(f"interrupted: whether generation {generation_id} was stored is "
                          f"unknown ({error.message}); 'selfie-lora generations list --user "
                          f"{owner.name}' lists it if it was", markup=False, highlight=False,
                          soft_wrap=True)
        raise typer.Exit(_interrupted_status(exc)) from None
    if stored is None:
        err_console.print("interrupted: nothing was stored",
                          markup=False, highlight=False, soft_wrap=True)
    else:
        count = len(stored.image_keys)
        err_console.print(
            f"interrupted: generation {stored.id} is stored ({count} picture"
            f"{'' if count == 1 else 's'}), but not all of them were written to {out}: "
            f"'selfie-lora generations list --user {owner.name}' lists it, and GET "
            f"/api/generations/{stored.id}/images/<n> gives them", markup=False,
            highlight=False, soft_wrap=True)
    raise typer.Exit(_interrupted_status(exc)) from None


def _no_version_words(exc: NoVersionError) -> str:
    """Why ``generate`` was refused, in the command line's words: the service's (the API's)
    name the Versions page and the activate route, where an operator at a shell has
    'selfie-lora activate'. Waiting or training is said as the service says it."""
    ready = exc.not_ready
    if ready.reason != "activate":
        return exc.message
    name = exc.user
    activate = (f"{name}'s model has no active version: activate one with 'selfie-lora "
                f"activate N --user {name}' ('selfie-lora versions --user {name}' lists them)")
    return (f"{activate}; a training is {ready.training} too" if ready.training
            else f"{activate} or train again")


@app.command("export")
def export_cmd(
    user: Annotated[str | None, typer.Option(
        "--user", help="The user's name; needed only when VERSION is not an id and several "
                       "users have a model here.")] = None,
    version_arg: Annotated[str | None, typer.Argument(
        metavar="VERSION", help="A version's number or id; default: the active one.")] = None,
    out: Annotated[str | None, typer.Option(
        "--out", help="The file to write; a folder (one that exists, or any path ending in "
                      "'/', made if need be) gets the file under its own name; default: "
                      "lora-v<N>[-kohya].safetensors in the current folder.")] = None,
    version: Annotated[str | None, typer.Option(
        "--version", help="The same as VERSION.")] = None,
    weights_format: Annotated[WeightsFormat, typer.Option(
        "--format", help="diffusers: the stored file (diffusers, ComfyUI); kohya: kohya "
        "sd-scripts' FLUX layout.")] = WeightsFormat.DIFFUSERS,
    force: Annotated[bool, typer.Option(
        "--force", help="Replace the file when it exists.")] = False,
) -> None:
    """Write a version's LoRA file, as stored or converted to kohya's layout."""
    if version_arg is not None and version is not None and version_arg != version:
        raise typer.BadParameter(f"VERSION {version_arg!r} and --version {version!r} differ",
                                 param_hint="VERSION")
    chosen = version_arg if version_arg is not None else version
    if chosen is not None and chosen.lower() in {"true", "false", "yes", "no", "on", "off"}:
        # `--force true`: a flag takes no value, so 'true' was read as the version, then said
        # to be no such version.
        raise typer.BadParameter(f"{chosen!r} is not a version (a number or an id); --force "
                                 "takes no value", param_hint="VERSION")
    # It only reads (a version's weights, written outside HOME): never the one to upgrade.
    with opened(existing="nothing to export") as services:
        if user is not None:
            owner = services.users.get_by_name(name=user)
        else:
            try:
                owner = services.models.owner_for_export(version_id=chosen)
            except InvalidInputError as exc:  # several users could be meant: a usage error
                _fail(exc.message, code=2)
        export = services.models.export_weights(user=owner, version_id=chosen,
                                                weights_format=weights_format)
        # A str, not a Path: Path drops the trailing '/' that says "a folder" of one that does
        # not exist yet (it wrote a file of that name).
        where = Path(out) if out is not None else Path(".")
        target = where
        try:
            # Looking is an OSError too where the name cannot be (a name over 255 bytes:
            # ENAMETOOLONG; a folder this user may not look into: EACCES): it was a traceback
            # from is_dir()/exists(), where a place that cannot be written is one line.
            as_folder = out is None or out.endswith(("/", os.sep)) or where.is_dir()
            target = where / export.filename if as_folder else where
            exists = target.exists()
            in_the_way = file_in_the_way(target.parent)
        except OSError as exc:
            _cannot_write(target, exc)
        if exists and not force:
            # A LoRA is often exported again with the same name: never lose one silently.
            _fail(f"{target} exists; nothing was written (pass --force to replace it, or --out "
                  "another file)")
        if in_the_way is not None:  # mkdir's own words were 'File exists' / 'Not a directory'
            _fail(f"cannot write {target}: {in_the_way} is a file, not a folder")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            write_whole(target, export.data)  # never a half-written LoRA under the asked name
        except OSError as exc:
            _cannot_write(target, exc)
        console.print(f"wrote {target}: version {export.version.number}, {weights_format} layout, "
                      f"{len(export.data)} bytes, sha256 {export.sha256}", markup=False,
                      highlight=False)


def _cannot_write(path: Path, exc: OSError, *, also: str | None = None) -> NoReturn:
    """A file or folder that cannot be written is one line and exit status 1, not a traceback."""
    err_console.print(f"[red]error:[/red] cannot write {literal(str(path))}: "
                      f"{literal(str(exc.strerror or exc))}",
                      highlight=False, soft_wrap=True)
    if also:
        err_console.print(f"  {literal(also)}", highlight=False, soft_wrap=True)
    raise typer.Exit(1) from None


def _write(path: Path, data: bytes, *, also: str | None = None) -> None:
    try:
        write_whole(path, data)
    except OSError as exc:
        _cannot_write(path, exc, also=also)


def _writable_folder(folder: Path) -> None:
    """Makes ``folder`` (--out) if need be, or says in one line why it cannot hold the files, so a
    command fails before its work rather than after it."""
    try:
        # Looking is an OSError too where the name cannot be (a name over 255 bytes:
        # ENAMETOOLONG; a folder this user may not look into: EACCES): it was a traceback from
        # exists(), where a place that cannot be written is one line (as export's --out).
        in_the_way = file_in_the_way(folder)
    except OSError as exc:
        _cannot_write(folder, exc)
    if in_the_way is not None:  # mkdir's own words were 'File exists' / 'Not a directory'
        _fail(f"cannot write {folder}: {_is_a_file(in_the_way, folder)} (--out names a folder)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # no permission, a read-only disk
        _cannot_write(folder, exc)
    if not os.access(folder, os.W_OK | os.X_OK):
        _cannot_write(folder, PermissionError(13, "Permission denied"))


@contextmanager
def _locked_says_again() -> Iterator[None]:
    """A database lock met by the command (``DatabaseLockedError``, the API's 503 with
    Retry-After) is one line that says what kept it waiting and that it is to be run again:
    its own words alone ("database is locked") read as a fault to report, where the lock is
    another process's work of the moment and the same command goes through once it ends."""
    try:
        yield
    except DatabaseLockedError as exc:
        # A lock alone when the database said so (SQLite has no statement timeout to name).
        what = "a lock held by another process, a backup or a long command"
        if not exc.lock:
            what += ", or a statement past the database's timeout"
        _fail(f"{exc.message}: the database was busy ({what}); run the command again in a "
              "moment")


def _fmt(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


@app.command()
def compare(
    user: Annotated[str, typer.Option("--user", help="The user's name.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for the grid and the chart.")] = Path(
        "."),
    a: Annotated[str | None, typer.Option(
        "--a", help="Version A: an id or a number (default: what the gate compared B with).")
    ] = None,
    b: Annotated[str | None, typer.Option(
        "--b", help="Version B: an id or a number (default: the newest version).")] = None,
) -> None:
    """Compare two versions of the user's model probe by probe: writes a side-by-side grid and
    the chart of likeness scores across all versions, and prints the scores."""
    _writable_folder(out)  # before scoring versions, which takes minutes on a GPU
    with opened(trainers={}) as services, _locked_says_again():
        owner = services.users.get_by_name(name=user)
        comparison = services.likeness.compare_scored(
            user=owner, a=a, b=b,
            # Versions from before likeness tracking (or whose scoring failed) are scored now.
            on_scoring=lambda v: console.print(f"scoring version {v.number} ..."),
            # The worker scores a new version in phase "scoring": not scored here a second time.
            on_being_scored=lambda v: console.print(
                _being_scored_words(services, owner=owner, version=v), markup=False,
                highlight=False, soft_wrap=True))
        grid_path = out / f"compare-v{comparison.a.number}-v{comparison.b.number}.png"
        chart_path = out / "likeness-chart.png"
        _write(grid_path, services.likeness.grid_png(comparison))
        _write(chart_path, services.likeness.chart_png(user=owner))
        active = services.models.active_version(model=comparison.model)
    va, vb = comparison.a, comparison.b
    table = Table(title=f"version {va.number} (A) against version {vb.number} (B), "
                        f"{_yardstick(comparison)}")
    for column in ("probe", "seed", "prompt", "A", "B", "B - A"):
        table.add_column(column)
    for row in comparison.probes:
        cells = []
        for result, score, version, record in (
                (row.a, row.a_score, va, comparison.record_a),
                (row.b, row.b_score, vb, comparison.record_b)):
            if result is None:
                cells.append(unscored_words(version, record))
            elif not result.face_found:
                cells.append("no face")
            else:
                cells.append(_fmt(score.get("similarity") if score else None))
        sa = row.a_score.get("similarity") if row.a_score else None
        sb = row.b_score.get("similarity") if row.b_score else None
        delta = probe_change(sa, sb)
        # The probe's index, as the API numbers it (probes[].index, .../quality/probes/{n}).
        table.add_row(str(row.probe.index), str(row.probe.seed), row.probe.prompt, *cells,
                      delta)
    console.print(table)
    scores = Table(title="scores")
    for column in ("score", f"A: v{va.number} ({va.gate_status})",
                   f"B: v{vb.number} ({vb.gate_status})"):
        scores.add_column(column)
    ha = comparison.scores_a.headline() if comparison.scores_a else {}
    hb = comparison.scores_b.headline() if comparison.scores_b else {}
    for key in ("identity", "identity_nearest", "face_share", "sane_share", "sharpness"):
        scores.add_row(key, _fmt(ha.get(key)), _fmt(hb.get(key)))
    console.print(scores)
    if vb.gate_reason:
        # The reason is the verdict when B was judged ("... it is active"): after a rollback
        # it says which version is active now.
        reason = gate_reason_now(
            vb.gate_reason, active=active is not None and active.id == vb.id,
            active_number=active.number if active is not None else None)
        console.print(f"gate on version {vb.number}: {vb.gate_status}: {reason}",
                      markup=False)
    console.print(f"wrote {grid_path}", markup=False, highlight=False)
    console.print(f"wrote {chart_path}", markup=False, highlight=False)


def probe_change(a: float | None, b: float | None) -> str:
    """compare's "B - A" for one probe, signed, 3 decimals as the scores beside it: it was
    "0.120" for a gain and "-0.000" for a change of 0.0002 (the similarities are stored with 4
    decimals), a drop where the scores shown were equal. The change of the scores as shown
    (``_fmt``, 3 decimals), not the true change rounded: that gave "+0.000" beside 0.800 and
    0.801 (0.8004 and 0.8006), where the column should add up with the two beside it."""
    if a is None or b is None:
        return "-"
    shown_a, shown_b = float(f"{a:.3f}"), float(f"{b:.3f}")  # as _fmt rounds them
    return f"{round(shown_b - shown_a, 3) + 0.0:+.3f}"  # + 0.0: -0.0 is "+0.000"


def _being_scored_words(services: Services, *, owner: Any, version: Version) -> str:
    from selfie_lora.services.common import utcnow

    try:
        training = services.training.progress(user=owner,
                                              training_id=version.training_id).training
        # Its worker stepped away on a database lock: "being scored by a worker" was said of
        # it, as the pages no longer say (one fact for all, TrainingService.undecided).
        undecided = services.training.undecided_of(versions=[version]).get(version.id)
    except SelfieLoraError:
        return being_scored_message(version.number, None, now=utcnow())
    if undecided is not None:
        return (f"version {version.number} is not being scored: {UNDECIDED_WORDS[undecided]}: "
                "it shows as not scored; run compare again once its training ended")
    return being_scored_message(version.number, training, now=utcnow())


def being_scored_message(number: int, training: Training | None, *, now: datetime) -> str:
    """What ``compare`` says of version ``number``, left unscored because its ``training`` is
    in phase scoring: "being scored by the worker" was said also of one handed back (Ctrl-C of
    ``train``) or left by a process that died, which nothing scored until a serve or worker
    ran."""
    after = "it shows as not scored; run compare again once its training ended"
    if training is None or lease_is_live(training, now):
        of = f" (its training {training.id} is in phase scoring)" if training else ""
        return f"version {number} is being scored by a worker{of}: {after}"
    return (f"version {number} waits to be scored: its training {training.id} is held by no "
            f"running process; {_left_to_a_process('scores')}: {after}")


def _yardstick(comparison: Comparison) -> str:
    """The photos both sides' identity is measured against: the newer version's (the service
    decides), which is A when A is the newer one."""
    used = comparison.reference_version
    if used is None:
        return "no training photos to measure identity against"
    side = "A" if used.id == comparison.a.id else "B"
    return f"identity against version {used.number}'s ({side}'s) training photos"


# --- model, versions, activate (the model page and the versions list, as the API has them) -----


def _versions_count(count: int) -> str:
    return f"{count} version" + ("" if count == 1 else "s")


def _pin_words(trained_before: bool, fixed: bool) -> str:
    """Whose trainer version it is, in the model page's words."""
    if trained_before:
        return "pinned: every training uses it"
    if fixed:
        return "your choice: the first training uses it"
    return ("what the first training uses: the server's trainer version, until that training "
            "pins it")


@app.command("model")
def model_cmd(
    user: Annotated[str, typer.Option("--user", help="The user's name.")],
    lora_scale: Annotated[str | None, typer.Option(
        "--lora-scale", metavar="FLOAT",
        help="Set the model's own LoRA scale first, as PATCH /api/model does: generations that "
             "name none use it, and retraining keeps it.",
        show_default=False)] = None,
    default_scale: Annotated[bool, typer.Option(
        "--default-lora-scale", help="Give the model back the default LoRA scale (PATCH "
                                     "/api/model with lora_scale null).")] = False,
    trainer_version: Annotated[str | None, typer.Option(
        "--trainer-version", help="Re-pin the model to another trainer version first (with "
                                  "--reason), as PATCH /api/model and the Model page's form "
                                  "do: every later training uses it.",
        show_default=False)] = None,
    reason: Annotated[str, typer.Option(
        "--reason", help="Why the trainer version changes (recorded with the re-pin).",
        show_default=False)] = "",
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print JSON on stdout: what GET /api/model answers (PATCH /api/model's "
                       "answer after --trainer-version), with the pin the next training takes "
                       "(next_training).")] = False,
) -> None:
    """The user's model: trigger word, destination and trainer version (those the next
    training uses), LoRA scale, active version; --lora-scale sets its own LoRA scale,
    --trainer-version re-pins it."""
    from selfie_lora.api.serializers import overview_json

    if reason and trainer_version is None:
        # Ignored without a word, a reason looked recorded; a usage error as --yes's (exit 2),
        # before anything is opened or changed.
        _fail("--reason goes with --trainer-version (it is recorded with a re-pin); nothing "
              "was changed", code=2)
    # Read as the web's form reads it (the option parser's float() took "0.2_5" and "٣"),
    # before anything is opened or changed.
    try:
        new_scale = lora_scale_from_text(lora_scale)
    except InvalidInputError as exc:
        _fail(exc.message)
    changing = new_scale is not None or default_scale or trainer_version is not None
    # Only reading (nothing to change given), it neither makes a database in a new HOME nor
    # upgrades an older one; a change is a write, as 'users disable' is.
    with opened(existing=None if changing else "no model to show", trainers={},
                generators={}) as services:
        owner = services.users.get_by_name(name=user)
        before = (services.training.next_pin(user=owner) if trainer_version is not None
                  else None)
        if changing:
            # The PATCH's own checks and audit events, all in one transaction: a scale out of
            # range, both scales asked for, a trainer version the backend cannot train with or
            # the operator does not allow, a re-pin while a training runs, is refused with its
            # message and nothing changes.
            try:
                changed = services.models.change(user=owner, lora_scale=new_scale,
                                                 lora_scale_to_default=default_scale,
                                                 trainer_version=trainer_version,
                                                 reason=reason)
            except InvalidInputError as exc:
                if exc.code != ErrorCode.REASON_REQUIRED:
                    raise
                _fail(f"{exc.message}: pass --reason TEXT")
        # A change shows the model as it left it: read again, a request of the server's
        # committed meanwhile (the user's scale reset on the web) was shown as this change.
        overview = changed if changing else services.models.overview(user=owner)
        # What the model page shows: before the first training, the pin that training takes
        # (the configured one unless the user chose one), not the row stored at the upload.
        pin = services.training.next_pin(user=owner)
        # As PATCH answers: a recipe of more pixels than the stored photos were prepared at.
        notice = (services.training.photos_to_upload_again(user=owner)
                  if trainer_version is not None else None)
        # None active: 'none yet' read as no version at all when some were there.
        inactive = (len(services.models.versions(user=owner)) if overview.active is None
                    else 0)
        base = services.settings.public_url_base
    assert pin is not None  # the overview found the model
    model, active = overview.model, overview.active
    if as_json:
        # The API's own answer: its pin_fixed too (false before the first training).
        answer = overview_json(overview, base=base)
        if trainer_version is not None:
            answer |= {"photos_need_upload_again": notice is not None, "notice": notice}
        sys.stdout.write(json.dumps({
            **answer,
            "next_training": {"backend": pin.model.backend,
                              "trainer_version": pin.model.trainer_version,
                              "destination": pin.model.destination,
                              "pinned": pin.trained_before, "chosen": pin.repinned_by_user},
        }) + "\n")
        return
    if before is not None:  # a re-pin asked for
        was = before.model.trainer_version
        now = pin.model.trainer_version
        # The version it showed, on a model never trained nor re-pinned: the re-pin was
        # recorded and is the pin now (the server's setting no longer moves it), not
        # 'unchanged'.
        what = (f"(was {was})" if now != was
                else "(the one it showed, now chosen by you rather than following the "
                     "server's setting)" if pin.fixed and not before.fixed
                else "(unchanged)")
        console.print(f"trainer version of {owner.name}'s model: {now} {what}; every later "
                      "training uses it", markup=False, highlight=False, soft_wrap=True)
        if notice is not None:
            console.print(notice, markup=False, highlight=False, soft_wrap=True)
    scale = "custom" if model.lora_scale_is_custom else "the default"
    if new_scale is not None or default_scale:
        console.print(f"LoRA scale of {owner.name}'s model set to "
                      f"{lora_scale_text(model.lora_scale)} ({scale})"
                      + (": generations that name none use it, and retraining keeps it"
                         if model.lora_scale_is_custom else ""),
                      markup=False, highlight=False, soft_wrap=True)
    shown = (f"version {active.number} (sha256 {active.weights_sha256})" if active is not None
             else f"none active ({_versions_count(inactive)}: activate one with 'selfie-lora "
                  f"activate N --user {owner.name}')" if inactive
             else "none yet")
    for name, value in (
            ("trigger word", model.trigger_word),
            ("destination", pin.model.destination),
            ("backend", pin.model.backend),
            ("trainer version", f"{pin.model.trainer_version} "
                                f"({_pin_words(pin.trained_before, pin.fixed)})"),
            ("LoRA scale", f"{lora_scale_text(model.lora_scale)} ({scale})"),
            ("active version", shown)):
        console.print(f"{name}: {value}", markup=False, highlight=False, soft_wrap=True)


@app.command("versions")
def versions_cmd(
    user: Annotated[str, typer.Option("--user", help="The user's name.")],
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print JSON on stdout: what GET /api/model/versions answers.")] = False,
) -> None:
    """The versions of the user's model, newest first: when each was made, its likeness, the
    likeness gate's decision, and which is active ('selfie-lora activate N --user NAME' rolls
    back)."""
    from selfie_lora.api.serializers import version_json
    from selfie_lora.domain.likeness import gate_cell, likeness_cell

    with opened(existing="no versions to list", trainers={}, generators={}) as services:
        owner = services.users.get_by_name(name=user)
        active_id = services.models.get(user=owner).active_version_id  # no model: said
        base = services.settings.public_url_base
        listed = services.models.versions_with_likeness(user=owner)
        # Why the gate has not decided on a pending one, where a database lock is why.
        undecided = services.training.undecided_of(versions=[v for v, _ in listed])
        found = [version_json(v, record, base=base, waiting=undecided.get(v.id))
                 for v, record in listed]
        # The cells as the Versions page words them (domain.likeness), by version id.
        cells = {v.id: (likeness_cell(v, record), gate_cell(v)) for v, record in listed}
    if as_json:
        sys.stdout.write(json.dumps({"versions": found, "older": None}) + "\n")
        return
    if not found:
        console.print(f"{owner.name}'s model has no version yet: each training that succeeds "
                      "adds one", markup=False, highlight=False, soft_wrap=True)
        return
    table = Table(title=literal(f"versions of {owner.name}'s model, newest first"))
    for column in ("version", "made (UTC)", "likeness", "gate", "active"):
        table.add_column(column)
    for v in found:
        table.add_row(str(v["number"]), _minute(datetime.fromisoformat(v["created_at"])),
                      *cells[v["id"]],
                      "active" if v["id"] == active_id else "")
    console.print(table)
    # Why a version is not active although newer: the gate's reason, too long for a column.
    active_number = next((v["number"] for v in found if v["id"] == active_id), None)
    for v in found:
        if v["gate"]["status"] == str(GateStatus.HELD) and v["gate"]["reason"]:
            # One activated against the gate is no longer held back: 'held back' alone read
            # as if it were not in use.
            held = ("held back by the likeness gate, then activated anyway"
                    if v["gate"]["overridden"] else "held back")
            reason = gate_reason_now(v["gate"]["reason"], active=v["id"] == active_id,
                                     active_number=active_number)
            console.print(f"version {v['number']} {held}: {reason}",
                          markup=False, highlight=False, soft_wrap=True)
        elif v["id"] in undecided:
            # As the Versions page's Gate cell says it: "pending" alone read as scoring going on.
            console.print(f"version {v['number']} pending: {UNDECIDED_WORDS[undecided[v['id']]]}",
                          markup=False, highlight=False, soft_wrap=True)


@app.command("activate")
def activate_cmd(
    number: Annotated[str, typer.Argument(
        metavar="NUMBER", help="The version to make active: its number as 'versions' lists "
                               "it (2 or v2), or its id.", show_default=False)],
    user: Annotated[str, typer.Option("--user", help="The user's name.")],
) -> None:
    """Roll the user's model back (or forward) to another version: generations that name no
    version use it from now on. A version the likeness gate held back can be activated too
    (recorded); one whose weights are missing from the storage, or trained for another base
    model than this server's, is refused and nothing changes."""
    with opened(trainers={}, generators={}) as services:
        owner = services.users.get_by_name(name=user)
        before = services.models.overview(user=owner).active
        # The model as the activation left it, not read again (another activation may follow).
        now = services.models.activate(user=owner, version_id=number).active
        assert now is not None  # activate made one active
        # Why the gate has not decided on it, where a database lock is why: "still being
        # scored" was said of it too, as the Versions page no longer does. Read after the
        # activation committed: a failure of this read (a lock again) is logged, not the
        # command's exit 1, which said an activation that was done had failed.
        try:
            undecided = services.training.undecided_of(versions=[now]).get(now.id)
        except SelfieLoraError as exc:
            logger.warning("version %d is active; why the gate has not decided on it could "
                           "not be read: %s", now.number, exc.message)
            undecided = None
    was = f" (was version {before.number})" if before is not None else ""
    if before is not None and before.id == now.id:
        was = " (it was already)"
    # The gate's decision stays on record: activating against it is said, as the web app asks.
    against = {GateStatus.HELD: ", although the likeness gate held it back",
               GateStatus.PENDING: ", although its likeness is still being scored"}.get(
        now.gate_status, "")
    if undecided is not None:
        against = UNDECIDED_AGAINST[undecided]
    console.print(f"version {now.number} of {owner.name}'s model is active{was}{against}; "
                  "generations that name no version use it", markup=False, highlight=False,
                  soft_wrap=True)


# --- generations list, delete (the gallery and its Delete button, as the API has them) ------------

# A prompt as the list shows it: its start, on the lines beside the generation's facts (four at
# 80 columns; the whole is in --json).
_PROMPT_SHOWN = 140


def _short_prompt(prompt: str) -> str:
    line = " ".join(prompt.split())
    return line if len(line) <= _PROMPT_SHOWN else line[:_PROMPT_SHOWN - 3] + "..."


@generations_app.command("list")
def generations_list(
    user: Annotated[str, typer.Option("--user", help="The user's name.")],
    limit: Annotated[int, typer.Option(
        "--limit", help="How many, newest first (1 to 200), as GET /api/generations' "
                        "limit.")] = 50,
    before: Annotated[str | None, typer.Option(
        "--before", help="The next page: the cursor the previous page named ('older').",
        show_default=False)] = None,
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print JSON on stdout: what GET /api/generations answers.")] = False,
) -> None:
    """The user's generations, newest first, a page at a time: id, when made, prompt, version,
    LoRA scale, seed and number of pictures (the pictures are in the storage; 'generate' wrote its
    own copies to its --out)."""
    from selfie_lora.api.serializers import generation_json

    with opened(existing="no generations to list", trainers={}, generators={}) as services:
        owner = services.users.get_by_name(name=user)
        page = services.generation.page(user=owner, limit=limit, before=before)
        # As the Generate page numbers them: a user with no model has no generations either.
        numbers = services.models.version_numbers(
            user=owner, version_ids={g.version_id for g in page.generations})
        base = services.settings.public_url_base
    if as_json:
        sys.stdout.write(json.dumps({
            "generations": [generation_json(g, base=base) for g in page.generations],
            "older": page.older}) + "\n")
        return
    if not page.generations:
        console.print(f"{owner.name} has no generations" + (" older than that" if before
                                                            else ""),
                      markup=False, highlight=False, soft_wrap=True)
        return
    table = Table(title=literal(f"generations of {owner.name}, newest first"), show_lines=True)
    # Two columns, each generation's facts stacked in the first: one column each (id, made,
    # prompt, version, scale, seed, pictures) did not fit 80 columns (a pipe's width) beside
    # the whole id and seed, and the prompt was cut into 3-letter pieces. The id whole,
    # whatever the width: 'generations delete' takes nothing less; the seed (the batch's, as
    # the Generate page shows it) whole on its line: a number cut over two is copied wrong.
    table.add_column("generation", no_wrap=True,
                     min_width=max(len(g.id) for g in page.generations))
    table.add_column("prompt", overflow="fold")
    for g in page.generations:
        number = numbers.get(g.version_id)
        pictures = len(g.image_keys)
        facts = [g.id, f"made {_minute(g.created_at)} UTC",
                 f"version {'?' if number is None else number}, "
                 f"LoRA scale {lora_scale_text(g.lora_scale)}",
                 f"seed {'?' if g.seed is None else g.seed}, "
                 f"{pictures} picture{'' if pictures == 1 else 's'}"]
        table.add_row(literal("\n".join(facts)), literal(_short_prompt(g.prompt)))
    console.print(table)
    if page.older is not None:
        console.print(f"older ones: add --before {page.older}", markup=False, highlight=False,
                      soft_wrap=True)


@generations_app.command("delete")
def generations_delete(
    generation_id: Annotated[str, typer.Argument(
        metavar="ID", help="The generation's id, as 'generations list' shows it.",
        show_default=False)],
    user: Annotated[str, typer.Option("--user", help="The user's name.")],
) -> None:
    """Delete one of the user's generations and its pictures in the storage, for good (as
    DELETE /api/generations/{id}); the files 'generate' wrote to its --out are left."""
    with opened(trainers={}, generators={}) as services:
        owner = services.users.get_by_name(name=user)
        generation = services.generation.delete(user=owner, generation_id=generation_id)
    console.print(f"deleted generation {generation.id} of {owner.name} and its "
                  f"{len(generation.image_keys)} picture(s)", markup=False, highlight=False,
                  soft_wrap=True)


# --- end of generations list, delete ----------------------------------------------------------


@app.command()
def demo(
    out: Annotated[Path, typer.Option(
        "--out", help="Where the demo writes everything: a new or empty folder, or one an "
                      "earlier demo made (its photos/, home/ and generated/ are replaced, "
                      "nothing else). Any other folder is refused (exit 2) and left as it "
                      "is.")] = Path("demo-output"),
) -> None:
    """The whole cycle on the embedded defaults, offline: check, first training, retraining,
    comparison, generation."""
    from selfie_lora.demo import DemoFolderError, DemoHomeInUseError, DemoStartError, run_demo

    try:
        run_demo(out=out)
    except DemoStartError as exc:  # its services not built: one line, as any command's start
        message = _start_failure(exc.settings, exc.cause)
        if message is None:
            raise exc.cause from None
        logger.debug("could not start", exc_info=exc.cause)
        _fail(message, label="demo failed")
    except ValidationError as exc:  # its settings are code, not the environment: a bug
        _invalid_settings(exc, code=1)
    except DemoFolderError as exc:  # a usage error, as typer's own are: exit status 2
        _fail(exc.message, code=2)
    except DemoHomeInUseError as exc:  # as restore's refusal on a HOME in use: exit status 1
        _fail(exc.message)
    except SelfieLoraError as exc:
        _fail(exc.message, label="demo failed")


# --- backup and restore (self-contained: the default deployment's data in HOME) ---------------


def _backup_service() -> tuple[Settings, BackupService]:
    from selfie_lora.wiring import build_backups

    settings = _settings()
    return settings, build_backups(settings)


@app.command("backup")
def backup_cmd(
    dest: Annotated[Path, typer.Argument(
        metavar="DEST", help="A new (or empty) folder, or a file ending in .tar, to write the backup to.")],
) -> None:
    """Copy the database and every photo, weights and picture in SELFIE_LORA_HOME, consistently,
    while the server and workers keep running."""
    settings, backups = _backup_service()
    try:
        summary = backups.backup(dest=dest)
    except SelfieLoraError as exc:
        _fail(exc.message, details=exc.details)
    except (OSError, sqlite3.Error) as exc:
        _fail(f"cannot back up {settings.home}: {_reason(exc)}")
    rows = ", ".join(f"{n} {t}" for t, n in sorted(summary.counts.items()) if n)
    console.print(f"wrote {summary.path}", markup=False, highlight=False, soft_wrap=True)
    console.print(f"{summary.blobs} blob(s), {summary.blob_bytes} bytes; schema "
                  f"{summary.schema_revision}; {rows or 'no rows'}", markup=False,
                  highlight=False, soft_wrap=True)
    if summary.missing:
        err_console.print(f"warning: {len(summary.missing)} blob(s) the database names were not "
                          "in the storage, so are not in the backup either: "
                          f"{', '.join(summary.missing[:5])}", markup=False, highlight=False,
                          soft_wrap=True)


@app.command("restore")
def restore_cmd(
    source: Annotated[Path, typer.Argument(
        metavar="SRC", help="A backup folder or .tar that 'backup' wrote.")],
    force: Annotated[bool, typer.Option(
        "--force", help="Replace the data in a SELFIE_LORA_HOME that is not empty.")] = False,
) -> None:
    """Put a backup in place of SELFIE_LORA_HOME's data, checked whole first (stop the server
    and workers before)."""
    settings, backups = _backup_service()
    try:
        summary = backups.restore(source=source, force=force)
    except SelfieLoraError as exc:
        _fail(exc.message, details=exc.details)
    except (OSError, sqlite3.Error) as exc:
        _fail(f"cannot restore into {settings.home}: {_reason(exc)}")
    console.print(f"restored {summary.path} from the backup of {summary.created_at}: "
                  f"{summary.blobs} blob(s)", markup=False, highlight=False, soft_wrap=True)
    if summary.replaced is not None:
        console.print(f"the replaced HOME is kept in {summary.replaced}: delete it once you "
                      "no longer need it", markup=False, highlight=False, soft_wrap=True)
    if summary.missing:
        # Said at backup time only, to whoever ran it (a cron job's log): the operator restoring
        # after a loss must know that these versions' weights or pictures cannot be served.
        err_console.print(f"warning: {len(summary.missing)} blob(s) the database names were not "
                          "in the storage when the backup was taken, so are not restored "
                          f"either: {', '.join(summary.missing[:5])}", markup=False,
                          highlight=False, soft_wrap=True)
    for warning in summary.warnings:
        err_console.print(f"warning: {warning}", markup=False, highlight=False, soft_wrap=True)


# --- end of backup and restore ------------------------------------------------------------------


# --- users list, disable, enable, delete (self-contained: the operator's view of the accounts) ---


@users_app.command("list")
def users_list(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON on stdout.")] = False,
) -> None:
    """Every user: created, working API keys, web password, disabled, deletion pending."""
    with opened(existing="no users to list", trainers={}, generators={}) as services:
        found = services.users.list_users()
    if as_json:
        sys.stdout.write(json.dumps([
            {"name": u.user.name, "created_at": u.user.created_at.isoformat(), "keys": u.keys,
             "password_set": u.has_password,
             "disabled_at": u.user.disabled_at.isoformat() if u.user.disabled_at else None,
             "deletion_requested_at": (u.user.erasure_requested_at.isoformat()
                                       if u.user.erasure_requested_at else None)}
            for u in found]) + "\n")
        return
    table = Table(title="users")
    for column in ("name", "created (UTC)", "keys", "password", "disabled (UTC)"):
        table.add_column(column)
    for u in found:
        disabled = f"{u.user.disabled_at:%Y-%m-%d %H:%M}" if u.user.disabled_at else "-"
        if u.user.erasure_requested_at is not None:
            # Not an account merely locked out: its deletion is under way, or its process died
            # and the next collection (or 'users delete NAME' run again) finishes it.
            disabled += ", deletion pending"
        table.add_row(literal(u.user.name), f"{u.user.created_at:%Y-%m-%d %H:%M}", str(u.keys),
                      "yes" if u.has_password else "no", disabled)
    console.print(table)


@users_app.command("disable")
def users_disable(name: Annotated[str, typer.Argument(metavar="NAME", help="The user's name.")]) -> None:
    """Refuse a user's sign-in, API keys and sessions (403); their data is kept."""
    with opened(trainers={}, generators={}) as services:
        user = services.users.disable(name=name)
    console.print(f"disabled {user.name}: sign-in, API keys and sessions are refused; data kept",
                  markup=False, highlight=False, soft_wrap=True)


@users_app.command("enable")
def users_enable(name: Annotated[str, typer.Argument(metavar="NAME", help="The user's name.")]) -> None:
    """Let a disabled user sign in and use their API keys again."""
    with opened(trainers={}, generators={}) as services:
        user = services.users.enable(name=name)
    console.print(f"enabled {user.name}", markup=False, highlight=False, soft_wrap=True)


# How to go on after a training stopped ``users delete``, in this command's words (the service's
# message says what happened; the API and the web page say it in theirs).
_ERASURE_REMEDY = {
    # The command line has no cancel of its own: --force is how it cancels.
    "active": "; pass --force to cancel it and delete",
    # The disabling marked the deletion as asked for: the next collection finishes it,
    # canceling the training, whether or not anyone runs the command again.
    "started": ": run again with --force to cancel it and delete now; otherwise a worker or "
               "gc finishes the deletion within minutes, canceling it (the account stays "
               "disabled)",
    "stopping": ": run the command again once it has (the account stays disabled; the next "
                "collection finishes the deletion otherwise)",
}


def _read_only_refusal(exc: BaseException) -> bool:
    """Whether ``exc`` is the database refusing writes for good (a read-only file or standby),
    not its pool's connections all taken (``DatabaseRefusedError.pool_exhausted``)."""
    return isinstance(exc, DatabaseRefusedError) and not exc.pool_exhausted


def _unchanged_by_refusal(services: Services, *, name: str) -> str:
    """What a ``users delete`` whose disabling a read-only database refused left of ``name``'s
    account, read back (such a database still answers reads): nothing changed, but the account
    may be disabled already and its deletion pending (a run before cut short partway, whose
    rows may be gone), and "nothing was deleted or disabled" said the opposite."""
    from selfie_lora.services.common import utcnow

    with suppress(SelfieLoraError):
        user = services.users.get_by_name(name=name)
        resume_after = services.erasure.resume_after
        if (user.erasure_requested_at is not None
                and user.erasure_requested_at > utcnow() + resume_after):
            # Parked (a failure that no wait mends, dated ERASURE_PARKED ahead): not finished
            # once writes come back, but at its date, or by this command once the cause is
            # fixed (review 7).
            return (f"{user.name}'s deletion stays pending (the account is disabled), parked "
                    "after a failure that is not an outage: it is tried again at "
                    f"{_minute(user.erasure_requested_at + resume_after)} UTC by a worker, "
                    "serve or gc, or run this again once the database takes writes and the "
                    "cause is fixed")
        if user.erasure_requested_at is not None:
            return (f"{user.name}'s deletion stays pending (the account is disabled): a worker, "
                    "serve or gc finishes it once the database takes writes, or run this "
                    "again then")
        if user.disabled_at is not None:
            return (f"this run changed nothing ({user.name}'s account stays disabled, its "
                    "deletion not asked for): run this again once it takes writes")
        return (f"nothing of {user.name}'s was deleted or disabled: run this again once it "
                "takes writes")
    # Not read either: what the account was before is not known, only that this run did nothing.
    return "this run changed nothing: run it again once the database takes writes"


@users_app.command("delete")
def users_delete(
    name: Annotated[str, typer.Argument(metavar="NAME", help="The user's name.")],
    yes: Annotated[bool, typer.Option(
        "--yes", help="Do not ask for confirmation (needed when standard input is no "
        "terminal).")] = False,
    force: Annotated[bool, typer.Option(
        "--force", help="Cancel a training of the user's that is queued or running first "
        "(without it the command refuses).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON on stdout.")] = False,
) -> None:
    """Delete a user and everything they own, in the database and in storage: model, versions,
    trainings, photos, weights, checkpoints, generated pictures, likeness records, API keys,
    sessions. Cannot be undone; run it again to finish one that was stopped."""
    from selfie_lora.services.erasure import ErasureBlockedError, ErasureContinuesError

    if not yes and not sys.stdin.isatty():
        _fail(f"users delete {name} deletes the account and all its data: confirm at a "
              "terminal, or pass --yes; nothing was deleted", code=2)
    with opened(trainers=None, generators={}) as services:
        if not yes:
            user, held = services.erasure.holdings(name=name)
            console.print(
                f"{user.name}: {'a model' if held.model_id else 'no model'}, "
                f"{len(held.version_ids)} version(s), {len(held.training_ids)} training(s), "
                f"{len(held.dataset_ids)} photo set(s) ({len(held.photo_hashes)} photo(s)), "
                f"{len(held.generation_ids)} generation(s), and their API keys and sessions "
                "will be deleted for good", markup=False, highlight=False, soft_wrap=True)
            if not services.erasure.confirmed(name=user.name, typed=_ask(
                    "type the user's name to confirm", nothing="deleted", default="",
                    show_default=False)):
                _fail("not confirmed: nothing was deleted")
        try:
            with _terminate_as_interrupt():
                summary = services.erasure.erase(name=name, force=force)
        except ErasureBlockedError as exc:
            _fail(exc.message + _ERASURE_REMEDY[exc.stage])
        except ErasureContinuesError as exc:
            # A read-only database (a fail-over to a standby) once the account was disabled:
            # the refusal first, in its words, then what it left and what goes on. The
            # service's line put the refusal in a parenthesis and said nothing to do.
            if not _read_only_refusal(exc.cause):
                raise
            _fail(f"the database refused writes (read-only) partway: {exc.cause.message}; "
                  f"{exc.name}'s account is disabled, and the deletion is tried again in "
                  f"{wait_text(exc.retry)} by a worker, serve or gc, or now by `selfie-lora "
                  f"users delete {exc.name} --yes` once the database takes writes")
        except DatabaseRefusedError as exc:
            # Raised as it is, it refused the disabling, the first write (``erase_by_id``):
            # the driver's words alone did not say that nothing changed.
            if not _read_only_refusal(exc):
                raise
            _fail(f"the database refuses writes (read-only): {exc.message}; "
                  + _unchanged_by_refusal(services, name=name))
        except KeyboardInterrupt as exc:
            # SIGTERM too: the erase's ``finally`` settles what it held aside (photos and
            # weights copied while deleted) rather than the process dying with them on disk.
            err_console.print(f"interrupted: what was deleted stays deleted; run `selfie-lora "
                              f"users delete {name} --yes` again to finish", highlight=False,
                              markup=False)
            raise typer.Exit(_interrupted_status(exc)) from None
    if as_json:
        sys.stdout.write(json.dumps(summary.as_json()) + "\n")
        return
    for line in summary.lines():
        console.print(line, markup=False, highlight=False, soft_wrap=True)


# --- end of users list, disable, enable, delete --------------------------------------------------


def main() -> None:
    app()
