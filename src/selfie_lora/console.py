"""What the command line and the demo print: findings, reports, a training's progress bar.

Printing only: the callers fetch what they show through the services.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape as _rich_escape
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from selfie_lora.domain.entities import Finding, Training
from selfie_lora.domain.lease import is_held_back

if TYPE_CHECKING:
    from selfie_lora.services.intake import IntakeReport



class _Console(Console):
    """A rich console whose lines of text are never wrapped when it writes to no terminal.

    Off a terminal (a pipe, a script, CI, docker logs) rich wraps at 80 columns: a long path was
    cut in the middle of a file's name and the one-time API key or an export's sha256 went to a
    line of their own, so `grep wrote | awk '{print $2}'` or a grep for 'API key' lost them.
    Tables and other renderables keep their layout: they are for people."""

    def print(self, *objects: Any, soft_wrap: bool | None = None, **options: Any) -> None:
        if soft_wrap is None and not self.is_terminal and all(isinstance(o, str) for o in objects):
            soft_wrap = True
        super().print(*objects, soft_wrap=soft_wrap, **options)


def literal(text: str) -> str:
    """``text`` (a path, a name, a message) as rich markup that prints exactly ``text``.

    Every user text that goes into markup goes through here. rich's own ``escape`` doubles a
    final backslash, right only where a tag follows it: elsewhere rich prints both, so a folder
    named '/tmp/photos\\' was shown as '/tmp/photos\\\\' and could not be pasted back into a
    shell (and a text ending in two backslashes lost one before a tag). Here the final
    backslashes are doubled and an empty no-op tag always follows them, so rich reads each pair
    as one backslash whatever the caller puts after the text."""
    body = text.rstrip("\\")
    trailing = len(text) - len(body)
    if not trailing:
        return _rich_escape(text)
    return _rich_escape(body) + "\\" * (2 * trailing) + "[none][/none]"


console = _Console()
err_console = _Console(stderr=True)

_SEVERITY_ORDER = {"reject": 0, "warn": 1, "info": 2}


def findings_table(findings: Sequence[Finding], title: str) -> Table:
    # Escaped: a title holds the user's path, and a photo's name, a message or advice may hold
    # '[...]', which rich would read as markup (and drop, or fail on).
    table = Table(title=literal(title))
    for column in ("severity", "photo", "code", "message", "advice"):
        table.add_column(column)
    for f in findings:
        colour = {"reject": "red", "warn": "yellow"}.get(f.severity, "cyan")
        table.add_row(f"[{colour}]{f.severity}[/{colour}]", literal(f.photo or "(set)"),
                      literal(f.code), literal(f.message), literal(f.advice))
    return table


def print_findings(findings: Sequence[Finding], *, title: str, out: Console = console) -> None:
    """The findings as a table, rejects first."""
    ordered = sorted(findings, key=lambda f: _SEVERITY_ORDER.get(f.severity, 3))
    out.print(findings_table(ordered, title))


def fewer_photos_hint(findings: Sequence[Finding], *, min_photos: int) -> str | None:
    """For a set refused as too small, the setting that lets one try selfie-lora with fewer
    photos (``min_photos``: its value now). Said on the command line only, whose user runs
    selfie-lora: the finding's own advice ("add 2 or more clear photos") is also the web app's
    and the API's, whose users cannot change a setting. Without it a newcomer who ran the demo
    (it accepts 2 photos) and then `train` on its photos was refused with no way on."""
    too_few = [f for f in findings if f.code == "too_few_photos" and f.severity == "reject"]
    if not too_few:
        return None
    # None usable (a folder of no photo, every photo rejected): "set it to how many you have"
    # said 0, which the setting refuses, and no minimum trains on nothing. The message is the
    # set check's ("0 usable photos; at least 5 are needed", dataset.checks.photo_set).
    if any(f.message.startswith("0 usable photos") for f in too_few):
        return None
    # Where the set is checked: this command, or the serve that takes an upload.
    return (f"to try selfie-lora with fewer photos anyway, set SELFIE_LORA_MIN_PHOTOS (now "
            f"{min_photos}) to how many you have, for this command and for serve")


def print_report(report: IntakeReport, *, title: str, out: Console = console,
                 min_photos: int | None = None) -> None:
    """The findings (rejects first) and the verdict, as a person reads them. ``min_photos``:
    the minimum of the settings, where they are the reader's to change (see
    ``fewer_photos_hint``)."""
    if report.findings:
        print_findings(report.findings, title=title, out=out)
    verdict = report.verdict
    label = "[green]trainable[/green]" if report.trainable else "[red]not trainable[/red]"
    kept = len(report.accepted)
    # A set refused as a whole (two people, too few photos) trains none of the photos that
    # passed their own checks: "6 of 6 photos usable" beside "not trainable" misled. "None is
    # usable" is said only of a set of several people, whose photos count as rejected: of a set
    # too small it sat beside its reason "3 usable photos; at least 5 are needed".
    several = any(f.code == "several_people" for f in report.findings)
    counted = (f"{kept} of {report.images_total} photos usable" if report.trainable or not kept
               else f"{report.passed_own_checks} of {report.images_total} photos pass their own "
                    f"checks, but the set is refused{', so none is usable' if several else ''}")
    out.print(
        f"{counted}: {label} - quality "
        f"[bold]{verdict.get('quality', '?')}[/bold] ({verdict.get('score', '?')}/100, judged "
        f"for {report.target} training at {report.resolution} px)"
    )
    for reason in verdict.get("reasons", []):
        out.print(f"  - {reason}", markup=False, highlight=False)
    hint = None if min_photos is None else fewer_photos_hint(report.findings,
                                                             min_photos=min_photos)
    if hint:
        out.print(hint, markup=False, highlight=False)


def follow_training(current: Callable[[], Training], *, quiet: bool = False,
                    out: Console = console, interval: float = 0.2) -> Training:
    """Show a training's progress bar until it ends; ``current`` reads it anew."""
    with Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
                  TextColumn("{task.fields[status]}"), TimeElapsedColumn(),
                  console=out, disable=quiet) as bar:
        task = bar.add_task("training", total=1.0, status="queued")
        said: str | None = None  # the wait last said, once each
        while True:
            training = current()
            if (training.error and training.error != said and not training.status.is_terminal
                    and is_held_back(training, datetime.now(UTC))):
                # Waiting out an outage (a full disk): nothing moves for minutes, so the bar
                # alone would look stuck; said once, with how to stop.
                said = training.error
                bar.console.print(f"waiting: {literal(training.error)}. Ctrl-C stops this "
                                  "command and hands the training back.", highlight=False,
                                  soft_wrap=True)
            phase = " (scoring likeness)" if training.is_scoring else ""
            bar.update(task, completed=training.progress,
                       status=f"{training.status} {training.step}/{training.total_steps}{phase}")
            if training.status.is_terminal:
                return training
            time.sleep(interval)
