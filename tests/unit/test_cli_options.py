"""Options out of range are usage errors (exit status 2) before anything starts: ``worker
--threads 0`` ran the default number of threads and ``--threads -1`` a worker that never took
work; ``serve --port 99999`` warmed up, then crashed with an OverflowError."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from selfie_lora.cli import app


# Were one accepted, the command would serve or work until stopped: fail it instead.
@pytest.mark.timeout(60)
@pytest.mark.parametrize(("args", "said"), [
    (["worker", "--threads", "0"], "greater than or equal to 1"),
    (["worker", "--threads", "-1"], "greater than or equal to 1"),
    # Old code: started threads for ever, gigabytes deep, deaf to SIGTERM.
    (["worker", "--threads", "99999999999999999999"], "less than or equal to 256"),
    (["worker", "--threads", "257"], "less than or equal to 256"),
    (["serve", "--port", "99999"], "less than or equal to 65535"),
    (["serve", "--port", "-1"], "greater than or equal to 0")])
def test_an_option_out_of_range_is_a_usage_error(args: list[str], said: str,
                                                 tmp_path: Path) -> None:
    result = CliRunner().invoke(app, args, env={"COLUMNS": "400",
                                                "SELFIE_LORA_HOME": str(tmp_path / "home")})
    assert result.exit_code == 2, result.output
    assert "Invalid value" in result.output
    assert said in result.output
