"""The deployment files in ``deploy/`` (Compose, systemd, the settings file) say only what this
version of selfie-lora understands: commands and options that exist, settings it reads, and a
HOME of its own for every process. Containers cannot run on these machines; the same processes
run in ``tests/e2e/test_scale_out.py``."""

from __future__ import annotations

import base64
import json
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import AliasChoices, ValidationError
from pydantic.fields import FieldInfo
from typer.testing import CliRunner

from selfie_lora.cli import app
from selfie_lora.config import Settings, settings_errors

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
APP_SERVICES = ("serve", "worker")


def env_names(name: str, field: FieldInfo) -> set[str]:
    """The environment variables the ``Settings`` field ``name`` is read from."""
    alias = field.validation_alias
    if isinstance(alias, AliasChoices):
        return {str(choice) for choice in alias.choices}
    return {f"SELFIE_LORA_{name.upper()}"}


def setting_names() -> set[str]:
    """Every environment variable ``Settings`` reads."""
    return set().union(*(env_names(name, field)
                         for name, field in Settings.model_fields.items()))


def env_file(path: Path) -> dict[str, str]:
    pairs = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            pairs[key.strip()] = value.strip()
    return pairs


def unit(path: Path) -> dict[str, list[str]]:
    """A systemd unit's keys (a key may repeat: Environment=)."""
    keys: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            keys.setdefault(key.strip(), []).append(value.strip())
    return keys


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    return loaded


def check_command(argv: list[str]) -> None:
    """``selfie-lora ARGS`` parses (an unknown command or option fails before --help runs)."""
    assert Path(argv[0]).name == "selfie-lora", argv
    result = CliRunner().invoke(app, [*argv[1:], "--help"])
    assert result.exit_code == 0, (argv, result.output)


def test_the_settings_file_names_only_settings_and_loads(tmp_path: Path) -> None:
    example = DEPLOY / "selfie-lora.env.example"
    unknown = set(env_file(example)) - setting_names()
    assert unknown == set(), f"not settings of selfie-lora: {unknown}"
    # Its secrets are placeholders that must be filled in: as shipped each stops every command
    # in one line (the webhook's was taken as a key, and every delivery failed its signature;
    # the secret key's, 41 characters, signed every copy's cookies with a key anyone can read;
    # the metrics token, the storage secret and the database password were accepted: /metrics
    # open to anyone who read this file, and the storage's Admin identity, deploy/s3.json's,
    # known to all: sec review finding 2).
    with pytest.raises(ValidationError) as caught:
        Settings(_env_file=example, home=tmp_path)  # type: ignore[call-arg]
    errors = settings_errors(caught.value)
    assert sorted(line.split(":")[0] for line in errors) == [
        "SELFIE_LORA_DATABASE_URL", "SELFIE_LORA_METRICS_TOKEN", "SELFIE_LORA_SECRET_KEY",
        "SELFIE_LORA_STORAGE_SECRET_ACCESS_KEY", "SELFIE_LORA_WEBHOOK_SECRET"]
    assert any("is a placeholder, not a key" in line and "token_urlsafe" in line
               for line in errors), errors
    assert not any("CHANGE-ME" in line for line in errors), errors  # values never printed
    filled = "whsec_" + base64.b64encode(bytes(32)).decode()
    settings = Settings(_env_file=example, home=tmp_path,  # type: ignore[call-arg]
                        webhook_secret=filled, secret_key="k" * 43, metrics_token="m" * 16,
                        storage_secret_access_key="s" * 40,
                        database_url="postgresql+psycopg://selfie:pw-of-mine@postgres:5432/selfie")
    assert settings.storage_url == "s3://selfie-lora/prod"
    assert settings.storage_endpoint == "http://s3:8333"
    assert settings.log_format == "json"
    assert settings.database_url is not None
    assert settings.database_url.startswith("postgresql+psycopg://")


