"""``selfie-lora demo``: the whole cycle, offline, on the embedded defaults (local backend, tiny
FLUX on the CPU). Every output lands under one folder, which the demo names at the end."""

from __future__ import annotations

import importlib.resources
import io
import logging
import os
import secrets
import shlex
import shutil
import sys
import time
from pathlib import Path

from PIL import Image
from rich.console import Console
from rich.table import Table

from selfie_lora.config import DATABASE_FILE, EmbeddedSettings, Settings
from selfie_lora.console import console as default_console
from selfie_lora.console import follow_training, print_report
from selfie_lora.dataset.limits import UploadedFile
from selfie_lora.domain.entities import Finding, Model, TrainingStatus, User
from selfie_lora.domain.plan import lora_scale_text
from selfie_lora.errors import ConfigError, InvalidInputError, SelfieLoraError
from selfie_lora.outputs import write_whole
from selfie_lora.services.generation import GenerationRequest
from selfie_lora.wiring import Services, build_services, clearing_home
from selfie_lora.worker import embedded_worker

DEMO_PHOTOS = ("obama.jpg", "obama2.jpg", "obama3.jpg")


# The package ships three distinct photos of one person, fewer than the five a real set needs
# (SELFIE_LORA_MIN_PHOTOS). Mirror images or crops would not make more: the photo check rejects
# them as copies, as it should. So the demo lowers the minimum for itself, and says so.
DEMO_MIN_PHOTOS = 2

# What the demo writes into its folder, and the file that says the folder is the demo's: a run
# replaces only these, so `--out .` (or a typo) can never delete a user's files.
DEMO_MARKER = ".selfie-lora-demo"
DEMO_ENTRIES = ("photos", "home", "generated")


class DemoFolderError(InvalidInputError):
    """``--out`` names a folder the demo did not make (or a file): nothing was touched."""


class DemoHomeInUseError(ConfigError):
    """A ``serve`` or ``worker`` runs on the earlier demo's ``home/`` (the ``serve`` line the
    demo printed): deleting it would leave that server answering from deleted files, so nothing
    was touched. Refused as ``restore`` is refused in the same case (exit status 1)."""


class DemoStartError(Exception):
    """The demo's services could not be built (``cause``, on ``settings``): said by the command
    as any command's start failure is, in one line, rather than as a traceback (a queue it
    cannot use, a full disk, a module not installed)."""

    def __init__(self, settings: Settings, cause: Exception) -> None:
        super().__init__(str(cause))
        self.settings = settings
        self.cause = cause


def prepare_demo_folder(out: Path) -> None:
    """Makes ``out`` the demo's folder, empty of what an earlier demo wrote there. A folder that
    does not exist or is empty is taken (and marked); one an earlier demo made (its marker, or
    exactly the demo's layout from before there was a marker) has the demo's entries replaced and
    anything else kept; any other folder, or a file, is refused before anything is written."""
    try:
        _take_folder(out)
    except OSError as exc:  # no permission, a read-only disk, a file on the way
        raise DemoFolderError(f"cannot use --out {out}: {exc.strerror or exc}") from None


def _take_folder(out: Path) -> None:
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise DemoFolderError(f"--out {out} is not a folder; nothing was changed")
        entries = {entry.name for entry in out.iterdir()}
        # `make demo` before the marker existed left exactly this layout: still the demo's.
        legacy = (bool(entries) and entries <= set(DEMO_ENTRIES)
                  and (out / "home" / DATABASE_FILE).is_file())
        if entries and DEMO_MARKER not in entries and not legacy:
            raise DemoFolderError(
                f"--out {out} is a folder the demo did not make and it is not empty; nothing "
                "was changed (name a new or empty folder)")
        home = out / "home"
        refused = (f"a server or worker runs on {home}: stop it first (Ctrl-C in the terminal "
                   "of the serve the demo printed); nothing was changed")
        try:
            # Held until home/ is gone: a serve starting meanwhile is refused, not emptied.
            with clearing_home(home, refused=refused):
                for name in DEMO_ENTRIES:
                    entry = out / name
                    if entry.is_dir() and not entry.is_symlink():
                        shutil.rmtree(entry)
                    elif entry.exists() or entry.is_symlink():
                        entry.unlink()
        except ConfigError as exc:
            raise DemoHomeInUseError(exc.message) from None
    out.mkdir(parents=True, exist_ok=True)
    # Written before anything else: a demo stopped half-way still leaves a folder it may reuse.
    (out / DEMO_MARKER).write_text(
        "This folder was made by `selfie-lora demo`: a new run replaces its photos/, home/ and "
        "generated/ and keeps anything else.\n", encoding="utf-8")


