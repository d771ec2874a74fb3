"""The packaged icon set and desktop entry are complete and consistent."""

from __future__ import annotations

import configparser
import struct
from pathlib import Path

import pytest

RESOURCES = Path(__file__).resolve().parents[2] / "resources"
SIZES = (16, 22, 24, 32, 48, 64, 128, 256)


@pytest.mark.parametrize("size", SIZES)
def test_png_icon_has_its_size(size: int) -> None:
    data = (RESOURCES / f"shallot-{size}.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    assert struct.unpack(">II", data[16:24]) == (size, size)
    assert data[25] == 6  # colour type RGBA: a transparent background


def test_desktop_entry() -> None:
    entry = configparser.ConfigParser(interpolation=None)
    entry.optionxform = str  # keys are case-sensitive
    entry.read(RESOURCES / "shallot.desktop")
    main = entry["Desktop Entry"]
    assert (main["Type"], main["Name"], main["Exec"], main["Icon"]) == ("Application", "Shallot", "shallot app",
                                                                        "shallot")
    assert main["Categories"].endswith(";") and "Network" in main["Categories"]
    assert entry["Desktop Action Demo"]["Exec"] == "shallot app --demo"
    assert (RESOURCES / "shallot.svg").read_text().lstrip().startswith("<svg")