# The settings (``Settings`` fields) the example leaves to the README's table: defaults that fit a
# deployment as it comes, or settings of the single-machine and local-GPU shapes it does not
# describe. Any other field is named in the example, set or as a ``#NAME=`` line: a new setting
# is put in one place or the other on purpose (DOWNLOAD_URL_SECONDS and DOWNLOAD_URL_NAMES, the
# companions of the DOWNLOAD_URLS the example sets, were in neither).
LEFT_TO_THE_README = frozenset({
    "alert_timeout", "allowed_trainers", "base_model", "blob_cache_gb", "body_timeout",
    "cache_dir", "device", "face_landmarks_68_noncommercial", "gate_tolerance", "gc_dataset_days",
    "gc_generation_days", "gc_grace_hours", "gc_interval_hours", "generation_threads",
    "header_timeout", "heartbeat_seconds", "home", "intake_warm_up", "intake_workers", "keep_originals",
    "key_rotation_grace_minutes", "lease_seconds", "local_isolation", "local_memory_mode",
    "local_stall_seconds", "max_attempts", "max_clock_skew_seconds", "max_generations_per_user",
    "max_json_bytes", "max_photos", "max_upload_bytes", "metrics_host", "metrics_port",
    "min_body_rate", "min_photos", "page_poll_seconds", "probe_count", "probe_size",
    "quality_gate", "reconcile_seconds", "replicate_base_url", "replicate_hardware",
    "replicate_max_retries", "replicate_poll_interval", "replicate_recipe", "session_days",
    "sign_in_max_failures", "sign_in_window_minutes", "sign_up_max_attempts", "signup",
    "storage_allow_http", "storage_connect_timeout", "storage_max_retries",
    "storage_retry_timeout", "storage_timeout", "trainer_version", "worker_threads",
})


def test_the_settings_file_names_every_setting_but_those_left_to_the_readme() -> None:
    text = (DEPLOY / "selfie-lora.env.example").read_text()
    named = set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]*)=", text, re.MULTILINE))
    missing, listed_twice = [], []
    for name, field in Settings.model_fields.items():
        env = env_names(name, field)
        if not env & named and name not in LEFT_TO_THE_README:
            missing.append(f"{name} (#{'= or #'.join(sorted(env))}=)")
        if env & named and name in LEFT_TO_THE_README:
            listed_twice.append(name)
    assert missing == [], (
        f"settings the example does not name: {', '.join(missing)}; add each to "
        f"deploy/selfie-lora.env.example (a commented line will do) or to LEFT_TO_THE_README")
    assert listed_twice == [], (
        f"named in the example and in LEFT_TO_THE_README: {listed_twice}; take each out of one")
    # A commented line is checked too: a misspelt #NAME= would otherwise name nothing.
    assert named <= setting_names(), f"the example names no such setting: {named - setting_names()}"
    assert LEFT_TO_THE_README - set(Settings.model_fields) == set()  # no longer settings


@pytest.mark.parametrize("key", ["CHANGE-ME-TO-32-OR-MORE-RANDOM-CHARACTERS",
                                 "my-own-key-change-me-before-going-live-please"])
def test_a_placeholder_secret_key_is_a_settings_error(tmp_path: Path, key: str) -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(home=tmp_path, secret_key=key)
    [line] = settings_errors(caught.value)
    assert line.startswith("SELFIE_LORA_SECRET_KEY: is a placeholder, not a key"), line
    assert key not in line  # a setting's value is never printed


@pytest.mark.parametrize("token", ["CHANGE-ME-METRICS-TOKEN", "x", "fifteen-chars-1"])
def test_a_placeholder_or_short_metrics_token_is_a_settings_error(tmp_path: Path,
                                                                  token: str) -> None:
    """The example file's placeholder, or a token short enough to guess, left /metrics and
    /readyz's reasons open (sec review finding 2)."""
    with pytest.raises(ValidationError) as caught:
        Settings(home=tmp_path, metrics_token=token)
    [line] = settings_errors(caught.value)
    assert line.startswith("SELFIE_LORA_METRICS_TOKEN: "), line
    assert token not in line
    assert Settings(home=tmp_path, metrics_token="s" * 16).metrics_token is not None


@pytest.mark.parametrize(("setting", "value", "variable"), [
    ("storage_secret_access_key", "CHANGE-ME-TOO", "SELFIE_LORA_STORAGE_SECRET_ACCESS_KEY"),
    ("database_url", "postgresql+psycopg://selfie:CHANGE-ME@postgres:5432/selfie",
     "SELFIE_LORA_DATABASE_URL"),
])
def test_the_storage_and_database_placeholders_are_settings_errors(
        tmp_path: Path, setting: str, value: str, variable: str) -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(home=tmp_path, **{setting: value})
    [line] = settings_errors(caught.value)
    assert line.startswith(f"{variable}: "), line
    assert "placeholder" in line, line
    assert "CHANGE-ME" not in line


