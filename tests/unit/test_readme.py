"""What README.md tells a user to type works, and what it says of the rules matches the code."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from selfie_lora.config import Settings
from selfie_lora.domain.accounts import MAX_PASSWORD_LENGTH, MIN_PASSWORD_LENGTH, password_problem
from selfie_lora.domain.recipes import RECIPES
from selfie_lora.wiring import Services

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_text() -> str:
    """The README with each line break and the indentation after it as one space: an example
    wraps across lines."""
    return re.sub(r"\s*\n\s*", " ", README.read_text())


def test_the_password_examples_are_passwords_the_commands_take() -> None:
    text = readme_text()
    examples = re.findall(r"printf '([^']*)' \| selfie-lora users (?:create|password) (\S+)", text)
    assert examples, "the README shows no password read from standard input"
    for lines, name in examples:
        first, second = lines.split("\\n")[:2]
        assert first == second, lines
        assert password_problem(first, name=name) is None, (first, password_problem(
            first, name=name))
    # The rule is said, with the code's figures.
    assert f"at least {MIN_PASSWORD_LENGTH} characters** (at most {MAX_PASSWORD_LENGTH})" in text


# A default cell's value in words: the field's default is None or empty.
_NONE = {"unset", "none", "-"}
_UNITS = {"s": 1, "MiB": 1024 * 1024}


def settings_table() -> list[tuple[list[str], str, str]]:
    """The rows of README's settings table: the variables named in the first column, the
    default column and the meaning column."""
    text = README.read_text()
    table = text[text.index("### Settings"):text.index("### Photo checks")]
    rows = []
    for line in table.splitlines():
        if line.startswith("| `"):
            cells = re.split(r"(?<!\\)\|", line.strip().strip("|"))
            first, default, meaning = (cell.strip() for cell in cells)
            rows.append((re.findall(r"`([A-Z][A-Z0-9_]+)`", first), default, meaning))
    return rows


def field_names() -> dict[str, set[str]]:
    """Every ``Settings`` field and the environment variables it is read from."""
    from pydantic import AliasChoices

    from selfie_lora.config import Settings

    names = {}
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias
        names[name] = ({str(choice) for choice in alias.choices}
                       if isinstance(alias, AliasChoices) else {f"SELFIE_LORA_{name.upper()}"})
    return names


def test_the_settings_table_names_every_setting_and_only_settings() -> None:
    """The table is the README's only list of settings: SELFIE_LORA_DEVICE and four of
    Replicate's were missing from it."""
    rows = settings_table()
    in_table = {name for names, _default, meaning in rows
                for name in [*names, *re.findall(r"`((?:SELFIE_LORA|AWS)_[A-Z0-9_]+)`", meaning)]}
    fields = field_names()
    missing = sorted(min(names) for names in fields.values() if not names & in_table)
    assert missing == [], f"settings the README's table does not name: {missing}"
    known = set().union(*fields.values())
    assert {n for names, _d, _m in rows for n in names} - known == set()


def _default_matches(shown: str, default: object) -> bool | None:
    """Whether a default cell's part says ``default``; None when it is words, not a value."""
    literal = re.fullmatch(r"`([^`]+)`", shown)
    value = literal.group(1) if literal else shown
    if value in _NONE:
        return default in (None, ())
    number = re.fullmatch(r"(\d+(?:\.\d+)?)(?: (s|MiB))?", value)
    if number and isinstance(default, int | float) and not isinstance(default, bool):
        return float(number.group(1)) * _UNITS.get(number.group(2) or "s", 1) == default
    if value in ("true", "false"):
        return default is (value == "true")
    if literal:
        return value == str(default) or (isinstance(default, Path) and Path(value) == default)
    return None


