"""``LocalNetwork`` (behind ``shallot demo``, the app's demo and these tests' fixtures) never leaves a relay
behind: a relay that cannot start is reported with its own error and the others are stopped, and a relay
that ignores SIGTERM is killed after the grace period."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from pathlib import Path

import pytest

from shallot.core.errors import ShallotError
from shallot.relay.localnet import LocalNetwork
from shallot.relay.state import read_descriptor

pytestmark = pytest.mark.slow


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_too_small_a_network_is_refused(tmp_path: Path) -> None:
    for relays, exits in ((2, 1), (3, 0), (3, 4)):
        with pytest.raises(ShallotError, match="at least 3 relays and at least 1 exit"):
            LocalNetwork(tmp_path, relays, exits)


def test_a_relay_that_cannot_start_is_named_and_the_others_are_stopped(tmp_path: Path) -> None:
    net = LocalNetwork(tmp_path, 3, 1)
    net.create()

    async def run() -> tuple[str, list[int], list[int | None]]:
        try:
            await net.start()
        except ShallotError as exc:
            pids = [p.pid for p in net.procs]
            return str(exc), pids, await net.stop()
        await net.stop()
        raise AssertionError("the network started although a relay's port was taken")

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", read_descriptor(net.states[1]).address[1]))  # someone else holds relay1's port
        message, pids, codes = asyncio.run(run())
    assert f"relay in {net.states[1]} did not start" in message and "in use" in message, message
    assert len(codes) == 3 and codes[0] == 0 and codes[1] not in (0, None), codes
    assert net.procs == [] and all(_gone(pid) for pid in pids)


def test_a_relay_that_ignores_sigterm_is_killed(tmp_path: Path) -> None:
    net = LocalNetwork(tmp_path, 3, 1)
    net.create()

    async def run() -> tuple[list[int], list[int | None]]:
        await net.start()
        pids = [p.pid for p in net.procs]
        os.kill(pids[2], signal.SIGSTOP)  # a stopped process never handles SIGTERM
        return pids, await net.stop()

    pids, codes = asyncio.run(run())
    assert codes[:2] == [0, 0] and codes[2] == -signal.SIGKILL, codes
    assert all(_gone(pid) for pid in pids)

