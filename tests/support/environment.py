"""The developer's shell kept out of the tests: its selfie-lora settings (``SELFIE_LORA_*``, and the
unprefixed variables that ``Settings`` and the S3 client read) would otherwise reach every
``Settings()`` built here, every command run in this process, and every process a test starts
(they inherit this one's environment): a shell with ``SELFIE_LORA_DATABASE_URL`` set to a real
database had tests make users there. ``tests/conftest.py`` removes them when pytest starts."""

from __future__ import annotations

from collections.abc import Iterable

from pydantic import AliasChoices

from selfie_lora.config import Settings

# Variables that the tests read, not selfie-lora: a seed to replay a failure with, a folder of
# photos, where to write screenshots, and the test databases (SELFIE_LORA_TEST_*). Kept.
TEST_KNOBS = frozenset({"SELFIE_LORA_FAULT_SEED", "SELFIE_LORA_CHECKPOINT_SEED",
                        "SELFIE_LORA_PEOPLE_PHOTOS", "SELFIE_LORA_SCREENSHOTS"})
TEST_PREFIX = "SELFIE_LORA_TEST_"

# The settings read under names of their own: REPLICATE_API_TOKEN, the AWS variables,
# FORWARDED_ALLOW_IPS (each field's validation_alias), so a setting added later is covered too.
UNPREFIXED = frozenset(
    alias for field in Settings.model_fields.values()
    if isinstance(field.validation_alias, AliasChoices)
    for alias in field.validation_alias.choices
    if isinstance(alias, str) and not alias.startswith("SELFIE_LORA_"))


def is_outside_setting(name: str) -> bool:
    """Whether the variable ``name`` configures selfie-lora (and so is no test's to read). Every
    ``AWS_*`` variable: obstore's S3 store reads any it knows (a session token, a profile, a
    checksum rule) besides the ones that ``Settings`` names. Whatever the case of ``name``:
    pydantic-settings reads the environment case-insensitively (``selfie_lora_database_url``
    configures ``Settings`` as the upper-case name does)."""
    name = name.upper()
    if name.startswith("SELFIE_LORA_"):
        return not name.startswith(TEST_PREFIX) and name not in TEST_KNOBS
    return name.startswith("AWS_") or name in UNPREFIXED or name in OTHER_READ


# Read by selfie-lora though no setting: prometheus_client's multiprocess folder (the metrics
# adapter and prometheus_client itself switch to files there when it is set).
OTHER_READ = frozenset({"PROMETHEUS_MULTIPROC_DIR"})


def outside_settings(names: Iterable[str]) -> list[str]:
    """The names among ``names`` that ``is_outside_setting``, sorted."""
    return sorted(name for name in names if is_outside_setting(name))
