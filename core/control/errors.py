"""Error kinds (pure): one Enum for every failure the engine, the control server and the app can name.

The value of a kind is its name on the wire (a control error's ``kind``, a snapshot's ``error_code``,
docs/PROTOCOL.md §9.2 and §9.5).  The app words each kind from one table (app/presenter.py ``ADVICE``);
nothing decides a kind by reading a message.
"""

from __future__ import annotations

import enum

from shallot.core.errors import ShallotError


class ErrorKind(enum.Enum):
    # the control server's own answers (§9.2)
    BAD_REQUEST = "bad-request"  # not a request, or arguments of the wrong shape
    UNKNOWN_COMMAND = "unknown-command"  # this server has no such command
    INTERNAL = "internal"  # a handler bug
    ERROR = "error"  # an ordinary failure; the message says it in plain words
    # the engine's commands (§9.5)
    NOT_CONNECTED = "not-connected"  # new_circuit while not connected
    NO_DIRECTORY = "no-directory"  # connect with neither a directory file nor bootstrap peers
    BAD_DIRECTORY = "bad-directory"  # configure: the directory file cannot be used
    BAD_CONFIG = "bad-config"  # configure: both sources, or a bootstrap peer that is not IP:port
    BUSY = "busy"  # configure while the engine is connecting or connected: disconnect first
    # the engine gave up for good (a snapshot's error_code): retrying cannot help, the user must act
    HELPER_MISSING = "helper-missing"  # VPN mode needs the privileged helper and it is not installed
    HELPER_DENIED = "helper-denied"  # polkit refused, or the user dismissed the password dialog
    HELPER_FAILED = "helper-failed"  # the helper quit or stopped answering
    # met by the app itself, never sent by an engine
    SETTINGS = "settings"  # the app's settings cannot start a connection
    ENGINE_START = "engine-start"  # the engine process did not come up
    ENGINE_LOST = "engine-lost"  # the engine went away
    ENGINE_OUTDATED = "engine-outdated"  # an engine older than the app answers on the socket
    BLOCKED = "blocked"  # the engine stopped and its kill switch stays on (docs/PRIVILEGES.md): reconnect or unblock
    CIRCUIT = "circuit"  # no circuit right now (an engine error without a kind of its own)

    @classmethod
    def from_wire(cls, value: object) -> ErrorKind | None:
        """The kind a peer named, or None for one we do not know (a newer peer) or no kind at all."""
        try:
            return cls(value)
        except ValueError:
            return None


# errors after which the engine stops trying: a new attempt would fail the same way
FINAL = frozenset({ErrorKind.HELPER_MISSING, ErrorKind.HELPER_DENIED, ErrorKind.HELPER_FAILED})


class ControlError(ShallotError):
    """A control request failed; ``kind`` says how, the message says it to a person."""

    def __init__(self, kind: ErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind
