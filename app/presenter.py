"""What the window shows, computed from the engine's snapshots (docs/PROTOCOL.md §9.5) and the app's own
problems.  Pure: no Qt, no clock, no I/O, so every state and every wording is tested without a display.

* The snapshot, its states and the error kinds are the control API's types (core/control/api.py): the
  engine builds them, ``StatusSnapshot.from_json`` reads them here with every check an engine's JSON needs.
* ``present``: one ``ViewState`` for the connect button, the headline, the advice and the circuit view.
* ``ADVICE``: the words for every error kind, in one table (OnionShare's idea).
* ``Notifier``: which state changes deserve a desktop notification (drop and recovery).
* ``RateMeter``: up/down speed from byte counters sampled over time.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass

from shallot.core.control.api import EngineMode, EngineState, ErrorKind, HopStatus, StatusSnapshot

# ---------------------------------------------------------------------------------------------- problems


@dataclass(frozen=True)
class Problem:
    """Something the app itself ran into (the engine's own errors arrive in its snapshot)."""

    kind: ErrorKind
    message: str


class ViewAction(enum.Enum):
    """The extra button beside the advice."""

    PROBE_MODE = "probe-mode"  # turn off "Route all traffic" and connect with a circuit only
    SETTINGS = "settings"  # open the settings dialog
    RETRY = "retry"  # connect again
    UNBLOCK = "unblock"  # lift a kill switch kept after the engine stopped (an explicit disconnect)


class Button(enum.Enum):
    """What the connect button does when clicked (its words are BUTTON_TEXT's)."""

    CONNECT = "connect"
    DISCONNECT = "disconnect"
    CANCEL = "cancel"  # stop a connection that is being made (a disconnect)
    RECONNECT = "reconnect"  # connect again while a kill switch blocks traffic (a new engine takes it over)


BUTTON_TEXT = {Button.CONNECT: "Connect", Button.DISCONNECT: "Disconnect", Button.CANCEL: "Cancel",
               Button.RECONNECT: "Reconnect"}

_REFUSED = ("The engine refused", "See the log (Ctrl+L) for details, then try again.", ViewAction.RETRY)
_SETTINGS = ("Settings need attention", "Open Settings (Ctrl+,) and fix what is named above.", ViewAction.SETTINGS)

# The one place that turns error kinds into words: (headline, what to do, action button).  A kind without
# an entry reads as _REFUSED.
ADVICE: dict[ErrorKind, tuple[str, str, ViewAction]] = {
    ErrorKind.HELPER_MISSING: (
        "The VPN helper is not installed",
        "Shallot needs its privileged helper to create the tunnel and routes. Install it (README, “VPN mode”), "
        "or connect in probe mode: a circuit only, no system routes.", ViewAction.PROBE_MODE),
    ErrorKind.HELPER_DENIED: (
        "The system refused the network change",
        "The password prompt was cancelled or refused, so no routes were changed. Connect again to retry, or "
        "use probe mode: a circuit only, no system routes.", ViewAction.PROBE_MODE),
    ErrorKind.ENGINE_OUTDATED: (
        "An older Shallot engine is running",
        "It was started before Shallot was updated and cannot take this app's settings. Stop it (quit the "
        "app that started it, or end “shallot engine”), then try again.", ViewAction.RETRY),
    ErrorKind.SETTINGS: _SETTINGS,
    ErrorKind.BAD_CONFIG: _SETTINGS,
    ErrorKind.NO_DIRECTORY: ("No relays to use", "Choose a directory file in Settings (Ctrl+,).", ViewAction.SETTINGS),
    ErrorKind.BAD_DIRECTORY: (
        "The directory file cannot be used",
        "Choose another directory file in Settings, or make a fresh one with “shallot directory”.",
        ViewAction.SETTINGS),
    ErrorKind.ENGINE_START: ("The Shallot engine did not start",
                             "See the log (Ctrl+L) for details, then try again.", ViewAction.RETRY),
    ErrorKind.ENGINE_LOST: ("The Shallot engine stopped", "Connect again to restart it.", ViewAction.RETRY),
    ErrorKind.BLOCKED: (
        "Blocked: the connection stopped",
        "The kill switch still keeps your traffic from leaving outside the tunnel. Reconnect to go on through a "
        "new circuit, or Unblock to let your traffic out directly, unprotected.", ViewAction.UNBLOCK),
    ErrorKind.ERROR: _REFUSED,
    ErrorKind.CIRCUIT: (
        "No circuit right now",
        "Shallot keeps trying. If this goes on, check that the relays of your directory are online, or "
        "choose another exit.", ViewAction.RETRY),
}


def advice(kind: ErrorKind) -> tuple[str, str, ViewAction]:
    return ADVICE.get(kind, _REFUSED)


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
    phase: EngineState
    headline: str  # "Connected", "Connecting…", the problem's title
    detail: str  # the current step, the circuit, or the reason in plain words
    advice: str  # what the user can do ("" when nothing is needed)
    action: ViewAction | None  # an extra button beside the advice
    button: Button
    button_busy: bool  # spinning ring on the connect button
    hops: tuple[HopStatus, ...]
    mode: EngineMode
    can_new_circuit: bool
    guard_tip: str = ""  # the circuit's guard is your entry guard: what that means (docs/PROTOCOL.md §5.10)

    @property
    def button_text(self) -> str:
        return BUTTON_TEXT[self.button]


def present(snap: StatusSnapshot | None, problem: Problem | None = None, *, starting: str = "",
            route_all: bool = False) -> ViewState:
    """``starting``: what the app is doing before the engine answers (e.g. starting it)."""
    mode = snap.mode if snap is not None else (EngineMode.VPN if route_all else EngineMode.PROBE)
    if problem is not None:
        title, what, action = advice(problem.kind)
        button = Button.RECONNECT if problem.kind is ErrorKind.BLOCKED else Button.CONNECT
        return ViewState(EngineState.ERROR, title, sentence(problem.message), what, action, button, False,
                         (), mode, False)
    if starting:
        return ViewState(EngineState.CONNECTING, "Connecting…", sentence(starting), "", None, Button.CANCEL, True,
                         (), mode, False)
    if snap is not None and snap.blocked and not snap.trying:  # the engine says a kill switch was kept
        title, what, action = advice(ErrorKind.BLOCKED)
        detail = sentence(snap.error) or "An earlier connection stopped without disconnecting."
        return ViewState(EngineState.ERROR, title, detail, what, action, Button.RECONNECT, False, (), mode, False)
    if snap is None or snap.state is EngineState.DISCONNECTED:
        return ViewState(EngineState.DISCONNECTED, "Not connected",
                         "Your traffic goes out directly." if mode is EngineMode.VPN or route_all else
                         "Probe mode: connecting builds a circuit; your system's traffic is not routed.",
                         "", None, Button.CONNECT, False, (), mode, False)
    if snap.state is EngineState.CONNECTED and snap.circuit:
        exit_hop = snap.circuit[-1]
        detail = f"Through {exit_hop.nickname or exit_hop.short_id}"
        if snap.rtt_ms is not None:
            detail += f" · {format_ms(snap.rtt_ms)} round trip"
        what = ""
        if snap.step:
            detail = sentence(snap.step)
        elif snap.error:  # e.g. a new circuit could not be built and the old one is kept
            what = sentence(snap.error)
        elif snap.guard_warning:  # path bias, or a guard dropped: the user should know
            what = sentence(snap.guard_warning)
        return ViewState(EngineState.CONNECTED, "Connected", detail, what, None, Button.DISCONNECT, False,
                         snap.circuit, mode, not snap.step, guard_tip(snap))
    if snap.state is EngineState.ERROR:
        kind = snap.error_kind if snap.error_kind in ADVICE else ErrorKind.CIRCUIT
        title, what, action = advice(kind)
        detail = sentence(snap.error) or "The engine reported an error without a reason."
        if snap.step:
            detail += " " + sentence(snap.step)
        # while the engine retries the button stops it; once it gave up (a final error) the button starts over
        button = Button.DISCONNECT if snap.trying else Button.CONNECT
        return ViewState(EngineState.ERROR, title, detail, what, action, button, False, (), mode, False)
    # connecting / reconnecting (or connected without a circuit yet)
    dropped = snap.state is EngineState.RECONNECTING and snap.connected_since is not None
    headline = "Reconnecting…" if dropped else "Connecting…"
    detail = sentence(snap.step) or "Starting…"
    what = sentence(snap.error) if snap.error else ""
    return ViewState(EngineState.RECONNECTING if dropped else EngineState.CONNECTING, headline, detail, what, None,
                     Button.DISCONNECT if dropped else Button.CANCEL, True, (), mode, False)


def guard_tip(snap: StatusSnapshot) -> str:
    """Words for "your guard" when the circuit's guard is one of the engine's entry guards, else ""."""
    if not snap.circuit:
        return ""
    guard = next((g for g in snap.guards if g.id == snap.circuit[0].id), None)
    if guard is None:
        return ""
    primaries = [g for g in snap.guards if g.primary]
    rank = f"primary guard {primaries.index(guard) + 1} of {len(primaries)}" if guard in primaries \
        else "a spare guard (your primary guards do not answer)"
    return (f"Your entry guard ({rank}): every circuit starts here for months, so that a hostile relay "
            "cannot become your first hop just by making circuits fail.")


# ---------------------------------------------------------------------------------------------- notifications


class Notifier:
    """A notification when an established connection drops and when it comes back; nothing for the
    ordinary connect and disconnect the user asked for."""

    def __init__(self) -> None:
        self._was_connected = False
        self._dropped = False

    def feed(self, phase: EngineState, user_action: bool = False) -> tuple[str, str] | None:
        if phase is EngineState.CONNECTED:
            back = self._dropped
            self._was_connected, self._dropped = True, False
            return ("Shallot: connection restored", "Your traffic goes through a new circuit.") if back else None
        if phase is EngineState.DISCONNECTED or user_action:
            self._was_connected = self._dropped = False
            return None
        if phase in (EngineState.RECONNECTING, EngineState.ERROR) and self._was_connected and not self._dropped:
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
