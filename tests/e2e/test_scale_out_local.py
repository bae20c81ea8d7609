"""The scale path with no shared disk (``test_scale_out.py`` says what is run and checked), on
the local tiny FLUX trained by the workers: a file of its own, apart from the Replicate stand-in's
run, so that pytest-xdist (--dist loadfile) can put the two long runs on different workers."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.test_scale_out import the_whole_cycle
from tests.support.s3 import S3Server

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis]


@pytest.mark.parametrize("backend", ["local"])
def test_processes_that_share_no_disk_run_the_whole_cycle(
        backend: str, tmp_path: Path, postgres_database: str, redis_queue: str,
        s3_server: S3Server) -> None:
    the_whole_cycle(backend, tmp_path, postgres_database, redis_queue, s3_server)
