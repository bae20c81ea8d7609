"""SELFIE_LORA_PUBLIC_URL and SELFIE_LORA_REPLICATE_BASE_URL get the checks SELFIE_LORA_ALERT_URL
has (an http(s) URL with a host, a port 1-65535, no whitespace). Found in review: 'https://
example.com:99999', 'https://exa mple.com' or 'https://user:pw@example.com' as the public URL,
and 'api.replicate.com' or 'ftp://x' as Replicate's, started serve and worker and failed every
Replicate call or training later; a query or fragment had the webhook path appended after it."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from selfie_lora.config import Settings, settings_errors

PUBLIC = "SELFIE_LORA_PUBLIC_URL: must be the service's address as others reach it: "
REPLICATE = "SELFIE_LORA_REPLICATE_BASE_URL: must be Replicate's API address: "


@pytest.mark.parametrize(("name", "value", "said"), [
    ("public_url", "https://example.com:99999", "its port is not 1-65535"),
    ("public_url", "https://exa mple.com", "it holds a space"),
    ("public_url", "https://example.com/?x=1", "it holds a query"),
    ("public_url", "https://example.com/#f", "it holds a query"),
    ("public_url", "https://user:pw_SECRET@example.com", "user:password@"),
    ("public_url", "https://exa_mple!.com", "its host is not a host name"),
    ("replicate_base_url", "api.replicate.com", "https://api.replicate.com"),
    ("replicate_base_url", "ftp://x", "https://api.replicate.com"),
    ("replicate_base_url", "https://api.replicate.com:99999", "its port is not 1-65535"),
    ("replicate_base_url", "https://api.replicate .com", "it holds a space"),
])
def test_a_url_that_cannot_be_reached_is_a_settings_error(tmp_path: Path, name: str, value: str,
                                                          said: str) -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(home=tmp_path, **{name: value})  # type: ignore[arg-type]
    lines = settings_errors(caught.value)
    assert len(lines) == 1, lines
    assert lines[0].startswith(PUBLIC if name == "public_url" else REPLICATE), lines
    assert said in lines[0], lines
    assert "pw_SECRET" not in lines[0]


@pytest.mark.parametrize(("name", "value"), [
    ("public_url", "https://lora.example.com"), ("public_url", "https://lora.example.com/sub/"),
    ("public_url", "http://127.0.0.1:8000"), ("public_url", "http://[::1]:8000"),
    ("replicate_base_url", "https://api.replicate.com"),
    ("replicate_base_url", "http://127.0.0.1:5555"),
])
def test_the_forms_in_use_are_settings(tmp_path: Path, name: str, value: str) -> None:
    assert getattr(Settings(home=tmp_path, **{name: value}), name) == value  # type: ignore[arg-type]


@pytest.mark.parametrize("value", ["https://example.com/?", "https://example.com/#",
                                   "https://example.com/app?#"])
def test_a_public_url_ending_in_a_bare_question_mark_or_hash_is_refused(
        tmp_path: Path, value: str) -> None:
    # Review setrev 3: httpx reads a bare "?" or "#" as an empty query or fragment, so the
    # check passed, and Replicate was sent https://example.com/?/api/webhooks/replicate.
    with pytest.raises(ValidationError) as caught:
        Settings(home=tmp_path, public_url=value)
    assert settings_errors(caught.value) == [
        f"{PUBLIC}https://host[:port][/path]; it holds a query (?...), a fragment (#...) or "
        "user:password@"]


def test_a_cache_dir_that_cannot_be_checked_is_a_settings_error_not_a_traceback(
        tmp_path: Path) -> None:
    # Review setrev 2: an OSError from the check (a name too long, a folder above it this user
    # may not read) was a traceback in every command, users list included.
    with pytest.raises(ValidationError) as caught:
        Settings(home=tmp_path, cache_dir=tmp_path / ("x" * 300) / "cache")
    assert settings_errors(caught.value) == [
        "SELFIE_LORA_CACHE_DIR: cannot be checked (File name too long); name a folder this "
        "user can write"]


def test_a_home_that_cannot_be_checked_is_a_settings_error_not_a_traceback(
        tmp_path: Path) -> None:
    # As the cache folder's above: SELFIE_LORA_HOME with a name longer than the file system
    # takes made every command (users list, serve) die with OSError: File name too long from
    # its first look for the database.
    for home in (tmp_path / ("x" * 300), tmp_path / ("x" * 300) / "home"):
        with pytest.raises(ValidationError) as caught:
            Settings(home=home)
        assert settings_errors(caught.value) == [
            "SELFIE_LORA_HOME: cannot be checked (File name too long); name a folder this "
            "user can write"]
    assert Settings(home=tmp_path / "new" / "home").home == tmp_path / "new" / "home"
