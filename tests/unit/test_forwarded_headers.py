"""Whose ``X-Forwarded-For`` and ``X-Forwarded-Proto`` the API server believes: its TLS proxy's,
named by ``SELFIE_LORA_FORWARDED_ALLOW_IPS`` and handed to uvicorn by ``uvicorn_options``. Behind
a proxy that does not connect from 127.0.0.1 (Compose's gateway, a load balancer on another
machine) every browser had the proxy's address, so 20 failed sign-ins by anyone locked everyone
out, and the scheme stayed http (found in the security review)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from pydantic import ValidationError

from selfie_lora.api.server import uvicorn_options
from selfie_lora.config import Settings, settings_errors

PROXY = "172.17.0.1"  # Docker's gateway: a proxy on the Docker host connects from it


def seen_by_the_app(settings: Settings) -> dict[str, Any]:
    """The client address and scheme the app sees of a request the proxy forwards for
    203.0.113.9 over https, through the config uvicorn is given."""
    seen: dict[str, Any] = {}

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.update(client=scope["client"][0], scheme=scope["scheme"])

    config = uvicorn.Config(app, **uvicorn_options(settings))
    config.load()
    scope = {"type": "http", "scheme": "http", "client": (PROXY, 40000), "path": "/",
             "headers": [(b"x-forwarded-for", b"203.0.113.9"),
                         (b"x-forwarded-proto", b"https")]}
    asyncio.run(config.loaded_app(scope, None, None))
    return seen


def test_the_proxy_addresses_setting_reaches_uvicorn(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FORWARDED_ALLOW_IPS", raising=False)
    trusted = Settings(home=tmp_path, forwarded_allow_ips=" 10.0.0.5, 172.16.0.0/12 ")
    assert trusted.forwarded_allow_ips == "10.0.0.5,172.16.0.0/12"
    assert seen_by_the_app(trusted) == {"client": "203.0.113.9", "scheme": "https"}
    # Unset: uvicorn's default, the same machine only.
    assert seen_by_the_app(Settings(home=tmp_path)) == {"client": PROXY, "scheme": "http"}
    # Unset, uvicorn's own variable still counts (the README named it before the setting).
    monkeypatch.setenv("FORWARDED_ALLOW_IPS", PROXY)
    assert seen_by_the_app(Settings(home=tmp_path))["client"] == "203.0.113.9"


@pytest.mark.parametrize("value", ["proxy.internal", "10.0.0.5/24", "10.0.0.300"])
def test_a_proxy_address_uvicorn_would_not_read_is_a_settings_error(tmp_path: Path,
                                                                   value: str) -> None:
    # uvicorn takes a malformed entry as a literal no client address equals: nobody trusted.
    with pytest.raises(ValidationError, match="is not an IP address or network"):
        Settings(home=tmp_path, forwarded_allow_ips=value)


def test_uvicorn_s_own_variable_is_checked_as_the_setting_is(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Found in review: FORWARDED_ALLOW_IPS=proxy.local (the documented fallback) started serve,
    # trusting nobody, silently.
    monkeypatch.delenv("SELFIE_LORA_FORWARDED_ALLOW_IPS", raising=False)
    monkeypatch.setenv("FORWARDED_ALLOW_IPS", "proxy.local")
    with pytest.raises(ValidationError) as caught:
        Settings(home=tmp_path)
    assert settings_errors(caught.value) == [
        "SELFIE_LORA_FORWARDED_ALLOW_IPS: 'proxy.local' is not an IP address or network: the "
        "addresses the TLS proxy connects from, comma-separated (10.0.0.5,172.16.0.0/12), or * "
        "for any (read from this variable, else from uvicorn's FORWARDED_ALLOW_IPS)"]
    # The setting, when set, is the one read.
    monkeypatch.setenv("SELFIE_LORA_FORWARDED_ALLOW_IPS", "10.0.0.5")
    assert Settings(home=tmp_path).forwarded_allow_ips == "10.0.0.5"
