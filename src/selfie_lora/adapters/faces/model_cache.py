"""Files the face models are made into once per machine and then read: the identity ResNet as
an ONNX graph (``dlib_resnet``) and dlib's frontal face detector in its own file format.

``get_frontal_face_detector`` rebuilds the detector from a copy compiled into dlib on every call
(~0.4 s); loading the same detector from a file it saved takes ~2 ms and gives the same boxes,
scores and sub-detectors (checked on 53 photos). Each intake worker, and each process that
checks faces, paid the 0.4 s at its start.

``cached_file`` makes a file at most once: one process at a time (a lock file in the folder,
released by the kernel when its holder dies), written under a temporary name and renamed, so
a process that dies while writing leaves no file, only its temporary one, which the next maker
deletes (under the lock, any such file is a dead writer's).
"""

from __future__ import annotations

import fcntl
import logging
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """One folder per machine user, shared by every service home (the files depend only on the
    installed packages)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "selfie-lora" / "faces"


def cached_file(folder: Path, name: str, make: Callable[[Path], None]) -> Path | None:
    """``folder/name``, made by ``make(path)`` (which writes the file at ``path``) if it is not
    there yet; None when the folder cannot be written (the caller then does without)."""
    target = folder / name
    if target.is_file():
        return target
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock = (folder / ".convert.lock").open("a+b")
    except OSError as exc:
        logger.warning("cannot keep %s in %s (%s)", name, folder, exc)
        return None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.is_file():
            return target  # another process made it while this one waited
        for stale in folder.glob(f".{name}.*"):
            stale.unlink(missing_ok=True)
        started = time.perf_counter()
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.")
        os.close(fd)
        try:
            make(Path(tmp))
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        logger.info("made %s in %.1f s (once per machine): %s", name,
                    time.perf_counter() - started, target)
        return target


def frontal_face_detector(cache_dir: Path | None = None) -> Any:
    """dlib's frontal face detector, loaded from the cache (made there the first time)."""
    import dlib

    folder = cache_dir or default_cache_dir()
    name = f"frontal_face_detector-dlib-{dlib.__version__}.svm"
    path = cached_file(folder, name,
                       lambda tmp: dlib.get_frontal_face_detector().save(str(tmp)))
    if path is not None:
        try:
            return dlib.fhog_object_detector(str(path))
        except RuntimeError as exc:  # not a file dlib wrote: remade on the next start
            logger.warning("the cached face detector %s cannot be read (%s): deleting it",
                           path, exc)
            path.unlink(missing_ok=True)
    return dlib.get_frontal_face_detector()