def build_demo_photos(target: Path) -> list[Path]:
    """Three photos of one person: public-domain photos shipped with the package (see
    ``demo_photos/SOURCE.md``), saved again as JPEGs."""
    target.mkdir(parents=True, exist_ok=True)
    written = []
    source = importlib.resources.files("selfie_lora") / "demo_photos"
    for name in DEMO_PHOTOS:
        data = (source / name).read_bytes()
        with Image.open(io.BytesIO(data)) as img:
            path = target / f"{Path(name).stem}.jpg"
            write_whole(path, _encoded(img.convert("RGB"), "JPEG", quality=92))
            written.append(path)
    return written


def _encoded(img: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **params)
    return buf.getvalue()


def _snapshot(services: Services, model: Model) -> dict[str, str]:
    version = services.models.active_version(model=model)
    return {
        "trigger word": model.trigger_word,
        "destination": model.destination,
        "trainer version": model.trainer_version,
        "LoRA scale": lora_scale_text(model.lora_scale) + (" (custom)" if model.lora_scale_is_custom else ""),
        "active version": f"v{version.number}" if version else "-",
        "versions": ", ".join(f"v{v.number}" for v in reversed(services.models.versions(
            user=services.users.get_by_name(name="demo")))),
    }


def _print_training(console: Console, services: Services, user: User, training_id: str) -> None:
    view = services.training.progress(user=user, training_id=training_id)
    training, version = view.training, view.version
    metrics = training.metrics
    kind = "retraining" if training.is_retraining else "first training"
    console.print(
        f"{kind} {training.status}: {training.total_steps} steps, flow-matching loss on the "
        f"training photos {float(metrics.get('eval_loss_before', 'nan')):.3f} -> "
        f"{float(metrics.get('eval_loss_after', 'nan')):.3f}, weights found by "
        f"{training.weights_method}"
    )
    if version is not None:
        console.print(f"likeness gate on v{version.number}: {version.gate_status} "
                      f"({version.gate_reason})")


def _changes_table(services: Services, user: User) -> Table:
    """What the retraining changed: the photos, the weights, the losses, the likeness."""
    v1, v2 = sorted(services.models.versions(user=user), key=lambda v: v.number)[-2:]
    columns = []
    for version in (v1, v2):
        training = services.training.progress(user=user, training_id=version.training_id).training
        dataset = services.intake.get(user=user, dataset_id=training.dataset_id)
        record = services.likeness.report(user=user, version_id=version.id).record
        scores = record.scores.headline() if record and record.scores else {}
        metrics = training.metrics
        columns.append({
            "photos": str(dataset.images_accepted),
            "photo set sha256": dataset.sha256[:12],
            "weights sha256": version.weights_sha256[:12],
            "final training loss": _num(metrics.get("final_loss")),
            "loss on the photos, before -> after": (
                f"{_num(metrics.get('eval_loss_before'))} -> "
                f"{_num(metrics.get('eval_loss_after'))}"),
            "probes with a face": _num(scores.get("face_share")),
            "probe sharpness": _num(scores.get("sharpness")),
            "gate": f"{version.gate_status}",
        })
    table = Table(title=f"what the retraining changed (v{v1.number} -> v{v2.number})")
    table.add_column("")
    table.add_column(f"v{v1.number}")
    table.add_column(f"v{v2.number}")
    for key in columns[0]:
        table.add_row(key, columns[0][key], columns[1][key])
    return table


def _num(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, int | float) else "-"


def _upload_and_train(console: Console, services: Services, user: User,
                      files: list[UploadedFile], findings: list[Finding], *, kind: str) -> None:
    """What a user does each time: upload the photos, (re)train, wait for the end."""
    uploaded = services.training.upload(user=user, read=lambda: (files, findings))
    training = uploaded.training
    assert training is not None
    with embedded_worker(services):
        done = follow_training(
            lambda: services.training.progress(user=user, training_id=training.id).training,
            out=console)
    if done.status is not TrainingStatus.SUCCEEDED:
        raise SelfieLoraError(f"the {kind} {done.status}: {done.error}")
    _print_training(console, services, user, done.id)


