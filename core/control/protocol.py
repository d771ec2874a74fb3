"""The control channel's framing and errors (docs/PROTOCOL.md §9.1-9.2), shared by server and client."""

from __future__ import annotations

from shallot.core.errors import ShallotError

CONTROL_VERSION = 1
MAX_LINE = 64 * 1024


class ControlError(ShallotError):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
