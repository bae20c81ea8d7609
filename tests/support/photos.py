"""Photo sets for tests: small, real JPEGs made on the fly, and zips of them."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

from PIL import Image, ImageDraw

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "photos"


def synthetic_photo(seed: int, *, size: int = 96) -> bytes:
    """A face-like drawing that differs by seed (distinct bytes, distinct content)."""
    img = Image.new("RGB", (size, size), (40 + seed * 13 % 200, 90, 140 - seed * 7 % 100))
    draw = ImageDraw.Draw(img)
    r = size // 3 + seed % 5
    c = size // 2
    draw.ellipse((c - r, c - r, c + r, c + r), fill=(230, 190, 160))
    draw.ellipse((c - r // 2 - 3, c - 6, c - r // 2 + 3, c), fill=(20, 20, 20))
    draw.ellipse((c + r // 2 - 3, c - 6, c + r // 2 + 3, c), fill=(20, 20, 20))
    draw.arc((c - r // 2, c, c + r // 2, c + r // 2 + seed % 4), 0, 180, fill=(120, 30, 30))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def photo_zip(count: int = 4, *, offset: int = 0) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for i in range(count):
            zf.writestr(f"photo{i + offset}.jpg", synthetic_photo(i + offset))
    return buf.getvalue()


def real_photo_zip(names: tuple[str, ...] = ("obama.jpg", "obama2.jpg", "obama3.jpg")) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name in names:
            zf.write(FIXTURES / name, arcname=name)
    return buf.getvalue()
