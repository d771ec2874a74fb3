"""``shallot app --demo --autoconnect --screenshot FILE`` end to end, as a user would run it: its own
process, the demo network of relay processes, the engine, a PNG and status 0 once connected."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from PySide6.QtGui import QImage

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]


def run_app(*args: str, env_extra: dict[str, str], timeout: float = 90) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen", "PYTHONUNBUFFERED": "1", **env_extra}
    return subprocess.run([sys.executable, "-m", "shallot", "app", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, stdin=subprocess.DEVNULL)


def distinct_colours(image: QImage) -> int:
    small = image.scaled(200, 140)
    return len({small.pixel(x, y) for x in range(small.width()) for y in range(small.height())})


def test_demo_autoconnect_screenshot(tmp_path: Path, xdg: Path) -> None:
    out = tmp_path / "window.png"
    res = run_app("--demo", "--autoconnect", "--screenshot", str(out), env_extra={})
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Traceback" not in res.stderr
    assert f"connected; wrote {out}" in res.stdout
    image = QImage(str(out))
    assert not image.isNull() and image.width() >= 800 and image.height() >= 500
    assert distinct_colours(image) > 50  # a rendered window, not a blank rectangle
    assert not (xdg / "config" / "shallot" / "settings.json").exists()  # the demo saves no settings


def test_screenshot_of_an_error_exits_1(tmp_path: Path, xdg: Path) -> None:
    cfg = xdg / "config" / "shallot"
    cfg.mkdir(parents=True)
    (cfg / "settings.json").write_text('{"directory": "%s"}' % (tmp_path / "missing"))
    out = tmp_path / "error.png"
    res = run_app("--autoconnect", "--socket", str(tmp_path / "e.sock"), "--screenshot", str(out), env_extra={})
    assert res.returncode == 1, res.stdout + res.stderr
    assert "not connected" in res.stdout and "Traceback" not in res.stderr
    assert not QImage(str(out)).isNull()


def headless_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY", "QT_QPA_PLATFORM")}


def test_no_subcommand_without_a_display_prints_help() -> None:
    res = subprocess.run([sys.executable, "-m", "shallot"], capture_output=True, text=True, timeout=30,
                         env=headless_env(), stdin=subprocess.DEVNULL)
    assert res.returncode == 0 and "usage: shallot" in res.stdout and " app " in res.stdout


def test_app_without_a_display_says_so_in_one_line() -> None:
    res = subprocess.run([sys.executable, "-m", "shallot", "app"], capture_output=True, text=True, timeout=30,
                         env=headless_env(), stdin=subprocess.DEVNULL)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines() == [res.stderr.strip()]
    assert res.stderr.startswith("shallot: error: no display")