def test_the_settings_table_says_the_defaults_config_has() -> None:
    from selfie_lora.config import Settings

    fields = field_names()
    by_variable = {v: name for name, variables in fields.items() for v in variables}
    checked = set()
    for names, default, _meaning in settings_table():
        parts = [part.strip() for part in default.split(",")]
        if len(parts) != len(names):
            continue  # a default said in words ('random, kept in HOME/secret_key')
        for variable, part in zip(names, parts, strict=True):
            if variable not in by_variable:
                continue  # an AWS variable, whose default is the AWS tools' own
            field = Settings.model_fields[by_variable[variable]]
            matches = _default_matches(part, field.default)
            if matches is not None:
                assert matches, f"{variable}: the README says {part}, config.py {field.default!r}"
                checked.add(variable)
    for variable in ("SELFIE_LORA_DEVICE", "SELFIE_LORA_REPLICATE_HARDWARE",
                     "SELFIE_LORA_REPLICATE_POLL_INTERVAL", "SELFIE_LORA_REPLICATE_MAX_RETRIES",
                     "SELFIE_LORA_REPLICATE_RECIPE", "SELFIE_LORA_HOME",
                     "SELFIE_LORA_MAX_UPLOAD_BYTES", "SELFIE_LORA_ALERT_TIMEOUT"):
        assert variable in checked, variable


def test_the_trainer_version_row_says_each_backend_s_default() -> None:
    """The row gave the local defaults only: an operator could not see which Replicate trainer
    version a new model is pinned to."""
    from selfie_lora.config import Settings

    (meaning,) = [m for names, _d, m in settings_table() if names == ["SELFIE_LORA_TRAINER_VERSION"]]
    unset = meaning[meaning.index("(unset:"):]
    for trainer, base_model in (("local", "tiny"), ("local", "/models/flux-dev"),
                                ("replicate", "tiny")):
        default = Settings(trainer=trainer, base_model=base_model, _env_file=None,
                           trainer_version=None, replicate_api_token="r8_x", replicate_owner="acme",
                           ).effective_trainer_version
        assert f"`{default}`" in unset, (trainer, base_model, default)


def test_the_shell_examples_define_the_variables_they_use() -> None:
    # The kohya export's curl used "$URL", defined nowhere.
    blocks = "\n".join(re.findall(r"```(?:sh|bash)\n(.*?)```", README.read_text(), re.S))
    used = set(re.findall(r"\$\{?([A-Z_][A-Z0-9_]*)", blocks))
    defined = set(re.findall(r"(?:^|\s)([A-Z_][A-Z0-9_]*)=", blocks, re.M))
    assert used - defined == set()


def test_the_readme_says_how_to_install_without_the_demo_or_the_tests() -> None:
    # Its commands use .venv/bin/selfie-lora; the only install steps were make demo and make
    # test, and `make install` was never named.
    makefile = (README.parent / "Makefile").read_text()
    assert re.search(r"^install:", makefile, re.M)
    assert "make install" in README.read_text()


def test_the_readme_starts_with_exactly_the_two_set_up_commands() -> None:
    # The project's promise: a fresh machine needs `make demo` and `make test`, and the README
    # opens with those two and nothing else (an added `make install` line once crept in).
    first_block = re.search(r"```(?:sh|bash)\n(.*?)```", README.read_text(), re.S)
    assert first_block is not None
    commands = [line.split("#")[0].strip() for line in first_block.group(1).splitlines()
                if line.split("#")[0].strip()]
    assert commands == ["make demo", "make test"]


def test_the_upload_row_says_a_refused_upload_was_received_not_refused_before_its_body() -> None:
    """The upload slot is taken by the route, after FastAPI parsed the multipart form (each part
    spooled to a temporary file): the README said a refused upload was refused before its body
    was read (found in review)."""
    row = next(line for line in README.read_text().splitlines()
               if line.startswith("| `POST /api/training/upload-zip`"))
    assert "before its body is read" not in row
    assert "refused before it is read into memory" in row
    assert "spooled to a temporary file" in row


def test_the_curl_examples_run_in_order() -> None:
    """Run as written, the retrain's start came right after the upload that starts the first
    training and answered 409 training_in_progress (found by the new-user review); the rollback
    named a literal '<id>'."""
    text = README.read_text()
    block = text[text.index("KEY=sl_..."):]
    block = block[:block.index("```")]
    upload = block.index("/api/training/upload-zip")
    start = block.index("/api/training/start")
    between = block[upload:start]
    assert "/api/training/progress" in between, between
    assert "until" in between, between
    assert "<id>" not in block


