"""The wiring's setup warnings, said once a process (a secret without its URL, Replicate without
a token, a base model that is no FLUX.1 folder) however many threads build the services at once.
Found in review: each flag was checked, then set (``is_set`` then ``set`` on a
``threading.Event``), so two threads building an alerter or trainers together could both find it
unset and both warn."""

from __future__ import annotations

import base64
import contextlib
import logging
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from pydantic import SecretStr

from selfie_lora import wiring
from selfie_lora.config import Settings

THREADS = 4
# A signing secret as Standard Webhooks gives it (32 bytes, base64).
SECRET = SecretStr("whsec_" + base64.b64encode(bytes(range(32))).decode())


class RacingFlag(threading.Event):
    """A flag whose every look waits (up to half a second) until all the threads have looked:
    the worst interleaving, every thread checking before any sets, made certain. A look made
    under a lock that the others wait on finds the barrier broken and goes on at once."""

    def __init__(self) -> None:
        super().__init__()
        self._all_looked = threading.Barrier(THREADS, timeout=0.5)

    def is_set(self) -> bool:
        seen = super().is_set()
        with contextlib.suppress(threading.BrokenBarrierError):
            self._all_looked.wait()
        return seen


def _alerter(tmp_path: Path) -> None:
    wiring.default_alerter(Settings(home=tmp_path, alert_secret=SECRET),
                           announce=True)


def _webhook_url(tmp_path: Path) -> None:
    wiring.default_webhook_url(Settings(home=tmp_path, trainer="replicate",
                                        replicate_owner="acme", public_url=None,
                                        webhook_secret=SECRET),
                               replicate_trainer=True)


def _no_token(tmp_path: Path) -> None:
    wiring._say_replicate_has_no_token(Settings(home=tmp_path, trainer="replicate",
                                                replicate_owner="acme",
                                                replicate_api_token=None))


def _base_model(tmp_path: Path) -> None:
    wiring._say_the_base_model_is_missing(Settings(home=tmp_path,
                                                   base_model=str(tmp_path / "no-flux")))


CASES: dict[str, tuple[str, Callable[[Path], None], str]] = {
    "alerts": ("_unsent_alerts_said", _alerter, "SELFIE_LORA_ALERT_SECRET is set"),
    "webhooks": ("_unsigned_webhooks_said", _webhook_url, "SELFIE_LORA_WEBHOOK_SECRET is set"),
    "replicate-token": ("_no_token_said", _no_token, "REPLICATE_API_TOKEN is not set"),
    "base-model": ("_base_model_said", _base_model, "SELFIE_LORA_BASE_MODEL:"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_threads_building_at_once_warn_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        case: str) -> None:
    flag, build, words = CASES[case]
    monkeypatch.setattr(wiring, flag, RacingFlag())
    caplog.set_level(logging.WARNING, logger="selfie_lora.wiring")
    failed: list[BaseException] = []

    def run() -> None:
        try:
            build(tmp_path)
        except BaseException as exc:  # said by the assert below
            failed.append(exc)

    threads = [threading.Thread(target=run) for _ in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert not failed
    said = [r.getMessage() for r in caplog.records if words in r.getMessage()]
    assert len(said) == 1, said  # old code: one warning per thread (4)
    assert getattr(wiring, flag).is_set()
