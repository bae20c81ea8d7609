"""The side-by-side comparison grid: one row per probe (same prompt, same seed), version A on the
left, version B on the right, the scores in a label column.

Layout (pixels), fixed so a caller can predict the size (``grid_size``)::

    | PAD | LABEL_W | PAD | CELL | PAD | CELL | PAD |      HEADER_H on top,
                                                         then per probe CELL + PAD, then PAD
"""

from __future__ import annotations

import hashlib
import io
import json
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont, ImageOps
from PIL.PngImagePlugin import PngInfo

from selfie_lora.likeness.images import decode_rgb, png_text

CELL = 256
PAD = 8
LABEL_W = 240
HEADER_H = 40
BACKGROUND = (250, 250, 250)
INK = (20, 20, 20)
MISSING = (200, 200, 200)
_WRAP = 34  # characters per label line at the default font


def grid_size(rows: int) -> tuple[int, int]:
    """(width, height) of a grid with ``rows`` probes."""
    width = PAD + LABEL_W + PAD + CELL + PAD + CELL + PAD
    height = HEADER_H + rows * (CELL + PAD) + PAD
    return width, height


@dataclass(frozen=True)
class GridRow:
    label: Sequence[str]  # a few short lines: probe, seed, prompt, scores
    left: bytes | None  # PNG of version A's probe image (None: missing)
    right: bytes | None


# Part of every grid's inputs: a change to how the grid is drawn makes the stored ones old.
# "2": a grid drawn with a probe image missing is no longer stored nor tagged; one stored (or
# cached by a browser) before, under the same digest as the whole one, is drawn again.
_GRID_STYLE = "2"
_INPUTS_KEY = "selfie-lora-grid-inputs"


def grid_inputs(shown: object) -> str:
    """A digest of everything a grid shows (its words and which images, JSON-able): equal
    digests, the same picture."""
    return hashlib.sha256(json.dumps([_GRID_STYLE, shown], sort_keys=True).encode()).hexdigest()


def grid_drawn_from(png: bytes) -> str | None:
    """The ``inputs`` a grid made by ``render_grid`` was drawn from (None for a PNG without
    them: one stored by an older release, or not a grid)."""
    return png_text(png, _INPUTS_KEY)


def render_grid(*, left_title: str, right_title: str, rows: Sequence[GridRow],
                corner: str = "probe", inputs: str | None = None) -> bytes:
    """The grid as PNG bytes. ``corner``: the label column's header (at most two lines).
    ``inputs`` (``grid_inputs``): carried in a text chunk, for ``grid_drawn_from``."""
    if not rows:
        raise ValueError("a comparison grid needs at least one probe")
    width, height = grid_size(len(rows))
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    left_x = PAD + LABEL_W + PAD
    right_x = left_x + CELL + PAD
    draw.text((PAD, PAD), corner, fill=INK, font=font)
    draw.text((left_x, PAD), left_title, fill=INK, font=font)
    draw.text((right_x, PAD), right_title, fill=INK, font=font)
    for i, row in enumerate(rows):
        top = HEADER_H + i * (CELL + PAD)
        lines: list[str] = []
        for line in row.label:
            lines.extend(textwrap.wrap(line, _WRAP) or [""])
        draw.multiline_text((PAD, top + 4), "\n".join(lines), fill=INK, font=font, spacing=4)
        for x, png in ((left_x, row.left), (right_x, row.right)):
            canvas.paste(_cell(png), (x, top))
    out = io.BytesIO()
    info = PngInfo()
    if inputs is not None:
        info.add_text(_INPUTS_KEY, inputs)
    canvas.save(out, format="PNG", pnginfo=info)
    return out.getvalue()


def _cell(png: bytes | None) -> Image.Image:
    cell = Image.new("RGB", (CELL, CELL), MISSING)
    if png is None:
        ImageDraw.Draw(cell).text((PAD, PAD), "no image", fill=INK)
        return cell
    try:
        image = decode_rgb(png)
    except Exception:  # a broken probe image is shown as missing, the grid still renders
        ImageDraw.Draw(cell).text((PAD, PAD), "unreadable image", fill=INK)
        return cell
    # Small images (the tiny model's 64 px) are scaled up so the rows line up.
    fitted = ImageOps.contain(image, (CELL, CELL), Image.Resampling.NEAREST
                              if max(image.size) < CELL // 2 else Image.Resampling.LANCZOS)
    cell.paste(fitted, ((CELL - fitted.width) // 2, (CELL - fitted.height) // 2))
    return cell
