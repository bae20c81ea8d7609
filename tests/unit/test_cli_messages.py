"""What the command line tells a user, where the words depend on the training's state."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest

from selfie_lora.cli import (
    _data_shown,
    _fmt,
    being_scored_message,
    handed_back_message,
    probe_change,
)
from selfie_lora.config import Settings
from selfie_lora.domain.entities import Training, TrainingStatus
from selfie_lora.domain.recipes import get_recipe

_TRAINING = Training(
    id="t1", model_id="m1", dataset_id="d1", backend="local", status=TrainingStatus.PROCESSING,
    is_retraining=False, trigger_word="abc12d", destination="local/x",
    trainer_version="local-tiny-v2", recipe=get_recipe("local-tiny-v2"), preserved={},
    created_at=datetime(2026, 1, 1, tzinfo=UTC), step=20, total_steps=40,
)


def test_a_training_handed_back_mid_way_continues_from_its_checkpoint() -> None:
    message = handed_back_message(_TRAINING, checkpoint_step=20)
    assert "(processing at step 20/40, its checkpoint of step 20 kept) waits in the queue" \
        in message
    assert "continues it from that checkpoint" in message


def test_a_training_handed_back_before_its_first_checkpoint_claims_none() -> None:
    # The status as the refusals of train and resume name it afterwards ("starting at step
    # 0/40"), and no checkpoint claimed where none was written.
    starting = dataclasses.replace(_TRAINING, status=TrainingStatus.STARTING, step=0)
    message = handed_back_message(starting, checkpoint_step=None)
    assert "(starting at step 0/40, no checkpoint yet) waits in the queue" in message
    assert "starts it over from step 0" in message
    assert "kept" not in message
    assert "is queued" not in message


def test_a_training_whose_child_finished_while_handed_back_is_only_scored() -> None:
    done = dataclasses.replace(_TRAINING, step=40, version_id="v1")
    message = handed_back_message(done, checkpoint_step=40)
    assert "its version stored, to be scored" in message
    assert "checkpoint" not in message


def test_a_replicate_training_handed_back_says_its_run_goes_on() -> None:
    # Replicate trainings keep no local checkpoint, but the remote run goes on and the next
    # worker adopts it: the operator was told it "starts it over from step 0".
    remote = dataclasses.replace(_TRAINING, backend="replicate", remote_id="r-abc",
                                 destination="acme/x", step=300, total_steps=1000)
    message = handed_back_message(remote, checkpoint_step=None)
    assert "starts it over" not in message  # old code: "... starts it over from step 0"
    assert "no checkpoint yet" not in message
    assert "(processing at step 300/1000, its Replicate run r-abc going on) waits in the " \
        "queue" in message
    assert "follows that run from where it is" in message


def test_a_server_on_the_scale_path_says_where_its_data_is_not_only_home(tmp_path: Path) -> None:
    # HOME holds only caches there: a start line naming it alone sent an operator to back up
    # the wrong folder (the scale-path review).
    scaled = Settings(home=tmp_path, database_url="postgresql+psycopg://app:pw@db:5432/prod",
                      storage_url="s3://selfie-prod/photos")
    shown = _data_shown(scaled)
    assert "postgresql+psycopg://app:***@db:5432/prod" in shown
    assert "s3://selfie-prod/photos" in shown
    assert f"caches in {tmp_path}" in shown
    assert ":pw@" not in shown
    assert _data_shown(Settings(home=tmp_path)) == f"data in {tmp_path}"
    files_at_home = _data_shown(Settings(home=tmp_path, storage_url=None,
                                         database_url="postgresql+psycopg://db/prod"))
    assert f"{tmp_path} (files)" in files_at_home


def test_a_database_password_given_as_a_query_parameter_is_masked_in_the_start_line(
        tmp_path: Path) -> None:
    # render_as_string(hide_password=True) masked only the userinfo password: '?password=...'
    # (the only place for one in the socket form) was printed and logged at every serve start.
    for url, masked in [
        ("postgresql+psycopg://postgres@127.0.0.1:5432/prod?password=s3cret",
         "postgresql+psycopg://postgres@127.0.0.1:5432/prod?password=***"),
        ("postgresql+psycopg:///prod?host=/run/pg&user=u&password=s3cret&sslpassword=s3cret",
         "postgresql+psycopg:///prod?host=/run/pg&user=u&password=***&sslpassword=***"),
        ("postgresql+psycopg://u:s3cret@db/prod?sslmode=require&token=s3cret",
         "postgresql+psycopg://u:***@db/prod?sslmode=require&token=***"),
    ]:
        shown = _data_shown(Settings(home=tmp_path, database_url=url,
                                     storage_url="s3://selfie-prod/photos"))
        assert "s3cret" not in shown
        assert f"data in SELFIE_LORA_DATABASE_URL {masked} and " in shown


def test_the_start_line_names_the_default_home_by_its_absolute_path(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The default HOME, ./.selfie-lora, was said as 'data in .selfie-lora': not which folder's,
    # while 'users create' run from another folder makes a second HOME there, whose key the
    # server answers 401 (walk-through of the README's "Start the service").
    monkeypatch.chdir(tmp_path)
    shown = _data_shown(Settings(home=Path(".selfie-lora")))
    assert shown == f"data in {tmp_path / '.selfie-lora'}"
    # A HOME named through a link keeps the name given (a restore keeps the link, README).
    (tmp_path / "target").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "target")
    assert _data_shown(Settings(home=Path("link"))) == f"data in {tmp_path / 'link'}"


def test_sqlite_with_s3_does_not_call_home_caches_only(tmp_path: Path) -> None:
    # The SQLite file is in HOME: 'this machine's caches in HOME' (diffcli review 5b).
    shown = _data_shown(Settings(home=tmp_path, storage_url="s3://selfie-prod/photos"))
    assert shown == (f"data in {tmp_path} (the database, and this machine's caches) and "
                     "s3://selfie-prod/photos (files)")


def test_a_database_url_shows_which_service_and_masks_a_url_hidden_in_a_flag() -> None:
    # diff2 review 5: 'service' (a pg_service.conf entry's name) was masked though it only says
    # which database, and SQLite's 'uri' flag was shown whatever it held, a whole URL included.
    from selfie_lora.database_url import database_url_shown

    assert database_url_shown("postgresql+psycopg:///?service=prod") == \
        "postgresql+psycopg:///?service=prod"
    assert database_url_shown("sqlite:///db.sqlite?mode=ro&uri=true") == \
        "sqlite:///db.sqlite?mode=ro&uri=true"
    hidden = database_url_shown("postgresql+psycopg://h/db?uri=postgresql://u:s3cret@h/db")
    assert "s3cret" not in hidden
    assert hidden.endswith("?uri=***")


def test_generate_without_an_active_version_while_a_training_runs_says_both() -> None:
    # The CLI's words for each reason the service gives; "a training is queued/running too" had
    # no test of its own (cligens).
    from selfie_lora.cli import _no_version_words
    from selfie_lora.services.generation import NotReady, NoVersionError

    def words(reason: str, training: str | None) -> str:
        ready = NotReady(reason=reason, training=training, message="the API's words")  # type: ignore[arg-type]
        return _no_version_words(NoVersionError(ready, user="ann"))

    held = ("ann's model has no active version: activate one with 'selfie-lora activate N "
            "--user ann' ('selfie-lora versions --user ann' lists them)")
    assert words("activate", "running") == f"{held}; a training is running too"
    assert words("activate", "queued") == f"{held}; a training is queued too"
    assert words("activate", None) == f"{held} or train again"
    assert words("wait", "queued") == "the API's words"


def test_compare_says_a_version_waits_to_be_scored_when_no_process_holds_its_training() -> None:
    """`compare` said "version 3 is being scored by the worker" of a version whose training was
    handed back in phase scoring (Ctrl-C of `train`) while no serve or worker ran: nothing was
    scoring it, and nothing would until one started."""
    now = datetime(2026, 1, 1, 12, tzinfo=UTC)
    handed_back = dataclasses.replace(_TRAINING, step=40, version_id="v3", lease_owner=None,
                                      lease_expires_at=None)
    said = being_scored_message(3, handed_back, now=now)
    assert "is being scored" not in said
    assert ("version 3 waits to be scored: its training t1 is held by no running process; a "
            "`selfie-lora serve` or `selfie-lora worker` running on these settings scores it in "
            "its turn (if none runs, start one)") in said
    held = dataclasses.replace(handed_back, lease_owner="host/w0",
                               lease_expires_at=datetime(2026, 1, 1, 12, 1, tzinfo=UTC))
    assert being_scored_message(3, held, now=now).startswith(
        "version 3 is being scored by a worker (its training t1 is in phase scoring)")


def test_compare_s_change_per_probe_is_signed_and_never_minus_zero() -> None:
    """``selfie-lora compare``'s "B - A" was "0.120" for a gain and "-0.000" for two probes
    scored 0.8003 and 0.8001, shown "0.800" and "0.800" beside it (found in review)."""
    assert probe_change(0.8003, 0.8001) == "+0.000"
    assert probe_change(0.5, 0.62) == "+0.120"
    assert probe_change(0.62, 0.5) == "-0.120"
    assert probe_change(None, 0.5) == "-"
    assert probe_change(0.5, None) == "-"


@pytest.mark.parametrize(("a", "b"), [(0.8004, 0.8006), (0.8006, 0.8004), (0.1235, 0.1244),
                                      (0.9995, 0.9994), (0.0004, 0.0006), (0.5, 0.5)])
def test_compare_s_change_per_probe_is_that_of_the_scores_shown(a: float, b: float) -> None:
    """"B - A" rounded the true change: 0.8004 and 0.8006, shown "0.800" and "0.801", gave
    "+0.000" beside them (found in review). It is the change of the scores as shown."""
    shown_a, shown_b = _fmt(a), _fmt(b)
    change = probe_change(a, b)
    # old code: "+0.000" for (0.8004, 0.8006), "-0.000" for (0.8006, 0.8004)...
    assert change == f"{Decimal(shown_b) - Decimal(shown_a):+.3f}".replace("-0.000", "+0.000")