def _compose_shell(command: list[str]) -> str:
    """A service's ``sh -c`` script as the container runs it (Compose's ``$$`` is ``$``)."""
    return " ".join(command).replace("$$", "$")


def test_compose_holds_no_secret_and_takes_them_from_the_settings_file(
        compose: dict[str, Any], tmp_path: Path) -> None:
    """compose.yaml wrote the PostgreSQL password CHANGE-ME, and deploy/s3.json the storage's
    Admin identity CHANGE-ME-TOO, the example file's AWS secret: published for downloads, every
    face and weights were one printed credential away (sec review finding 2). Now PostgreSQL
    and SeaweedFS take theirs from selfie-lora.env (the database URL's password, the AWS keys),
    and refuse to start while they are the placeholders."""
    text = (DEPLOY / "compose.yaml").read_text()
    assert "CHANGE-ME" not in text
    assert not (DEPLOY / "s3.json").exists()
    services = compose["services"]
    assert "POSTGRES_PASSWORD" not in services["postgres"].get("environment", {})
    for name in ("postgres", "s3"):
        assert services[name]["env_file"] == "selfie-lora.env", name
    # Each start script, run as the container would, with its program replaced by one that
    # prints what it was given.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for program in ("docker-entrypoint.sh", "weed"):
        fake = bin_dir / program
        fake.write_text('#!/bin/sh\necho "$POSTGRES_PASSWORD" "$@"; '
                        'cat "$(echo "$@" | sed -n "s/.*-s3.config=\\([^ ]*\\).*/\\1/p")" '
                        '2>/dev/null; exit 0\n')
        fake.chmod(0o755)

    def start(service: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        script = _compose_shell(services[service]["command"])
        return subprocess.run(["/bin/sh", "-c", script], capture_output=True, text=True,
                              env={"PATH": f"{bin_dir}:/usr/bin:/bin", "TMPDIR": str(tmp_path),
                                   **env}, check=False)

    example = env_file(DEPLOY / "selfie-lora.env.example")
    refused = start("postgres", example)
    assert refused.returncode != 0, refused
    assert "SELFIE_LORA_DATABASE_URL" in refused.stderr, refused
    ran = start("postgres", {**example, "SELFIE_LORA_DATABASE_URL":
                             "postgresql+psycopg://selfie:Pw_of-mine9@postgres:5432/selfie"})
    assert ran.returncode == 0, ran
    assert ran.stdout.split()[:2] == ["Pw_of-mine9", "postgres"], ran.stdout
    refused = start("s3", example)
    assert refused.returncode != 0, refused
    assert "AWS_SECRET_ACCESS_KEY" in refused.stderr, refused
    ran = start("s3", {**example, "AWS_SECRET_ACCESS_KEY": "s3-secret-of-mine"})
    assert ran.returncode == 0, ran
    config = json.loads(ran.stdout[ran.stdout.index("{"):])
    [identity] = config["identities"]
    assert identity["credentials"] == [{"accessKey": "selfie",
                                        "secretKey": "s3-secret-of-mine"}]


def test_compose_runs_real_commands_each_with_a_home_of_its_own(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"postgres", "redis", "s3", "serve", "worker"} <= set(services)
    named_mounts: dict[str, str] = {}
    for name in APP_SERVICES:
        service = services[name]
        check_command(service["command"])
        assert service["env_file"] == "selfie-lora.env"
        for key in service.get("environment", {}):
            assert key in setting_names(), (name, key)
        mounts = [str(v) for v in service["volumes"]]
        homes = [m for m in mounts if m.split(":")[-1] == "/home/selfie/data"
                 or m == "/home/selfie/data"]
        assert len(homes) == 1, (name, mounts)
        for mount in mounts:
            if ":" in mount:
                volume = mount.split(":")[0]
                assert volume not in named_mounts, f"{name} and {named_mounts.get(volume)} " \
                    f"share {volume}: processes of the scale path share no disk"
                named_mounts[volume] = name
    # The image's HOME is the folder mounted above.
    assert "ENV SELFIE_LORA_HOME=/home/selfie/data" in (DEPLOY / "Dockerfile").read_text()


def test_systemd_units_run_real_commands_with_homes_of_their_own() -> None:
    homes = set()
    for path in sorted((DEPLOY / "systemd").glob("*.service")):
        keys = unit(path)
        argv = shlex.split(keys["ExecStart"][0])
        check_command(argv)
        env = dict(e.split("=", 1) for e in keys.get("Environment", []))
        assert set(env) <= setting_names(), (path.name, env)
        home = env["SELFIE_LORA_HOME"]
        assert home not in homes
        homes.add(home)
        assert keys["StateDirectory"] == [home.removeprefix("/var/lib/")]
        assert keys["EnvironmentFile"] == ["/etc/selfie-lora/selfie-lora.env"]
    assert len(homes) == 2


def test_systemd_makes_each_home_its_owner_s_only() -> None:
    # StateDirectory= alone makes /var/lib/<name> 0755, and selfie-lora keeps the mode of a HOME
    # that is there: a worker's work/ (a training's LoRA, its sample pictures) sat in a folder
    # any local account could enter (security2 review workperm.sh).
    for path in sorted((DEPLOY / "systemd").glob("*.service")):
        assert unit(path)["StateDirectoryMode"] == ["0700"], path.name


def test_systemd_stops_signal_only_the_main_process() -> None:
    # systemd's default KillMode (control-group) sent the SIGTERM to the worker's training child
    # too, which died of it and failed the training the worker meant to hand back; the main
    # process stops its own children (Docker's stop signals PID 1 alone, as this does).
    for path in sorted((DEPLOY / "systemd").glob("*.service")):
        keys = unit(path)
        assert keys["KillSignal"] == ["SIGTERM"], path.name
        assert keys["KillMode"] == ["mixed"], path.name


# `pip install selfie-lora` (by name, with or without extras or options): the package is not
# published on PyPI, so that finds nothing, or a stranger's package should the name be taken.
_INSTALL_BY_NAME = re.compile(r"\binstall\s+(?:-\S+\s+)*[\"']?selfie-lora(?![\w./-])")


def test_installs_are_from_the_source_tree_never_the_name_on_a_registry() -> None:
    root = DEPLOY.parent
    for path in [root / "README.md", root / "ARCHITECTURE.md", *sorted(DEPLOY.rglob("*"))]:
        if not path.is_file():
            continue
        # One line, comment marks dropped: a command wraps across lines of the README and of
        # the Dockerfile's comments.
        text = re.sub(r"\s*\n\s*#?\s*", " ", path.read_text())
        found = _INSTALL_BY_NAME.search(text)
        assert found is None, f"{path.name} installs selfie-lora by name: {found.group(0)!r}"
    readme = (root / "README.md").read_text()
    assert 'pip install "/opt/selfie-lora/src[replicate,' in readme
    assert 'RUN pip install --no-cache-dir ".[' in (DEPLOY / "Dockerfile").read_text()


def test_every_process_keeps_the_face_models_in_a_cache_it_can_write(tmp_path: Path) -> None:
    """The units hide the home folder (ProtectHome) and make the rest of the system read-only
    (ProtectSystem=strict), so the default ~/.cache/selfie-lora/faces cannot be written there:
    each process then converted the face models again at every start, with warnings."""
    from selfie_lora.wiring import default_analyzer_factory

    for path in sorted((DEPLOY / "systemd").glob("*.service")):
        keys = unit(path)
        assert keys["ProtectHome"] == ["true"], path.name
        env = dict(e.split("=", 1) for e in keys.get("Environment", []))
        # What systemd makes writable for the unit's user despite ProtectSystem=strict.
        writable = ([Path("/var/cache") / d for d in keys.get("CacheDirectory", [])]
                    + [Path("/var/lib") / d for d in keys.get("StateDirectory", [])])
        settings = Settings(home=Path(env["SELFIE_LORA_HOME"].replace("%i", "1")),
                            cache_dir=env.get("SELFIE_LORA_CACHE_DIR"))
        faces = default_analyzer_factory(settings).model_cache_dir
        assert faces is not None, f"{path.name}: the face models go to ~/.cache (unwritable)"
        assert any(faces.is_relative_to(w) for w in writable), (path.name, faces, writable)
        # One folder for the machine's units, as the README says: converted once per machine.
        assert keys["CacheDirectory"] == ["selfie-lora"], path.name
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    # The image's cache is in its HOME volume, not in the container's own layer.
    assert "ENV SELFIE_LORA_CACHE_DIR=/home/selfie/data/cache" in dockerfile