def running_executable(argv0: str | None = None) -> str:
    """The absolute path of the ``selfie-lora`` that runs now, for a command line the user pastes
    from any folder: ``sys.argv[0]`` when it is that executable (run as ``.venv/bin/selfie-lora``,
    or found on PATH), else the one beside this Python (``python -m``, tests), else on PATH."""
    name = sys.argv[0] if argv0 is None else argv0
    candidates = [Path(name)] if name and not name.endswith(".py") else []
    candidates.append(Path(sys.executable).parent / "selfie-lora")
    on_path = shutil.which("selfie-lora")
    if on_path:
        candidates.append(Path(on_path))
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            # abspath, not resolve: a venv's bin/ may be a symlink the user knows by its name.
            return os.path.abspath(candidate)
    return "selfie-lora"


def serve_command(home: Path, *, argv0: str | None = None) -> str:
    """The shell line that serves the demo's data: every part quoted, so a home with a space or
    a quote in it pastes as one argument, and absolute, so it pastes from any folder (`make
    demo`'s --out is the relative demo-output: pasted elsewhere, the line served a new, empty
    HOME)."""
    return (f"SELFIE_LORA_HOME={shlex.quote(str(home.absolute()))} "
            f"{shlex.quote(running_executable(argv0))} serve")


def print_serve_command(console: Console, home: Path, *, argv0: str | None = None) -> None:
    # soft_wrap: one line however narrow the terminal, or the pasted command breaks at the wrap.
    console.print(serve_command(home, argv0=argv0), markup=False, highlight=False, soft_wrap=True)


# The demo's pictures beside each version's own, in --out's generated/.
COMPARE_PNG = "compare-v1-v2.png"
LIKENESS_GRID_PNG = "likeness-v1-v2.png"
LIKENESS_CHART_PNG = "likeness-chart.png"


def where_everything_is(out: Path, settings: Settings) -> list[tuple[str, Path]]:
    """What the demo's closing table names, each path under ``out`` as the user gave it
    (relative to the folder the demo ran in, or absolute): the database was the settings' URL,
    resolved, the one absolute path among relative ones."""
    generated = out / "generated"
    return [
        ("photos used", out / "photos"),
        ("database", settings.home / DATABASE_FILE),
        ("stored photos, weights, images", settings.blob_dir),
        ("LoRA weights", settings.blob_dir / "weights"),
        ("generated images", generated),
        ("side-by-side v1 | v2", generated / COMPARE_PNG),
        ("likeness probes v1 | v2", generated / LIKENESS_GRID_PNG),
        ("likeness scores chart", generated / LIKENESS_CHART_PNG),
    ]


def demo_settings(out: Path) -> Settings:
    """The demo's settings: the embedded defaults (local backend, tiny FLUX) with its HOME under
    ``out``, none of them read from the environment (``EmbeddedSettings``)."""
    return EmbeddedSettings(home=out / "home", trainer="local", base_model="tiny",
                            local_isolation="inline", min_photos=DEMO_MIN_PHOTOS)


