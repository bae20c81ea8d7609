"""Matrix/TRC ICC profiles (version 2, display class) built from their colorants, for tests and
benchmarks of colour conversion (photos tagged as phones and cameras tag them): Pillow can only
make sRGB, Lab and XYZ profiles itself.

The colorants are the primaries adapted to the D50 connection space, as in the published
profiles (the values below are those of the sRGB IEC61966-2.1 and Adobe RGB (1998) profiles).
"""

from __future__ import annotations

import struct

XYZ = tuple[float, float, float]

D50: XYZ = (0.9642, 1.0, 0.8249)
SRGB_COLORANTS: tuple[XYZ, XYZ, XYZ] = (
    (0.4361, 0.2225, 0.0139), (0.3851, 0.7169, 0.0971), (0.1431, 0.0606, 0.7141))
ADOBE_RGB_COLORANTS: tuple[XYZ, XYZ, XYZ] = (
    (0.6097, 0.3111, 0.0195), (0.2053, 0.6257, 0.0609), (0.1492, 0.0632, 0.7446))
# sRGB's tone curve as ICC parametric function type 3: Y = (aX + b)^g for X >= d, else cX.
SRGB_CURVE = (2.4, 1 / 1.055, 0.055 / 1.055, 1 / 12.92, 0.04045)
ADOBE_RGB_GAMMA = 563 / 256


def _s15(value: float) -> bytes:
    return struct.pack(">i", round(value * 65536))


def _xyz(value: XYZ) -> bytes:
    return b"XYZ \0\0\0\0" + b"".join(_s15(v) for v in value)


def _gamma_curve(gamma: float) -> bytes:
    return b"curv\0\0\0\0" + struct.pack(">IH", 1, round(gamma * 256)) + b"\0\0"


def _parametric_curve(params: tuple[float, float, float, float, float]) -> bytes:
    return b"para\0\0\0\0" + struct.pack(">HH", 3, 0) + b"".join(_s15(v) for v in params)


def _description(text: str) -> bytes:
    ascii_text = text.encode("ascii") + b"\0"
    body = (b"desc\0\0\0\0" + struct.pack(">I", len(ascii_text)) + ascii_text
            + b"\0" * 8  # no Unicode description
            + b"\0" * 3 + b"\0" * 67)  # no ScriptCode description
    return body + b"\0" * (-len(body) % 4)


def _text(text: str) -> bytes:
    body = b"text\0\0\0\0" + text.encode("ascii") + b"\0"
    return body + b"\0" * (-len(body) % 4)


def rgb_profile(*, name: str, colorants: tuple[XYZ, XYZ, XYZ],
                gamma: float | None = None,
                curve: tuple[float, float, float, float, float] | None = None) -> bytes:
    """The bytes of an RGB display profile with these colorants and one tone curve for the three
    channels: a plain ``gamma``, or a parametric ``curve`` (``SRGB_CURVE``)."""
    if gamma is not None and curve is None:
        trc = _gamma_curve(gamma)
    elif curve is not None and gamma is None:
        trc = _parametric_curve(curve)
    else:
        raise ValueError("give a gamma or a curve")
    tags = [(b"desc", _description(name)), (b"cprt", _text("No copyright: a test profile")),
            (b"wtpt", _xyz(D50)), (b"rXYZ", _xyz(colorants[0])), (b"gXYZ", _xyz(colorants[1])),
            (b"bXYZ", _xyz(colorants[2])), (b"rTRC", trc), (b"gTRC", trc), (b"bTRC", trc)]
    table_size = 4 + 12 * len(tags)
    offset = 128 + table_size
    table = struct.pack(">I", len(tags))
    data = b""
    for signature, body in tags:
        table += signature + struct.pack(">II", offset + len(data), len(body))
        data += body
    size = 128 + table_size + len(data)
    header = (struct.pack(">I", size) + b"\0\0\0\0" + bytes([2, 0x10, 0, 0]) + b"mntr"
              + b"RGB " + b"XYZ " + b"\0" * 12 + b"acsp" + b"\0" * 24
              + struct.pack(">I", 0)  # rendering intent: perceptual
              + b"".join(_s15(v) for v in D50) + b"\0" * 4 + b"\0" * 16 + b"\0" * 28)
    return header + table + data
