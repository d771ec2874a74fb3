"""What the window shows, computed from the engine's snapshots (docs/PROTOCOL.md §9.5) and the app's own
problems.  Pure: no Qt, no clock, no I/O, so every state and every wording is tested without a display.

* ``parse_snapshot``: the engine's JSON, checked field by field (a newer or broken engine must not crash
  the window: unknown fields are ignored, wrong types fall back to "unknown").
* ``present``: one ``ViewState`` for the connect button, the headline, the advice and the circuit view.
* ``Notifier``: which state changes deserve a desktop notification (drop and recovery).
* ``RateMeter``: up/down speed from byte counters sampled over time.
"""

from __future__ import annotations

import enum
import math
from collections import deque
from dataclasses import dataclass
from typing import Any

ROLES = ("guard", "middle", "exit")
MAX_TEXT = 500


class SnapshotError(ValueError):
    """The engine sent something that is not a snapshot."""


class Phase(enum.Enum):
    DISCONNECTED = "disconnected"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    RECONNECTING = "reconnecting"
    ERROR = "error"


@dataclass(frozen=True)
class Hop:
    role: str
    id: str
    nickname: str
    address: str
    rtt_ms: float | None

    @property
    def short_id(self) -> str:
        return self.id[:8]


@dataclass(frozen=True)
class Snapshot:
    state: Phase
    step: str = ""
    error: str = ""
    error_code: str = ""
    trying: bool = True  # the engine keeps (re)building; an engine that does not say is assumed to
    mode: str = "probe"
    circuit: tuple[Hop, ...] = ()
    build_ms: float | None = None
    rtt_ms: float | None = None
    connected_since: float | None = None
    circuit_since: float | None = None
    circuits_built: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    directory: str | None = None
    exit: str | None = None


def _text(raw: dict[str, Any], key: str) -> str:
    v = raw.get(key)
    return v[:MAX_TEXT] if isinstance(v, str) else ""


def _number(raw: dict[str, Any], key: str) -> float | None:
    v = raw.get(key)
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
        return None
    return float(v)


def _count(raw: dict[str, Any], key: str) -> int:
    v = raw.get(key)
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else 0


def parse_snapshot(raw: Any) -> Snapshot:
    if not isinstance(raw, dict):
        raise SnapshotError("a snapshot must be a JSON object")
    try:
        state = Phase(raw.get("state"))
    except ValueError:
        raise SnapshotError(f"unknown engine state {str(raw.get('state'))[:40]!r}") from None
    hops: list[Hop] = []
    circuit = raw.get("circuit")
    if isinstance(circuit, list) and len(circuit) == len(ROLES):
        for role, h in zip(ROLES, circuit):
            if not isinstance(h, dict):
                hops = []
                break
            hops.append(Hop(role, _text(h, "id").lower(), _text(h, "nickname"), _text(h, "address"),
                            _number(h, "rtt_ms")))
    mode = _text(raw, "mode")
    return Snapshot(
        state=state, step=_text(raw, "step"), error=_text(raw, "error"), error_code=_text(raw, "error_code"),
        trying=raw.get("trying") is not False,
        mode=mode if mode in ("probe", "vpn") else "probe", circuit=tuple(hops),
        build_ms=_number(raw, "build_ms"), rtt_ms=_number(raw, "rtt_ms"),
        connected_since=_number(raw, "connected_since"), circuit_since=_number(raw, "circuit_since"),
        circuits_built=_count(raw, "circuits_built"), bytes_sent=_count(raw, "bytes_sent"),
        bytes_received=_count(raw, "bytes_received"),
        directory=_text(raw, "directory") or None, exit=_text(raw, "exit") or None)


# ---------------------------------------------------------------------------------------------- problems


@dataclass(frozen=True)
class Problem:
    """Something the app itself ran into (the engine's own errors arrive in its snapshot)."""

    code: str
    message: str


# The one place that turns problem codes into words: (headline, what to do, action button).
ADVICE: dict[str, tuple[str, str, str]] = {
    "helper-missing": ("The VPN helper is not installed",
                       "Shallot needs its privileged helper to create the tunnel and routes. Install it "
                       "(README, “VPN mode”), or connect in probe mode: a circuit only, no system routes.",
                       "probe-mode"),
    "helper-denied": ("The system refused the network change",
                      "The password prompt was cancelled or refused, so no routes were changed. Connect "
                      "again to retry, or use probe mode: a circuit only, no system routes.",
                      "probe-mode"),
    "no-vpn": ("This engine has no VPN mode yet",
               "Turn off “Route all traffic” to connect in probe mode: a circuit only, no system routes.",
               "probe-mode"),
    "no-bootstrap": ("This engine cannot use bootstrap peers yet",
                     "Choose a directory file in Settings instead.", "settings"),
    "settings": ("Settings need attention", "Open Settings (Ctrl+,) and fix what is named above.", "settings"),
    "no-directory": ("No relays to use", "Choose a directory file in Settings (Ctrl+,).", "settings"),
    "directory": ("The directory file cannot be used",
                  "Choose another directory file in Settings, or make a fresh one with “shallot directory”.",
                  "settings"),
    "engine-start": ("The Shallot engine did not start",
                     "See the log (Ctrl+L) for details, then try again.", "retry"),
    "engine-lost": ("The Shallot engine stopped", "Connect again to restart it.", "retry"),
    "engine": ("The engine refused", "See the log (Ctrl+L) for details, then try again.", "retry"),
    "circuit": ("No circuit right now",
                "Shallot keeps trying. If this goes on, check that the relays of your directory are "
                "online, or choose another exit.", "retry"),
}


