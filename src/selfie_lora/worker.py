"""``selfie-lora worker``: a queue consumer only (the scale path: many of these, on GPU machines)."""

from __future__ import annotations

import logging

from selfie_lora.config import Settings
from selfie_lora.wiring import build_services

logger = logging.getLogger(__name__)


def run_worker(settings: Settings, *, threads: int | None = None, recover: bool = True) -> None:
    """Consume the queue until interrupted (SIGINT/SIGTERM stop it gracefully)."""
    services = build_services(settings)
    if recover:
        count = services.training.recover()
        if count:
            logger.info("re-queued %d unfinished training(s)", count)
    consumer = services.queue.consumer(
        workers=threads or settings.worker_threads, embedded=False
    )
    try:
        consumer.run()
    finally:
        services.close()