def test_the_404_of_a_user_with_no_model_is_said() -> None:
    """POST /api/generate of a user with no model yet answers 404 not_found, which the README
    never said (its generate row names only 422 no_version; found by the new-user review)."""
    text = readme_text()
    said = text[text.index("A user's model is made by their first upload."):]
    said = said[:said.index("| route | what |")]
    assert "404 `not_found`" in said
    for route in ("POST /api/generate", "GET /api/training/progress", "GET /api/model/log",
                  "GET /api/model/compare", "GET /api/model/quality/chart.png"):
        assert route in said, route


def test_a_newcomer_finds_the_first_steps_before_the_long_sections() -> None:
    """The steps from an account to a picture were spread over a long command table, after
    the design's Why, and nothing near the start named SELFIE_LORA_MIN_PHOTOS: a newcomer who
    ran `train` on the demo's 3 photos was refused with no pointer (new-user review)."""
    text = README.read_text()
    steps = text[text.index("## First steps"):text.index("## Why")]
    assert text.index("make demo") < text.index("## First steps")
    commands = re.search(r"```sh\n(.*?)```", steps, re.S)
    assert commands is not None
    for command in ("users create ann --password", "check demo-output/photos",
                    "SELFIE_LORA_MIN_PHOTOS=", "train demo-output/photos --user ann",
                    "versions --user ann", "generate ", "serve"):
        assert command in commands.group(1), command
    # Each step succeeds in order: the demo's 3 photos pass 'check' only once the minimum is 3.
    block = commands.group(1)
    assert block.index("SELFIE_LORA_MIN_PHOTOS=") < block.index("check demo-output/photos")


def test_the_readme_names_the_text_a_generated_png_carries() -> None:
    """Each stored PNG holds its seed and LoRA scale as PNG text, and no prompt: the README
    never said so (generation review #5)."""
    import io

    import pytest

    pytest.importorskip("PIL")
    from PIL import Image

    from selfie_lora.adapters.flux.generator import _png

    with Image.open(io.BytesIO(_png(Image.new("RGB", (4, 4)), seed=7, lora_scale=0.5))) as png:
        keys = set(png.text)  # type: ignore[attr-defined]
    assert keys == {"seed", "lora_scale"}
    said = readme_text()
    assert ("holds two PNG text chunks, `seed` (that picture's own seed) and `lora_scale`"
            in said)
    assert "it holds no prompt, no version and no trigger word" in said


def _commands() -> list[tuple[list[str], Any]]:
    """Every command of ``selfie-lora`` (a group's too) with its words: ``users keys create``."""
    import typer

    from selfie_lora.cli import app

    def walk(command: Any, path: list[str], ctx: Any) -> Iterator[tuple[list[str], Any]]:
        if not hasattr(command, "list_commands"):
            yield path, command
            return
        for name in command.list_commands(ctx):
            sub = command.get_command(ctx, name)
            yield from walk(sub, [*path, name], sub.context_class(sub, parent=ctx, info_name=name))

    root = typer.main.get_command(app)
    return list(walk(root, [], root.context_class(root, info_name="selfie-lora")))


def test_the_command_table_names_every_option_of_each_command() -> None:
    """``export --version`` (the same as its VERSION) was in the Exporting section's example
    only: the table's row, where a user looks a command up, did not name it."""
    rows = [line for line in README.read_text().splitlines() if line.startswith("| `selfie-lora ")]
    unnamed = []
    for path, command in _commands():
        # The rows whose command cell names each of its words (`users keys list\|create ...`).
        mine = " ".join(row for row in rows if f"`selfie-lora {path[0]}" in row.split(" | ")[0]
                        and all(re.search(rf"\b{re.escape(word)}\b", row.split(" | ")[0])
                                for word in path[1:]))
        assert mine, f"the command table has no row for selfie-lora {' '.join(path)}"
        for param in command.params:
            names = [*param.opts, *param.secondary_opts]
            if param.param_type_name == "option" and names != ["--help"] and not any(
                    re.search(rf"`[^`]*(?<![\w-]){re.escape(name)}(?![\w-])", mine)
                    for name in names):
                unnamed.append(f"selfie-lora {' '.join(path)} {names[0]}")
    assert unnamed == []


