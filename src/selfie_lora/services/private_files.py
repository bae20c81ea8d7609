"""Files and folders a training writes under HOME/work, readable by their owner only.

A training's LoRA, its checkpoints and its sample pictures are the user's likeness. HOME is made
0700 when selfie-lora makes it, but one that is already there keeps its mode (systemd's
``StateDirectory=`` makes it 0755), and the umask (022) made the work folders 0755 and the LoRA
and samples 0644: any local account read a running training's LoRA and the pictures of a face
(security2 review workperm.sh). Checkpoints and blobs were already written through ``mkstemp``
(0600 whatever the umask); these helpers do the same for the rest."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

PRIVATE_FOLDER_MODE = 0o700


def private_folders(folder: Path) -> Path:
    """``folder``, and each missing folder above it, made 0700 (``mkdir(parents=True)`` makes
    the ones above with the umask's mode, 0755). A folder already there is left as it is (HOME
    may be the operator's own); what goes into the new ones is private. Returns ``folder``."""
    missing = []
    while not folder.is_dir():
        missing.append(folder)
        folder = folder.parent
    for each in reversed(missing):
        each.mkdir(mode=PRIVATE_FOLDER_MODE, exist_ok=True)  # another worker may make it too
    return missing[0] if missing else folder


def fsync_dir(folder: Path) -> None:
    """Makes a rename in ``folder``, or a file made there, durable (one small write of the
    directory's own data). Here, not in the storage adapters that use it too: the erase's hold
    (``services.gc``) needs it, and services import no adapter."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def private_replacement(path: Path) -> Iterator[BinaryIO]:
    """A file to write that becomes ``path`` whole once the block ends (renamed into place: a
    reader never sees half of it), 0600 from its first byte whatever the umask (``mkstemp``).
    A block that raises leaves nothing behind."""
    fd, staged = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
        os.replace(staged, path)
    except BaseException:
        Path(staged).unlink(missing_ok=True)
        raise
