"""Whether work runs on the event loop: a service method wrapped to note it at each call."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any


def noting_the_loop(fn: Callable[..., Any]) -> tuple[Callable[..., Any], list[bool]]:
    """``fn`` wrapped, and the list to which each call appends whether an event loop was
    running in its thread (blocking work there holds every other request of the server)."""
    on_loop: list[bool] = []

    def noting(**kwargs: Any) -> Any:
        try:
            asyncio.get_running_loop()
            on_loop.append(True)
        except RuntimeError:
            on_loop.append(False)
        return fn(**kwargs)

    return noting, on_loop
