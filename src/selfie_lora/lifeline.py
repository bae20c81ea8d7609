"""Child processes that never outlive the process they work for.

The training child and the photo-analysis processes are started by a worker or ``serve``. When
that process stops cleanly it stops them itself; this module covers the rest (``kill -9``, the
OOM killer, a crash): a child calls ``exit_with(pid)`` first thing, with the pid its parent gave
it, and a watcher thread ends it as soon as that process is gone.

Why a pid and not "the parent": the photo-analysis processes are forked by multiprocessing's
fork server, so their parent is the fork server, which itself only exits once they have (each
of them holds its "alive" pipe). They watch the service's pid instead. On Linux the watch is a
pidfd, opened while the process is certainly alive, so neither a recycled pid nor a zombie that
nobody reaped can keep an orphan alive; elsewhere the child polls ``os.getppid()``.
"""

from __future__ import annotations

import contextvars
import logging
import os
import select
import threading

logger = logging.getLogger(__name__)

POLL_INTERVAL_S = 0.5


def exit_with(pid: int) -> None:
    """In a child process: exit (status 1, no cleanup) as soon as process ``pid`` is gone, at
    once if it is gone already. The parent passes its own pid (``os.getpid()``) when it starts
    the child: read in the child, ``os.getppid()`` is already init's (1) when the parent died
    while the child was still importing, and the child would watch init for ever."""
    try:
        fd: int | None = os.pidfd_open(pid)
    except ProcessLookupError:
        os._exit(1)  # gone already
    except (AttributeError, OSError):  # not Linux >= 5.3
        fd = None

    def alive() -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True

    def watch() -> None:
        if fd is not None:
            select.select([fd], [], [])  # readable once the process has exited
        else:
            while alive():
                threading.Event().wait(POLL_INTERVAL_S)
        logger.warning("process %d is gone; exiting", pid)
        os._exit(1)

    # In this thread's context (a copy): a thread starts with an empty one, and its line (why a
    # training's child vanished) must carry the training id that the child set.
    context = contextvars.copy_context()
    threading.Thread(target=context.run, args=(watch,), name="lifeline", daemon=True).start()
