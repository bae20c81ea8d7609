"""The ``selfie-lora`` command line (typer + rich)."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from selfie_lora.config import Settings, get_settings
from selfie_lora.domain.entities import Finding, GateStatus, Training
from selfie_lora.errors import SelfieLoraError

if TYPE_CHECKING:
    from selfie_lora.services.intake import IntakeReport

app = typer.Typer(help="Personal FLUX LoRAs from selfies, retrained without losing anything.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
users_app = typer.Typer(help="Manage users and API keys.", no_args_is_help=True)
app.add_typer(users_app, name="users")

console = Console()
err_console = Console(stderr=True)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # huey logs every poll and alembic every migration step at INFO; keep the console readable.
    for name in ("huey", "alembic", "httpx"):
        logging.getLogger(name).setLevel(logging.WARNING)


@app.callback()
def _main(verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False) -> None:
    _setup_logging(verbose)


def _settings() -> Settings:
    return get_settings()


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    worker: Annotated[bool, typer.Option("--worker/--no-worker",
                                         help="Run a background worker in this process.")] = True,
) -> None:
    """HTTP API + web UI + a background worker in one process."""
    from selfie_lora.api.app import create_app
    from selfie_lora.api.server import run_server

    settings = _settings()
    application = create_app(settings, run_worker=worker, warm_up=True, reconcile=True)
    run_server(application, settings, host=host, port=port)


@app.command("worker")
def worker_cmd(
    threads: Annotated[int | None, typer.Option(help="Worker threads.")] = None,
) -> None:
    """A queue worker only (the scale path)."""
    from selfie_lora.worker import run_worker

    run_worker(threads=threads)


@users_app.command("create")
def users_create(
    name: str,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON on stdout.")] = False,
) -> None:
    """Create a user and print its API key (shown once)."""
    from selfie_lora.wiring import build_services

    services = build_services(_settings(), trainers={}, generators={})
    try:
        user, key = services.users.create(name=name)
    except SelfieLoraError as exc:
        err_console.print(f"[red]error:[/red] {exc.message}")
        raise typer.Exit(1) from None
    finally:
        services.close()
    if as_json:
        sys.stdout.write(json.dumps({"user": user.name, "api_key": key}) + "\n")
    else:
        console.print(f"created user [bold]{user.name}[/bold]")
        console.print(f"API key (shown once, keep it safe): [bold]{key}[/bold]")


def findings_table(findings: tuple[Finding, ...] | list[Finding], title: str) -> Table:
    table = Table(title=title)
    for column in ("severity", "photo", "code", "message", "advice"):
        table.add_column(column)
    for f in findings:
        colour = {"reject": "red", "warn": "yellow"}.get(f.severity, "cyan")
        table.add_row(f"[{colour}]{f.severity}[/{colour}]", f.photo or "(set)", f.code,
                      f.message, f.advice)
    return table


@app.command()
def check(path: Path) -> None:
    """Report on a folder or zip of photos; exit 0 when trainable, 1 when not."""
    from selfie_lora.dataset.archive import read_path
    from selfie_lora.wiring import build_services

    services = build_services(_settings(), trainers={}, generators={})
    try:
        files, findings = read_path(path, limits=services.intake.limits)
        report = services.intake.check_files(files=files, findings=findings)
    except SelfieLoraError as exc:
        err_console.print(f"[red]not trainable:[/red] {exc.message}")
        raise typer.Exit(1) from None
    finally:
        services.close()
    print_report(report, title=f"Findings for {path}")
    raise typer.Exit(0 if report.trainable else 1)


_SEVERITY_ORDER = {"reject": 0, "warn": 1, "info": 2}


def print_report(report: IntakeReport, *, title: str) -> None:
    """The findings (rejects first) and the verdict, as a person reads them."""
    if report.findings:
        ordered = sorted(report.findings, key=lambda f: _SEVERITY_ORDER.get(f.severity, 3))
        console.print(findings_table(ordered, title))
    verdict = report.verdict
    label = "[green]trainable[/green]" if report.trainable else "[red]not trainable[/red]"
    console.print(
        f"{len(report.accepted)} of {report.images_total} photos usable: {label} - quality "
        f"[bold]{verdict.get('quality', '?')}[/bold] ({verdict.get('score', '?')}/100, judged "
        f"for {report.resolution} px training)"
    )
    for reason in verdict.get("reasons", []):
        console.print(f"  - {reason}")


def wait_for_training(services: object, training_id: str, *, quiet: bool = False) -> Training:
    """Run an embedded worker until ``training_id`` ends, with a progress bar."""
    from selfie_lora.wiring import Services
    from selfie_lora.worker import Worker, claim_identity

    assert isinstance(services, Services)
    identity = claim_identity(services.settings.home)
    services.training.owner = identity.name
    worker = Worker(training=services.training, queue=services.queue, identity=identity,
                    threads=1, reconcile_seconds=services.settings.reconcile_seconds)
    worker.start()
    try:
        with Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
                      TextColumn("{task.fields[status]}"), TimeElapsedColumn(),
                      console=console, disable=quiet) as bar:
            task = bar.add_task("training", total=1.0, status="queued")
            while True:
                training = services.repo.get_training(training_id)
                assert training is not None
                phase = " (scoring likeness)" if training.is_scoring else ""
                bar.update(task, completed=training.progress,
                           status=f"{training.status} {training.step}/{training.total_steps}"
                                  f"{phase}")
                if training.status.is_terminal:
                    return training
                time.sleep(0.2)
    finally:
        worker.stop()


@app.command()
def train(
    path: Path,
    user: Annotated[str, typer.Option("--user", help="The user's name.")],
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="Wait for the end.")] = True,
) -> None:
    """Upload a folder or zip of photos and (re)train the user's model."""
    from selfie_lora.dataset.archive import read_path
    from selfie_lora.wiring import build_services

    services = build_services(_settings())
    try:
        owner = services.users.get_by_name(name=user)
        limits = services.intake.limits
        uploaded = services.training.upload(user=owner,
                                            read=lambda: read_path(path, limits=limits))
        t = uploaded.training
        assert t is not None
        kind = "retraining" if t.is_retraining else "first training"
        console.print(f"{kind} {t.id}: trigger word [bold]{t.trigger_word}[/bold], destination "
                      f"{t.destination}, trainer {t.trainer_version}")
        if not wait:
            return
        final = wait_for_training(services, t.id)
        if final.status != "succeeded":
            err_console.print(f"[red]training {final.status}:[/red] {final.error}")
            raise typer.Exit(1)
        model = services.models.get(user=owner)
        active = services.models.active_version(model=model)
        new = services.repo.get_version(final.version_id) if final.version_id else None
        if new is not None and new.gate_status is GateStatus.HELD:
            # The training worked; the likeness gate kept the previous version active.
            console.print(f"[yellow]succeeded, but version {new.number} is held back[/yellow]: "
                          f"{new.gate_reason}")
            console.print(f"version {active.number if active else '?'} stays active; compare "
                          f"them with 'selfie-lora compare --user {user}', or activate version "
                          f"{new.number} yourself (POST /api/model/versions/{new.id}/activate)")
        else:
            console.print(f"[green]succeeded[/green]: version {active.number if active else '?'} "
                          f"is active (LoRA scale {model.lora_scale})")
    except SelfieLoraError as exc:
        err_console.print(f"[red]error:[/red] {exc.message}")
        for d in exc.details:
            err_console.print(f"  - {d}")
        raise typer.Exit(1) from None
    finally:
        services.close()


