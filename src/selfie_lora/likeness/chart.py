"""The chart of likeness scores across a model's versions (matplotlib, drawn off-screen).

Fixed size: ``CHART_SIZE`` pixels (``FIGSIZE`` inches at ``DPI``), never trimmed, so a caller can
predict it. matplotlib is the ``quality`` extra; it is imported only here, when a chart is drawn.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from selfie_lora.domain.likeness import GateMeasure, gate_measure
from selfie_lora.errors import ConfigError
from selfie_lora.likeness.images import png_text

if TYPE_CHECKING:
    from matplotlib.figure import Figure

FIGSIZE = (8.0, 4.5)
DPI = 100
CHART_SIZE = (int(FIGSIZE[0] * DPI), int(FIGSIZE[1] * DPI))


@dataclass(frozen=True)
class ChartPoint:
    number: int  # the version number (x axis)
    identity: float | None
    identity_nearest: float | None
    face_share: float | None
    sane_share: float | None
    gate_status: str  # pending | passed | held
    active: bool


# At most this many version numbers under the x axis: the plot is ~620 px wide, so more would
# run into each other (at 50 versions they made one black band); every point is still drawn.
MAX_X_LABELS = 15
HELD_NOT_SCORED = "held, not scored (no score to draw)"
HELD_GATE_OFF = "held, not activated (the gate is off)"


def held_at(point: ChartPoint) -> float | None:
    """Where a held version's ring goes: at its identity, or, when the training photos have no
    face (no identity, the gate compared the face share), at its face share; None only when it
    has no scores at all (it gets the cross instead)."""
    measured: dict[str, float | None] = {GateMeasure.IDENTITY: point.identity,
                                         GateMeasure.FACE_SHARE: point.face_share}
    for value in (measured[gate_measure(measured)], point.identity_nearest, point.sane_share):
        if value is not None:
            return value
    return None


def render_chart(points: Sequence[ChartPoint], *, title: str, tolerance: float,
                 gate: bool = True) -> bytes:
    """The chart as PNG bytes. Versions without scores show as gaps. The PNG carries
    ``chart_inputs(points, ...)`` (a text chunk, ``drawn_from`` reads it back), so a stored chart
    tells whether it still shows what would be drawn now. ``gate``: whether the quality gate
    is on (``SELFIE_LORA_QUALITY_GATE``), which the held versions' entry says."""
    fig = chart_figure(points, title=title, tolerance=tolerance, gate=gate)
    out = io.BytesIO()
    # No bbox_inches="tight": it would change the size from CHART_SIZE.
    fig.savefig(out, format="png", dpi=DPI,
                metadata={_INPUTS_KEY: chart_inputs(points, title=title, tolerance=tolerance,
                                                    gate=gate)})
    return out.getvalue()


# Part of every chart's inputs: a change to how the chart is drawn makes the stored ones old.
_CHART_STYLE = "4"
_INPUTS_KEY = "selfie-lora-chart-inputs"


def chart_inputs(points: Sequence[ChartPoint], *, title: str, tolerance: float,
                 gate: bool = True) -> str:
    """A digest of everything the chart shows: equal digests, the same picture."""
    shown = json.dumps([_CHART_STYLE, title, tolerance, gate,
                        [dataclasses.astuple(p) for p in points]], sort_keys=True)
    return hashlib.sha256(shown.encode()).hexdigest()


def drawn_from(png: bytes) -> str | None:
    """The ``chart_inputs`` a chart made by ``render_chart`` was drawn from (None for a PNG
    without them: one stored by an older release, or not a chart). Matplotlib writes its own
    text chunks beside it."""
    return png_text(png, _INPUTS_KEY)


# The chart's lines, as its legend names them (and the versions page's text for its alt).
SERIES = ("identity (mean of the photos)", "identity (nearest photo)",
          "share of probes with a face", "share of sane images")


