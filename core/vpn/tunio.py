"""Reading a non-blocking TUN device in batches: shared by the client's tunnel (core/vpn/tunnel.py) and the
exit's device (exit/tun.py)."""

from __future__ import annotations

import errno
import logging
import os

log = logging.getLogger("shallot.tun")
READ_BUDGET = 64  # packets per readable event: bounded so one busy device cannot starve the loop


def read_packets(fd: int, budget: int = READ_BUDGET) -> tuple[list[bytes], OSError | None]:
    """Up to ``budget`` packets that are ready now, and the error that ended the batch, if any (a device
    removed under us reads EBADFD and stays "readable": the caller must stop watching it)."""
    packets = []
    for _ in range(budget):
        try:
            packets.append(os.read(fd, 65535))
        except BlockingIOError:
            break
        except OSError as exc:
            if exc.errno != errno.EAGAIN:
                return packets, exc
            break
    return packets, None


def read_batch(fd: int, budget: int = READ_BUDGET) -> list[bytes]:
    """Up to ``budget`` packets that are ready now; an empty list when none are (or on a read error,
    which is logged: the device is going away)."""
    packets, error = read_packets(fd, budget)
    if error is not None:
        log.warning("TUN read failed: %s", error.strerror)
    return packets
