"""Child processes that never outlive their parent.

The training child and the photo-analysis processes are started by a worker or ``serve``. When
that process is stopped cleanly it stops them itself; this module covers the rest (``kill -9``,
the OOM killer, a crash): a child calls ``exit_with_parent()`` first thing, and a watcher thread
ends it within a second of its parent's death. The parent's death is seen as the child being
re-parented (``os.getppid()`` changes), which happens the moment the parent exits, zombie or not,
so a recycled pid can never keep an orphan alive.
"""

from __future__ import annotations

import logging
import os
import threading

logger = logging.getLogger(__name__)

CHECK_INTERVAL_S = 0.5


def exit_with_parent(*, interval: float = CHECK_INTERVAL_S) -> None:
    """In a child process: exit (status 1, no cleanup) as soon as the parent is gone."""
    parent = os.getppid()
    if parent <= 1:  # already orphaned
        os._exit(1)

    def watch() -> None:
        while True:
            stop.wait(interval)
            if os.getppid() != parent:
                logger.warning("parent process %d is gone; exiting", parent)
                os._exit(1)

    stop = threading.Event()  # never set: the thread lives as long as the process
    threading.Thread(target=watch, name="lifeline", daemon=True).start()