def test_the_usage_lines_name_each_argument_as_the_command_table_does() -> None:
    """`check --help` said 'Usage: selfie-lora check [OPTIONS] {path}', `backup` '{dest}',
    `restore` '{source}' and `users keys revoke` '{user} {key_id}' where the table says PATH,
    DEST, SRC and NAME [KEY_ID], and `export` and `generations delete` said VERSION and ID: one
    command's argument in capitals, the next's in lower case, under other names."""
    rows = [line.split(" | ")[0] for line in README.read_text().splitlines()
            if line.startswith("| `selfie-lora ")]
    unnamed = []
    for path, command in _commands():
        mine = " ".join(row for row in rows if f"`selfie-lora {path[0]}" in row
                        and all(re.search(rf"\b{re.escape(word)}\b", row) for word in path[1:]))
        for param in command.params:
            if param.param_type_name != "argument":
                continue
            shown = param.metavar or param.name
            if not (shown.isupper() and re.search(rf"(?<![\w-]){shown}(?![\w-])", mine)):
                unnamed.append(f"selfie-lora {' '.join(path)} {shown}")
    assert unnamed == []


def test_the_first_steps_photos_are_there_after_the_step_they_follow() -> None:
    """First steps began "After `make demo` (or `make install`)" and then checked and trained
    `demo-output/photos`, which only the demo makes: after `make install` alone, the first
    `check` said `error: demo-output/photos is neither a folder nor a zip file` (walk-through)."""
    from selfie_lora.demo import DEMO_ENTRIES

    text = README.read_text()
    steps = text[text.index("## First steps"):text.index("## Why")]
    lead, block = steps.split("```sh", 1)
    lead = re.sub(r"\s+", " ", lead)
    named = set(re.findall(r"\bdemo-output/([\w.-]+)", block))
    assert named, "First steps no longer use the demo's photos: check what this test guards"
    # What First steps name under demo-output/ is what the demo writes there...
    assert named <= set(DEMO_ENTRIES), named
    # ... so they follow the demo, and say what to use where only `make install` ran.
    assert lead.startswith("## First steps After `make demo`,"), lead[:80]
    assert "after `make install` alone there is no such folder" in lead, lead


def test_the_layout_names_every_api_module_and_service() -> None:
    """The Layout under Development listed the API's modules as `training`, `model`, `likeness`,
    `generation`, `webhooks`, `keys` and the use cases as `users` ... `gc`: `api/account.py`
    (`DELETE /api/me`) and the services `erasure`, `backup` and `operations` were not named,
    so a newcomer looking for where an account is deleted did not find it (walk-through)."""
    import dataclasses
    import typing

    from selfie_lora import api, services, wiring

    text = readme_text()
    layout = text[text.index("Layout (see"):text.index("Tests: `tests/unit`")]
    service_part = layout[layout.index("- `services/`:"):layout.index("- `dataset/`:")]
    api_part = layout[layout.index("`api/` ("):layout.index("`web/` (")]
    # Every module of api/ that routes requests is named.
    api_dir = Path(api.__file__).parent
    routers = {path.stem for path in api_dir.glob("*.py") if "APIRouter(" in path.read_text()}
    assert routers, "no API module defines a router: check what this test guards"
    for name in sorted(routers):
        assert f"`{name}`" in api_part, name
    # Every service an entry point is handed (wiring.Services), and every *Service class.
    services_dir = Path(services.__file__).parent
    # wiring imports SQLAlchemy's Engine for type checking only (commands that open no
    # database do not load SQLAlchemy): its name is given here to resolve the hints.
    from sqlalchemy import Engine

    hints = typing.get_type_hints(wiring.Services, localns={"Engine": Engine})
    modules = {hints[f.name].__module__.rsplit(".", 1)[1]
               for f in dataclasses.fields(wiring.Services)
               if getattr(hints[f.name], "__module__", "").startswith("selfie_lora.services.")}
    modules |= {path.stem for path in services_dir.glob("*.py")
                if re.search(r"^class \w+Service\b", path.read_text(), re.M)}
    for name in sorted(modules - {"ports", "clock", "telemetry"}):
        assert f"`{name}`" in service_part, name


