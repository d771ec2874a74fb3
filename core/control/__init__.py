"""The local control API (docs/PROTOCOL.md §9): how the CLI and the desktop app talk to a running engine,
relay or exit, over a 0600 Unix socket with line-delimited JSON.  The app's one door into the core.

    protocol.py  framing constants and ControlError
    server.py    ControlServer (engine, relay, exit)
    client.py    ControlClient (CLI, app)
    paths.py     default_socket: where the engine listens
"""

from shallot.core.control.client import ControlClient
from shallot.core.control.paths import default_socket
from shallot.core.control.protocol import CONTROL_VERSION, MAX_LINE, ControlError
from shallot.core.control.server import ControlServer

__all__ = ["CONTROL_VERSION", "MAX_LINE", "ControlClient", "ControlError", "ControlServer", "default_socket"]
