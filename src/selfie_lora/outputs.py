"""Files the command line and the demo write for the user (pictures, charts, LoRA exports)."""

from __future__ import annotations

from contextlib import suppress
from pathlib import Path


def partial_path(path: Path) -> Path:
    """Where ``write_whole`` writes ``path`` before it has all of it: hidden, beside it."""
    return path.with_name(f".{path.name}.part")


def write_whole(path: Path, data: bytes) -> None:
    """Write ``data`` under a temporary name beside ``path``, then rename it to ``path``: a
    process killed midway (Ctrl-C twice, the OOM killer) leaves the file that was there, or
    none, never a truncated picture under the final name, where nothing would write it again
    (a generation's pictures are named by its id). What a failed write left (a full disk) is
    removed; the ``OSError`` is the caller's to report."""
    partial = partial_path(path)
    try:
        # One found there is what an earlier write of the same name left when it was killed:
        # ours by its name. Removed, not written into: a link there had its target overwritten,
        # then took the final name itself.
        partial.unlink(missing_ok=True)
        partial.write_bytes(data)
        partial.replace(path)
    except OSError:
        with suppress(OSError):
            partial.unlink()
        raise