def held_label(tolerance: float, *, gate: bool) -> str:
    """The legend's entry for the held versions' rings. The gate off, none was held by it now
    (a version Replicate published to another model is held all the same, and those held while
    it was on stay held): "by the gate" and its tolerance would say what did not happen."""
    return f"held by the gate (tolerance {tolerance:g})" if gate else HELD_GATE_OFF


def chart_figure(points: Sequence[ChartPoint], *, title: str, tolerance: float,
                 gate: bool = True) -> Figure:
    """The chart's matplotlib figure (``render_chart`` saves it), ``CHART_SIZE`` pixels."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError as exc:  # pragma: no cover - the quality extra is part of every install
        raise ConfigError("charts need matplotlib: pip install 'selfie-lora[quality]'") from exc

    # Constrained: the legend below the plot (see there) gets its room within the fixed size.
    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    xs = [p.number for p in points]
    mean, nearest, faces, sane = SERIES
    # Every line 3:1 or more against the white plot (a graphic's minimum): tab:cyan was 2.26:1,
    # now a dark teal (5.6:1). Each series has its own marker, the nearest photo's a dotted
    # line too, so none is told apart by its colour alone.
    series = (
        (mean, [p.identity for p in points], "tab:blue", "o", "-"),
        (nearest, [p.identity_nearest for p in points], "#0b7285", "s", ":"),
        (faces, [p.face_share for p in points], "tab:green", "^", "-"),
        (sane, [p.sane_share for p in points], "tab:gray", "v", "-"),
    )
    for label, values, colour, marker, style in series:
        ax.plot(xs, [_nan(v) for v in values], label=label, color=colour, marker=marker,
                linestyle=style, linewidth=1.5, markersize=5)
    held = [p for p in points if p.gate_status == "held"]
    scored_held = [p for p in held if held_at(p) is not None]
    if scored_held:
        ax.scatter([p.number for p in scored_held], [_nan(held_at(p)) for p in scored_held],
                   s=140, facecolors="none", edgecolors="tab:red", linewidths=2,
                   label=held_label(tolerance, gate=gate), zorder=3)
    unscored_held = [p for p in held if held_at(p) is None]
    if unscored_held:
        # No identity to ring: a ring at 0 would read as a total loss of likeness. A cross on
        # the x axis itself (x in data, y in axes coordinates), below every score, says which
        # version was held without a score.
        ax.scatter([p.number for p in unscored_held], [0.0] * len(unscored_held),
                   transform=ax.get_xaxis_transform(), marker="x", s=60, color="tab:red",
                   linewidths=2, clip_on=False, label=HELD_NOT_SCORED, zorder=3)
    active = [p for p in points if p.active]
    for p in active:
        # A dark orange (4.6:1 on white; tab:orange was 2.53:1), dashed.
        ax.axvline(p.number, color="#b35900", linestyle="--", linewidth=1,
                   label="active version")
    ax.set_xlabel("version")
    ax.set_ylabel("score (0..1)")
    ax.set_ylim(-0.02, 1.05)
    if xs:
        ax.set_xlim(min(xs) - 0.5, max(xs) + 0.5)
        if len(xs) <= MAX_X_LABELS:
            ax.set_xticks(xs)
        else:
            ax.xaxis.set_major_locator(MaxNLocator(nbins=MAX_X_LABELS, integer=True,
                                                   steps=[1, 2, 5, 10]))
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    # Below the plot, not in it: at lower left it hid the low scores, the held versions'.
    # Its text a little larger than matplotlib's 8: the 800 px picture is drawn at a third of
    # its size on a 320 px screen (the page's table of the chart's values says it all as text).
    # Three columns while the entries fit the picture's width; a held version adds one or two
    # long entries ("held by the gate (tolerance 0.02)", HELD_NOT_SCORED), and three columns of
    # those were wider than the 800 px picture: the legend ran off both its sides, cut, and the
    # plot was squeezed to 60% of the width. Two columns whenever one is there: counting the
    # entries (5 or fewer: three) let one held entry with no active version through.
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2 if held else 3,
              fontsize=10)
    return fig


def _nan(value: float | None) -> float:
    return math.nan if value is None else value
