"""Where sign-in leads (``next``): a path on this site only."""

from __future__ import annotations

import pytest

from selfie_lora.web.pages import _local_target


@pytest.mark.parametrize("target", [
    "/\\evil.example", "/\\\\evil.example", "\\\\evil.example", "/photos\\..\\\\evil.example",
    "/\x00/evil.example", "/\r\nLocation: //evil.example", "/\x7f/evil.example",
])
def test_a_backslash_or_a_control_character_never_leads_anywhere_but_home(target: str) -> None:
    """A browser reads a Location's "/\\" as "//", another host: the check let "/\\evil.com"
    through, and only Starlette's quoting of the Location (%5C) kept it on this site (sec
    review hardening 2). Refused here, whatever the response class does."""
    assert _local_target(target) == "/photos"  # old code: the target as it was


@pytest.mark.parametrize("target", ["/versions?a=1&b=2", "/generate?prompt=a%20b", "/photos"])
def test_a_local_path_is_kept(target: str) -> None:
    assert _local_target(target) == target
