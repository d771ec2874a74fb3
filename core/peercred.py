"""Who is at the other end of a Unix socket (SO_PEERCRED): the control sockets and the privileged helper
serve only their owner (or root)."""

from __future__ import annotations

import socket
import struct


def peer_uid(sock: socket.socket | None) -> int | None:
    """The uid of the peer process, or None when the kernel does not say."""
    if sock is None:
        return None
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid
