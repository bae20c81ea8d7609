"""Every number among the settings has a finite upper bound, said in one line naming the
variable when the settings are read. Found in review: "inf" (a natural way to type "keep
forever") or 1e12 passed the GC_* settings' lower bounds, and every command then stopped with an
OverflowError traceback, after HOME and its databases had been made."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from selfie_lora.config import Settings, settings_errors


def errors_of(tmp_path: Path, **values: object) -> list[str]:
    with pytest.raises(ValidationError) as caught:
        Settings(home=tmp_path, **values)  # type: ignore[arg-type]
    return settings_errors(caught.value)


@pytest.mark.parametrize(("name", "value"), [
    ("gc_dataset_days", "inf"), ("gc_dataset_days", "1e10"), ("gc_generation_days", "inf"),
    ("gc_grace_hours", "1e12"), ("gc_grace_hours", "inf"), ("gc_interval_hours", "1e12"),
    ("gc_interval_hours", "-inf"), ("blob_cache_gb", "inf"), ("blob_cache_gb", "1e300"),
    ("replicate_poll_interval", "inf"), ("replicate_poll_interval", "1e9"),
    ("local_stall_seconds", "inf"), ("local_stall_seconds", "1e12"),
    ("replicate_max_retries", 10**9), ("min_body_rate", 10**23), ("alert_timeout", "inf"),
    ("session_days", "inf"),
    # Old code: accepted; serve and worker started threads for ever, gigabytes deep, deaf to
    # SIGTERM.
    ("worker_threads", "99999999999999999999"), ("worker_threads", 257),
    ("min_photos", 10**6), ("max_photos", 10**6),
    ("max_clock_skew_seconds", "inf"), ("max_clock_skew_seconds", -1),
])
def test_an_infinite_or_huge_number_is_a_settings_error(tmp_path: Path, name: str,
                                                        value: object) -> None:
    lines = errors_of(tmp_path, **{name: value})
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"SELFIE_LORA_{name.upper()}: "), lines


def test_the_largest_values_still_build_what_uses_them(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, gc_dataset_days=36500, gc_generation_days=36500,
                        gc_grace_hours=876000, gc_interval_hours=8760)
    assert settings.gc_policy.dataset_age is not None
    assert settings.gc_interval is not None
    assert Settings(home=tmp_path, gc_dataset_days=0).gc_policy.dataset_age is None  # forever


@pytest.mark.parametrize("where", ["a-file", "a-file/cache"])
def test_a_cache_dir_where_a_file_is_is_a_settings_error(tmp_path: Path, where: str) -> None:
    # Found in review: serve started, and each download warned 'Not a directory' without
    # naming SELFIE_LORA_CACHE_DIR.
    (tmp_path / "a-file").write_text("not a folder")
    assert errors_of(tmp_path, cache_dir=tmp_path / where) == [
        f"SELFIE_LORA_CACHE_DIR: {tmp_path / 'a-file'} is a file, not a folder; name a folder"]
    assert Settings(home=tmp_path, cache_dir=tmp_path / "new" / "cache").cache_dir is not None
