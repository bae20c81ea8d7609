"""Lease owner names: a process of this machine and pid space that is gone is told apart from
one that runs, and nothing else is ever judged gone (another container sharing the hostname
counts its pids apart)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from selfie_lora.services.owners import default_owner, owner_is_gone, process_space

pytestmark = pytest.mark.skipif(not process_space(), reason="needs /proc (Linux)")


def ended_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_process_of_this_space_that_ended_is_gone_and_a_live_one_is_not() -> None:
    host, space = socket.gethostname(), process_space()
    pid = ended_pid()
    assert owner_is_gone(f"{host}:{pid}:0123abcd:{space}")
    assert not owner_is_gone(default_owner())  # this process
    assert not owner_is_gone(f"{host}:{os.getppid()}:0123abcd:{space}")  # alive


def test_nothing_it_cannot_judge_is_gone() -> None:
    host, space = socket.gethostname(), process_space()
    pid = ended_pid()
    other = "0" * 8 if space != "0" * 8 else "1" * 8
    # Another container with this hostname: its pids are not ours to look up.
    assert not owner_is_gone(f"{host}:{pid}:0123abcd:{other}")
    assert not owner_is_gone(f"{host}-other:{pid}:0123abcd:{space}")  # another host
    assert not owner_is_gone(f"{host}:{pid}:0123abcd")  # a name from before the space
    assert not owner_is_gone(f"{host}/0a1b2c3d/w0")  # a worker's name
    assert not owner_is_gone(None)
    assert not owner_is_gone("")


def test_a_pid_past_c_s_int_is_not_told_gone_nor_an_error() -> None:
    """A leftover's name is read from disk: a corrupt or planted one naming a pid of 2**31 or
    more made os.kill raise OverflowError, which failed the backup (or build) sweeping it with
    a traceback. Such a pid is left to the leftover's age, as another machine's is."""
    from selfie_lora.services.owners import process_gone, process_space

    here = process_space()
    assert here  # this machine's space is known (Linux)
    assert process_gone(2**31, here) is False
    assert process_gone(2**70, here) is False


def test_a_pid_that_is_no_ascii_number_is_not_told_gone_nor_an_error() -> None:
    """An owner's pid passed str.isdigit, which takes a superscript two ('²', that int()
    refuses: a ValueError) and any script's digits ('\u0661', Arabic-Indic 1, read as pid 1);
    5000 digits passed it too, past int()'s 4300 (found in review). Names we never write
    (a tampered row, a planted file name): not judged, as any other name not ours."""
    from selfie_lora.services.owners import read_scratch_mark

    host, space = socket.gethostname(), process_space()
    for pid in ("\u00b2", "1\u00b2", "\u0661", "\uff11", "9" * 5000):
        assert not owner_is_gone(f"{host}:{pid}:0123abcd:{space}"), pid[:20]
    # A leftover's mark (a file name, at most 255 bytes): another script's digits are no pid
    # (they were read as one).
    for pid in ("\u00b2", "\u0661", "\uff11", "1\u0660"):
        assert read_scratch_mark(f"{pid}-{space}") is None, pid
        assert read_scratch_mark(pid) is None, pid
    assert read_scratch_mark(f"12-{space}") == (12, space)


def test_a_link_is_judged_quiet_by_itself_not_by_what_it_names(tmp_path: Path) -> None:
    """``quiet_since`` walks a leftover folder; os.walk follows a link given as its top, so a
    link planted under a leftover's name (to / say) had the whole tree it names walked, and
    was judged by what lies there. The link's own time decides now."""
    import time

    from selfie_lora.services.owners import quiet_since

    target = tmp_path / "target"
    target.mkdir()
    (target / "fresh").write_bytes(b"written now")
    link = tmp_path / ".x.tar.1.partial"
    link.symlink_to(target, target_is_directory=True)
    long_ago = time.time() - 7200
    os.utime(link, (long_ago, long_ago), follow_symlinks=False)
    assert quiet_since(link, time.time() - 3600)
    assert not quiet_since(target, time.time() - 3600)  # the folder itself is walked


def test_a_scratch_mark_names_this_process_and_reads_back() -> None:
    """The name a tiny build's folder and a tar backup's scratch carry (``scratch_mark``), read
    back by the one reader both use: the pid with this space; the pid alone where the space is
    unknown."""
    from selfie_lora.services import owners

    assert owners.scratch_mark() == f"{os.getpid()}-{process_space()}"
    assert owners.read_scratch_mark(owners.scratch_mark()) == (os.getpid(), process_space())


def test_a_scratch_mark_without_a_known_space_is_the_pid_alone(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from selfie_lora.services import owners

    monkeypatch.setattr(owners, "process_space", lambda: "")
    assert owners.scratch_mark() == str(os.getpid())
    assert owners.read_scratch_mark(owners.scratch_mark()) == (os.getpid(), "")


@pytest.mark.parametrize(("mark", "read"), [
    ("123", (123, "")),  # an older backup's: the pid alone
    ("123-0fa5e1ce", (123, "0fa5e1ce")),  # a space
    ("123-unknown", (123, "")),  # an older tiny build's where its space was unknown
    ("0", (0, "")),  # read as written: the caller says whether pid 0 is one of its names
    ("x", None), ("", None), ("-0fa5e1ce", None), ("123-", None), ("123-XYZ", None),
    ("123-0fa5e1ce-1", None), ("²", None), ("1²", None),
])
def test_a_scratch_mark_is_read_as_both_old_formats_wrote_it(
        mark: str, read: tuple[int, str] | None) -> None:
    from selfie_lora.services.owners import read_scratch_mark

    assert read_scratch_mark(mark) == read
