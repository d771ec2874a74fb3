"""The options of ``shallot app``, apart from the app so that building the command line imports no Qt."""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def display_available() -> bool:
    """A desktop session to open a window in (QT_QPA_PLATFORM alone does not count: CI sets it)."""
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--demo", action="store_true",
                   help="start the local network of 'shallot demo' (relays on 127.0.0.1) and use it")
    p.add_argument("--autoconnect", action="store_true", help="connect as soon as the app starts")
    p.add_argument("--screenshot", type=Path, metavar="FILE",
                   help="write a PNG of the window once connected (or on an error) and exit: status 0 only "
                        "if it got connected")
    p.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS",
                   help="with --screenshot: give up (error picture, status 1) after this long (default 60)")
    p.add_argument("--socket", type=Path, metavar="PATH",
                   help="engine control socket (default: the one 'shallot engine' uses)")
    p.add_argument("--theme", choices=("system", "light", "dark"), help="override the appearance setting")
    p.add_argument("--minimized", action="store_true", help="start in the tray")
