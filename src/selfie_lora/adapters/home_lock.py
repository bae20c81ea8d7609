"""Who is using SELFIE_LORA_HOME: every ``serve`` and ``worker`` holds a shared advisory lock
(``flock``) on ``HOME/.in-use`` while it runs, and ``restore`` takes it exclusive, without
waiting, before it changes anything. A server left running on a HOME that a restore replaced
keeps answering 201 while it writes into the unlinked old database, and its blobs land in the
new HOME with no row naming them; so a restore refuses while one runs. The kernel drops a lock
with its process, so one killed (even with SIGKILL) never blocks a restore.

A restore into a HOME that is no folder yet (a fresh machine, where systemd may already start
serve and worker) makes it, empty but for ``.in-use``, and locks it: a serve or worker started
meanwhile is refused rather than swapped out from under itself. Such a HOME counts as empty.

The one-shot commands that open HOME's data (``backup``, ``users``, ``keys``, ``gc``,
``generate``...) hold the same shared lock while they run (``sharing_home``): a restore under
one swapped HOME away mid-command, a ``users create`` then wrote its user into the HOME the
restore set aside, and a ``backup`` took the old database with the restored HOME's blobs."""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from selfie_lora.adapters.sqlite_files import PRIVATE_MODE
from selfie_lora.errors import ConfigError

IN_USE = ".in-use"
# What a serve, worker or command started during a restore is told.
_BEING_RESTORED = "SELFIE_LORA_HOME ({home}) is being restored: start this once the restore ends"


@contextmanager
def _locked(home: Path, how: int, refused: str) -> Iterator[None]:
    try:
        fd = os.open(home / IN_USE, os.O_RDWR | os.O_CREAT, PRIVATE_MODE)
    except OSError as exc:
        if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        # No command works on a HOME it may only read (SQLite writes beside the database even
        # to read it, in WAL mode): said as that, not as the lock file's raw error.
        raise ConfigError(f"SELFIE_LORA_HOME ({home}) cannot be written by this account "
                          f"({exc.strerror}): every selfie-lora command writes to it (its "
                          "lock, the database's journal); run it as the account that owns "
                          "HOME, on a disk mounted read-write") from None
    try:
        try:
            fcntl.flock(fd, how | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(refused) from None
        yield
    finally:
        os.close(fd)  # and the lock with it


@contextmanager
def using_home(home: Path) -> Iterator[None]:
    """Held by a server or worker for as long as it runs on ``home``."""
    home.mkdir(mode=0o700, parents=True, exist_ok=True)  # it holds every user's photos
    with _locked(home, fcntl.LOCK_SH, _BEING_RESTORED.format(home=home)):
        yield


@contextmanager
def restoring_home(home: Path) -> Iterator[None]:
    """Held by a restore of ``home``: refused while a server or worker runs on it, and one
    that starts meanwhile is refused. A HOME that is no folder yet is made (0700) to hold the
    lock; one that is a file is left to the restore to refuse."""
    made = not home.exists() and not home.is_symlink()
    if made:
        home.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not home.is_dir():
        yield
        return
    with _locked(home, fcntl.LOCK_EX, f"SELFIE_LORA_HOME ({home}) is in use by a running "
                                      "server, worker or other selfie-lora command (such as a "
                                      "backup): stop it, or let it end, first"):
        try:
            yield
        finally:
            # A restore that failed leaves no HOME where there was none (still locked here).
            if made and home.is_dir() and only_the_lock(home):
                (home / IN_USE).unlink(missing_ok=True)
                with suppress(OSError):
                    home.rmdir()


@contextmanager
def sharing_home(home: Path, *, make: bool = False) -> Iterator[None]:
    """Held by a one-shot command while it runs on ``home``, shared as ``using_home``: a
    restore is refused meanwhile, and the command is refused during one. ``make``: a command
    that makes a missing HOME (``users create`` on a fresh machine) makes it first (0700), as
    ``using_home`` does, then locks it; else a restore started between this and the command's
    making HOME took it, and the command's user went into the HOME the restore set aside.
    Otherwise a HOME that is no folder is left alone, not made for the lock (the command says
    what is missing)."""
    if make:
        # Where it cannot be made (a file in the way), the command's own start says why.
        with suppress(OSError):
            home.mkdir(mode=0o700, parents=True, exist_ok=True)  # every user's photos
    if not home.is_dir():
        yield
        return
    with _locked(home, fcntl.LOCK_SH, _BEING_RESTORED.format(home=home)):
        yield


@contextmanager
def clearing_home(home: Path, *, refused: str) -> Iterator[None]:
    """Held by ``demo`` while it deletes the HOME an earlier demo made: a ``serve`` still
    running on it (the command the demo printed) would go on answering from deleted files, so
    the demo is refused (``refused``) while one runs, as ``restore`` is. A HOME that is no
    folder is left to the caller."""
    if not home.is_dir() or home.is_symlink():
        yield
        return
    with _locked(home, fcntl.LOCK_EX, refused):
        yield


@contextmanager
def holding(folder: Path) -> Iterator[None]:
    """``folder``'s ``.in-use`` locked exclusive: a restore's new HOME, from before it takes
    HOME's name, so that a serve or worker starting after the exchange waits for the restore's
    end (it is refused until then)."""
    with _locked(folder, fcntl.LOCK_EX, f"{folder} is in use"):
        yield


def only_the_lock(home: Path) -> bool:
    """Whether ``home`` holds nothing but ``.in-use`` (a restore made it to lock it)."""
    return all(entry.name == IN_USE for entry in home.iterdir())