def test_the_route_table_names_every_route_of_the_api(settings: Settings,
                                                     services: Services) -> None:
    """The route table of Using it, which a user reads as the list of routes, had no row for
    `GET /readyz` and `GET /metrics` (the contract's names): they were only named in a
    `/healthz` row's aside and, pages later, under Scale path (walk-through)."""
    from selfie_lora.api.app import create_app

    text = README.read_text()
    table = text[text.index("| route | what |"):text.index("### Command line")]
    firsts = " ".join(re.split(r"(?<!\\)\|", line)[1] for line in table.splitlines()
                      if line.startswith("| `"))

    def shape(path: str) -> str:
        return re.sub(r"\{[^}]*\}", "{}", path)

    cells = shape(firsts)
    document = create_app(settings, services=services).openapi()
    missing = []
    for path, operations in document["paths"].items():
        for method in operations:
            if method == "head":
                continue
            # A row names the method then the path, perhaps after other routes of the row.
            said = re.search(rf"{method.upper()} [^`]*`?[^|]*?{re.escape(shape(path))}(?![\w/{{])",
                             cells)
            if f"{method.upper()} {shape(path)}" not in cells and said is None:
                missing.append(f"{method.upper()} {path}")
    assert not missing, missing


def test_the_readme_says_where_the_benchmarks_real_photos_come_from() -> None:
    """`bench/ingest.py --profile  # --sources people: 25 different real photos` named no
    folder: they are read from outside the repository, and where it is missing the script
    measures the three test photos instead (walk-through, from a checkout without it)."""
    import importlib.util

    root = README.parent
    spec = importlib.util.spec_from_file_location("bench_ingest", root / "bench" / "ingest.py")
    assert spec is not None
    assert spec.loader is not None
    ingest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ingest)
    text = readme_text()
    said = text[text.index("bench/ingest.py --profile"):text.index("On this project's 2-core")]
    people = Path("..") / ingest.PEOPLE.relative_to(root.parent)
    assert f"`--sources people` reads them from `{people.as_posix()}`" in said, said
    assert "from the three test photos instead" in said


def recipe_table() -> dict[str, dict[str, str]]:
    """The rows of the README's table of local recipes (section "Recipes and their quality
    knobs"), by recipe name: each column's heading (its backticks dropped) and cell."""
    section = README.read_text().split("#### Recipes and their quality knobs", 1)[1]
    lines = [line for line in section.split("\n\n", 3)[2].splitlines() if line.startswith("|")]
    head = [cell.strip().strip("`") for cell in lines[0].strip("|").split("|")]
    rows: dict[str, dict[str, str]] = {}
    for line in lines[2:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        name = re.match(r"`([^`]+)`", cells[0])
        assert name, line
        rows[name.group(1)] = dict(zip(head, (cell.strip("`") for cell in cells), strict=True))
    return rows


def test_the_recipe_table_says_what_each_local_recipe_is() -> None:
    rows = recipe_table()
    local = {name for name in RECIPES if name.startswith("local-")}
    assert set(rows) == local
    for name, row in rows.items():
        recipe = RECIPES[name]
        assert (int(row["steps"]), int(row["rank"]), float(row["lr"]), int(row["px"])) == (
            recipe.steps, recipe.lora_rank, recipe.learning_rate, recipe.resolution), name
        assert row["timestep_sampling"] == recipe.timestep_sampling, name
        assert row["lora_targets"] == recipe.lora_targets, name
        assert row["aspect_buckets"] == ("on" if recipe.aspect_buckets else "off"), name
        assert float(row["face_loss_weight"]) == recipe.face_loss_weight, name
        assert int(row["sample_every"]) == recipe.sample_every, name
        assert int(row["checkpoint_every"]) == recipe.checkpoint_every, name
    # The Replicate recipe, said in words below the table.
    replicate = RECIPES["replicate-person-v1"]
    assert (f"`steps: {replicate.steps}, lora_rank: {replicate.lora_rank}, learning_rate: "
            f"{replicate.learning_rate}, resolution: \"{replicate.resolution}\", batch_size: "
            f"{replicate.batch_size}`") in readme_text()