def sentence(text: str) -> str:
    """Engine and OS messages as a sentence: capital first letter, a full stop at the end."""
    text = " ".join(text.split())
    if not text:
        return ""
    text = text[0].upper() + text[1:]
    return text if text[-1] in ".!?" else text + "."


# ---------------------------------------------------------------------------------------------- view state


@dataclass(frozen=True)
class ViewState:
    phase: Phase
    headline: str  # "Connected", "Connecting…", the problem's title
    detail: str  # the current step, the circuit, or the reason in plain words
    advice: str  # what the user can do ("" when nothing is needed)
    action: str  # "" | "probe-mode" | "settings" | "retry": an extra button beside the advice
    button_text: str
    button_busy: bool  # spinning ring on the connect button
    hops: tuple[Hop, ...]
    mode: str
    can_new_circuit: bool


def present(snap: Snapshot | None, problem: Problem | None = None, *, starting: str = "",
            route_all: bool = False) -> ViewState:
    """``starting``: what the app is doing before the engine answers (e.g. starting it)."""
    mode = snap.mode if snap is not None else ("vpn" if route_all else "probe")
    if problem is not None:
        title, advice, action = ADVICE.get(problem.code, ADVICE["engine"])
        return ViewState(Phase.ERROR, title, sentence(problem.message), advice, action, "Connect", False, (),
                         mode, False)
    if starting:
        return ViewState(Phase.CONNECTING, "Connecting…", sentence(starting), "", "", "Cancel", True, (), mode,
                         False)
    if snap is None or snap.state is Phase.DISCONNECTED:
        return ViewState(Phase.DISCONNECTED, "Not connected",
                         "Your traffic goes out directly." if mode == "vpn" or route_all else
                         "Probe mode: connecting builds a circuit; your system's traffic is not routed.",
                         "", "", "Connect", False, (), mode, False)
    if snap.state is Phase.CONNECTED and snap.circuit:
        exit_hop = snap.circuit[-1]
        detail = f"Through {exit_hop.nickname or exit_hop.short_id}"
        if snap.rtt_ms is not None:
            detail += f" · {format_ms(snap.rtt_ms)} round trip"
        advice = ""
        if snap.step:
            detail = sentence(snap.step)
        elif snap.error:  # e.g. a new circuit could not be built and the old one is kept
            advice = sentence(snap.error)
        return ViewState(Phase.CONNECTED, "Connected", detail, advice, "", "Disconnect", False, snap.circuit,
                         mode, not snap.step)
    if snap.state is Phase.ERROR:
        code = snap.error_code if snap.error_code in ADVICE else "circuit"
        title, advice, action = ADVICE[code]
        detail = sentence(snap.error) or "The engine reported an error without a reason."
        if snap.step:
            detail += " " + sentence(snap.step)
        # while the engine retries the button stops it; once it gave up (a final error) the button starts over
        button = "Disconnect" if snap.trying else "Connect"
        return ViewState(Phase.ERROR, title, detail, advice, action, button, False, (), mode, False)
    # connecting / reconnecting (or connected without a circuit yet)
    dropped = snap.state is Phase.RECONNECTING and snap.connected_since is not None
    headline = "Reconnecting…" if dropped else "Connecting…"
    detail = sentence(snap.step) or "Starting…"
    advice = sentence(snap.error) if snap.error else ""
    return ViewState(Phase.RECONNECTING if dropped else Phase.CONNECTING, headline, detail, advice, "",
                     "Disconnect" if dropped else "Cancel", True, (), mode, False)


# ---------------------------------------------------------------------------------------------- notifications


class Notifier:
    """A notification when an established connection drops and when it comes back; nothing for the
    ordinary connect and disconnect the user asked for."""

    def __init__(self) -> None:
        self._was_connected = False
        self._dropped = False

    def feed(self, phase: Phase, user_action: bool = False) -> tuple[str, str] | None:
        if phase is Phase.CONNECTED:
            back = self._dropped
            self._was_connected, self._dropped = True, False
            return ("Shallot: connection restored", "Your traffic goes through a new circuit.") if back else None
        if phase is Phase.DISCONNECTED or user_action:
            self._was_connected = self._dropped = False
            return None
        if phase in (Phase.RECONNECTING, Phase.ERROR) and self._was_connected and not self._dropped:
            self._dropped = True
            return ("Shallot: connection dropped", "The circuit stopped answering; Shallot is building a new one.")
        return None


# ---------------------------------------------------------------------------------------------- traffic


class RateMeter:
    """Byte counters sampled over time -> speeds.  A counter that goes down (a new engine) starts over."""

    def __init__(self, keep: int = 120) -> None:
        self.samples: deque[tuple[float, float, float]] = deque(maxlen=keep)  # (time, up B/s, down B/s)
        self._last: tuple[float, int, int] | None = None

    def add(self, now: float, sent: int, received: int) -> tuple[float, float] | None:
        last, self._last = self._last, (now, sent, received)
        if last is None or now <= last[0]:
            return None
        dt = now - last[0]
        up, down = max(0, sent - last[1]) / dt, max(0, received - last[2]) / dt
        self.samples.append((now, up, down))
        return up, down

    def reset(self) -> None:
        self.samples.clear()
        self._last = None


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover


def format_rate(bps: float) -> str:
    return format_bytes(bps) + "/s"


def format_duration(seconds: float) -> str:
    s = max(0, int(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def format_ms(ms: float | None) -> str:
    if ms is None:
        return "\u2013"  # en dash: measured nothing
    return f"{ms:.2f} ms" if ms < 10 else f"{ms:.0f} ms"