def run_demo(*, out: Path, console: Console = default_console) -> None:
    started = time.monotonic()
    # The demo tells its own story; the tiny model's 32-token text encoders also make diffusers
    # and transformers warn about every prompt they truncate, which here is noise, not news.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    for name in ("transformers", "diffusers", "selfie_lora"):
        logging.getLogger(name).setLevel(logging.WARNING if name == "selfie_lora" else logging.ERROR)
    prepare_demo_folder(out)
    photos_dir = out / "photos"
    build_demo_photos(photos_dir)
    settings = demo_settings(out)
    console.print(f"The demo trains on {len(DEMO_PHOTOS)} public-domain photos of one person, "
                  f"so it accepts sets of {DEMO_MIN_PHOTOS} or more; a real set needs 5 or more "
                  "(15-25 work best).")
    # The queue built now, as `train`'s is: the demo queues both trainings and its worker takes
    # them from that queue, so one it could not use (built at its first use) let it check the
    # photos, make the user and store a training, then follow that training for ever.
    try:
        services = build_services(settings, open_queue=True)
    except Exception as exc:
        raise DemoStartError(settings, exc) from exc
    try:
        console.rule("1. photo check")
        files, findings = services.intake.read_path(photos_dir)
        report = services.intake.check_files(files=files, findings=findings)
        print_report(report, title="photo check", out=console)
        if not report.trainable:
            raise SelfieLoraError("the demo photos are not trainable")

        # A password, so that the person running the demo can sign in to the web app on it.
        password = secrets.token_urlsafe(12)
        user, api_key = services.users.create(name="demo", password=password)
        # The first training uses all but the last photo; the retraining adds it, as a user
        # who found one more good photo would: a real retraining, on other data.
        first_files = [f for f in files if f.name != files[-1].name]
        console.rule(f"2. first training on {len(first_files)} photos")
        _upload_and_train(console, services, user, first_files, findings, kind="first training")
        before = _snapshot(services, services.models.get(user=user))

        console.rule("3. the user sets a LoRA scale; the configured trainer default changes")
        services.models.set_lora_scale(user=user, lora_scale=0.8)
        # Another recipe of the tiny model: one of FLUX.1's is refused on it (the settings'
        # check, and a start of a model pinned to it).
        settings.trainer_version = "local-tiny-v1"
        console.print("LoRA scale set to 0.8; SELFIE_LORA_TRAINER_VERSION now says "
                      "'local-tiny-v1' (the model stays pinned)")

        console.rule(f"4. retraining with one more photo ({files[-1].name}): {len(files)} photos")
        _upload_and_train(console, services, user, files, findings, kind="retraining")
        after = _snapshot(services, services.models.get(user=user))

        table = Table(title="before / after retraining")
        table.add_column("field")
        table.add_column("after first training")
        table.add_column("after retraining")
        table.add_column("kept")
        for field in before:
            same = before[field] == after[field]
            mark = "[green]yes[/green]" if same else "[yellow]changed[/yellow]"
            table.add_row(field, before[field], after[field], mark)
        console.print(table)
        console.print("LoRA scale changed only because the user set it between trainings; "
                      "versions grow by one per training.")
        console.print(_changes_table(services, user))

        console.rule("5. comparison and generation")
        gen_dir = out / "generated"
        gen_dir.mkdir()
        versions = services.models.versions(user=user)
        tiles = []
        for version in reversed(versions):
            g = services.generation.generate(user=user, request=GenerationRequest(
                prompt="portrait photo, studio light", seed=7, version_id=version.id))
            png = services.generation.image(user=user, generation_id=g.id, index=0)
            path = gen_dir / f"v{version.number}-seed7.png"
            write_whole(path, png)
            tiles.append(Image.open(io.BytesIO(png)).convert("RGB"))
            console.print(f"v{version.number}: {path} (prompt: {g.prompt!r}, "
                          f"scale {lora_scale_text(g.lora_scale)})", markup=False)
        compare = Image.new("RGB", (sum(t.width for t in tiles), max(t.height for t in tiles)))
        x = 0
        for tile in tiles:
            compare.paste(tile, (x, 0))
            x += tile.width
        compare_path = gen_dir / COMPARE_PNG
        write_whole(compare_path, _encoded(compare, "PNG"))
        # The likeness tracker's own comparison: the fixed probes of both versions, side by side,
        # and every version's scores (the tiny model draws no faces: its scores say so).
        comparison = services.likeness.compare(user=user)
        grid_path = gen_dir / LIKENESS_GRID_PNG
        write_whole(grid_path, services.likeness.grid_png(comparison))
        chart_path = gen_dir / LIKENESS_CHART_PNG
        write_whole(chart_path, services.likeness.chart_png(user=user))

        console.rule("where everything is")
        for label, path in where_everything_is(out, settings):
            console.print(f"{label:32} {path}", markup=False)  # --out is the user's
        console.print(f"demo finished in {time.monotonic() - started:.1f} s")
        console.rule("see it in your browser")
        print_serve_command(console, settings.home)
        console.print("then open http://127.0.0.1:8000 and sign in as [bold]demo[/bold]")
        console.print(f"password: [bold]{password}[/bold]")
        # Its first API key, shown here as `users create` shows one: made and never shown, it
        # was a working key nobody could use, listed on the Settings page all the same.
        console.print(f"API key (for the HTTP API): [bold]{api_key}[/bold]", soft_wrap=True)
    finally:
        services.close()
