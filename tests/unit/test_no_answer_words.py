"""Which database driver errors the repository takes for an outage (``_unreachable``) and, of
those, for a wait that got no answer (``_unanswered``: a reconcile pass and a worker's stop wait
on a hung server once, not once a call). Found in review: no test read the words one by one,
so a word dropped or added (a refused connection taken for a hang) went unseen."""

from __future__ import annotations

import psycopg
import pytest
from sqlalchemy.exc import OperationalError

from selfie_lora.adapters.db.repository import _unanswered, _unreachable

HOST = 'connection to server at "db" (10.0.0.5), port 5432 failed: '


@pytest.mark.parametrize(("said", "invalidated", "unanswered"), [
    ("no answer from the server in 20 s (the connection is closed)", False, True),
    (HOST + "timeout expired", False, True),
    ("connection timeout expired", False, True),
    ("could not receive data from server: Connection timed out", False, True),
    ("Multiple connection attempts failed. All failures were:\n- host: 'db', port: 5432, "
     "hostaddr: '10.0.0.5': " + HOST + "timeout expired", False, True),
    (HOST + "Connection refused\n\tIs the server running on that host and accepting TCP/IP "
     "connections?", False, False),
    ("server closed the connection unexpectedly\n\tThis probably means the server terminated "
     "abnormally", False, False),
    ("terminating connection due to administrator command", False, False),
    ("terminating connection due to idle-session timeout", True, False),
    ("canceling statement due to statement timeout", True, False),
], ids=["answer-timeout", "connect-timeout", "psycopg-connect-timeout", "kernel-timeout",
        "several-hosts-timeout", "refused", "closed", "administrator", "idle-session-timeout",
        "statement-timeout"])
def test_an_outage_is_told_unanswered_by_a_wait_that_ran_out_alone(
        said: str, invalidated: bool, unanswered: bool) -> None:
    exc = OperationalError("SELECT 1", None, psycopg.OperationalError(said),
                           connection_invalidated=invalidated)
    assert _unreachable(exc)
    assert _unanswered(exc) is unanswered
