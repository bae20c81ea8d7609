"""SELFIE_LORA_QUEUE_URL is checked in the form the queue reads it, not only by its scheme.
Found in review: redis://host/abc was accepted and Redis used database 0 (another deployment's,
maybe), redis:/host failed only after HOME and its database were made, sqlite:///:memory: gave
each process a queue of its own (no training ever reached a worker) and sqlite:// made a folder
named 'sqlite:'."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from selfie_lora.config import Settings, settings_errors

PASSWORD = "pw_SECRET_q"


@pytest.mark.parametrize(("url", "said"), [
    ("redis:/127.0.0.1:6379/15", "names no host"),
    ("redis://127.0.0.1:6379/abc", "its database is not a number"),
    ("redis://127.0.0.1:6379/l5", "its database is not a number"),
    (f"redis://:{PASSWORD}@127.0.0.1:6379/x", "its database is not a number"),
    # Another script's digits passed isdecimal() and redis-py read them as a database
    # (redis://h/\u0661, Arabic-Indic 1: database 1) (found in review).
    ("redis://127.0.0.1:6379/\u0661", "its database is not a number in ASCII digits"),
    ("redis://127.0.0.1:6379/\uff11", "its database is not a number in ASCII digits"),
    ("redis://127.0.0.1:6379/1\u0660", "its database is not a number in ASCII digits"),
    ("redis://", "names no host"),
    ("redis:///0", "names no host"),
    ("rediss://h:notaport/0", "its port is not a number"),
    ("redis://h:99999/0", "its port is not a number"),
    ("sqlite://", "a sqlite URL names no file"),
    ("sqlite:///", "a sqlite URL names no file"),
    ("sqlite://queue.db", "a sqlite URL names no file"),
    ("sqlite:///:memory:", "an in-memory SQLite queue"),
    ("garbage", "must be unset"),
])
def test_a_queue_url_that_cannot_work_is_a_settings_error(tmp_path: Path, url: str,
                                                          said: str) -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(home=tmp_path, queue_url=url)
    lines = settings_errors(caught.value)
    assert len(lines) == 1, lines
    assert lines[0].startswith("SELFIE_LORA_QUEUE_URL: must be unset"), lines
    assert said in lines[0], lines
    assert PASSWORD not in lines[0]


@pytest.mark.parametrize("url", [
    "redis://redis:6379/0", "redis://127.0.0.1:6379/15", "redis://127.0.0.1:6379",
    "redis://127.0.0.1/", f"rediss://user:{PASSWORD}@redis.example.com:6380/3",
    "redis://[::1]:6379/2", "sqlite:////var/lib/selfie/queue.db", "sqlite:///queue.db",
])
def test_the_forms_readme_documents_are_settings(tmp_path: Path, url: str) -> None:
    assert Settings(home=tmp_path, queue_url=url).queue_url == url