@app.command()
def generate(
    prompt: str,
    user: Annotated[str, typer.Option("--user", help="The user's name.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for the images.")] = Path("."),
    num_outputs: Annotated[int, typer.Option("--num-outputs", "-n")] = 1,
    seed: Annotated[int | None, typer.Option()] = None,
    lora_scale: Annotated[float | None, typer.Option("--lora-scale")] = None,
) -> None:
    """Generate with the user's active LoRA version."""
    from selfie_lora.services.generation import GenerationRequest
    from selfie_lora.wiring import build_services

    services = build_services(_settings())
    try:
        owner = services.users.get_by_name(name=user)
        generation = services.generation.generate(user=owner, request=GenerationRequest(
            prompt=prompt, num_outputs=num_outputs, seed=seed, lora_scale=lora_scale))
        out.mkdir(parents=True, exist_ok=True)
        for i in range(len(generation.image_keys)):
            target = out / f"{generation.id}-{i}.png"
            target.write_bytes(services.generation.image(
                user=owner, generation_id=generation.id, index=i))
            console.print(f"wrote {target}")
    except SelfieLoraError as exc:
        err_console.print(f"[red]error:[/red] {exc.message}")
        raise typer.Exit(1) from None
    finally:
        services.close()


def _fmt(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


@app.command()
def compare(
    user: Annotated[str, typer.Option("--user", help="The user's name.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for the grid and the chart.")] = Path(
        "."),
    a: Annotated[str | None, typer.Option(
        "--a", help="Version A: an id or a number (default: what the gate compared B with).")
    ] = None,
    b: Annotated[str | None, typer.Option(
        "--b", help="Version B: an id or a number (default: the newest version).")] = None,
) -> None:
    """Compare two versions of the user's model probe by probe: writes a side-by-side grid and
    the chart of likeness scores across all versions, and prints the scores."""
    from selfie_lora.domain.likeness import LikenessStatus
    from selfie_lora.wiring import build_services

    services = build_services(_settings(), trainers={})
    try:
        owner = services.users.get_by_name(name=user)
        comparison = services.likeness.compare(user=owner, a=a, b=b)
        for version in (comparison.a, comparison.b):
            record = services.repo.get_likeness(version.id)
            if record is None or record.status is not LikenessStatus.SCORED:
                # Versions from before likeness tracking (or whose scoring failed): score now.
                console.print(f"scoring version {version.number} ...")
                services.likeness.score(version.id, force=record is not None)
        comparison = services.likeness.compare(user=owner, a=comparison.a.id, b=comparison.b.id)
        out.mkdir(parents=True, exist_ok=True)
        grid_path = out / f"compare-v{comparison.a.number}-v{comparison.b.number}.png"
        grid_path.write_bytes(services.likeness.grid_png(comparison))
        chart_path = out / "likeness-chart.png"
        chart_path.write_bytes(services.likeness.chart_png(user=owner))
    except SelfieLoraError as exc:
        err_console.print(f"[red]error:[/red] {exc.message}")
        raise typer.Exit(1) from None
    finally:
        services.close()
    va, vb = comparison.a, comparison.b
    table = Table(title=f"version {va.number} (A) against version {vb.number} (B), "
                        "identity against B's training photos")
    for column in ("probe", "seed", "prompt", "A", "B", "B - A"):
        table.add_column(column)
    for row in comparison.probes:
        cells = []
        for result, score in ((row.a, row.a_score), (row.b, row.b_score)):
            if result is None:
                cells.append("not scored")
            elif not result.face_found:
                cells.append("no face")
            else:
                cells.append(_fmt(score.get("similarity") if score else None))
        sa = row.a_score.get("similarity") if row.a_score else None
        sb = row.b_score.get("similarity") if row.b_score else None
        delta = _fmt(sb - sa) if sa is not None and sb is not None else "-"
        table.add_row(str(row.probe.index + 1), str(row.probe.seed), row.probe.prompt, *cells,
                      delta)
    console.print(table)
    scores = Table(title="scores")
    for column in ("score", f"A: v{va.number} ({va.gate_status})",
                   f"B: v{vb.number} ({vb.gate_status})"):
        scores.add_column(column)
    ha = comparison.scores_a.headline() if comparison.scores_a else {}
    hb = comparison.scores_b.headline() if comparison.scores_b else {}
    for key in ("identity", "identity_nearest", "face_share", "sane_share", "sharpness"):
        scores.add_row(key, _fmt(ha.get(key)), _fmt(hb.get(key)))
    console.print(scores)
    if vb.gate_reason:
        console.print(f"gate on version {vb.number}: {vb.gate_status}: {vb.gate_reason}")
    console.print(f"wrote {grid_path}")
    console.print(f"wrote {chart_path}")


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", help="Where the demo writes everything.")] = Path(
        "demo-output"),
) -> None:
    """The whole cycle on the embedded defaults, offline: check, first training, retraining,
    comparison, generation."""
    from selfie_lora.demo import run_demo

    try:
        run_demo(out=out, console=console)
    except SelfieLoraError as exc:
        err_console.print(f"[red]demo failed:[/red] {exc.message}")
        raise typer.Exit(1) from None


def main() -> None:
    app()
