"""Relay-server and exit-node mode: the asyncio service around RelayNode (one UDP socket, one control socket)."""

from __future__ import annotations

import asyncio
import errno
import logging
import secrets
import signal
import time
from pathlib import Path
from typing import Any

from shallot.core import state as state_dir
from shallot.core.control import ControlServer
from shallot.core.errors import ShallotError
from shallot.core.udp import NodeEndpoint, open_endpoint
from shallot.relay.forwarder import RelayConfig, RelayNode

log = logging.getLogger("shallot.relay")
ROTATE_CHECK_S = 3600.0


class RelayService:
    def __init__(self, state: Path, *, expect_exit: bool | None = None) -> None:
        self.state = state
        self.keys, self.settings = state_dir.load(state)
        if expect_exit and not self.settings.exit:
            raise ShallotError(f"{state} was not created with --exit; run it with 'shallot relay'")
        self.node: RelayNode | None = None
        self.endpoint: NodeEndpoint | None = None
        self.control: ControlServer | None = None
        self.started = time.time()
        self._stop = asyncio.Event()

    @property
    def role(self) -> str:
        return "exit" if self.settings.exit else "relay"

    async def run(self) -> None:
        wall = time.time()
        if self.keys.rotate_onion_keys(secrets.token_bytes, wall):
            state_dir.save_keys(self.state, self.keys)
        desc = state_dir.publish_descriptor(self.state, self.keys, self.settings, wall)
        self.node = RelayNode(self.keys, rng=secrets.token_bytes, wall=wall,
                              config=RelayConfig(is_exit=self.settings.exit), own_host=self.settings.address[0])
        host, port = self.settings.address
        try:
            self.endpoint = await open_endpoint(self.node, (host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ShallotError(f"cannot listen on {host}:{port}: the port is already in use") from None
            raise ShallotError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
        self.control = ControlServer(self.state / state_dir.CONTROL_SOCKET, self.role,
                                     {"status": self._status, "circuits": self._circuits})
        await self.control.start()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        log.info("%s %s (%s) listening on %s:%d", self.role, desc.nickname, desc.id_hex, host, port)
        print(f"shallot {self.role} {desc.nickname} {desc.id_hex} listening on {host}:{port}", flush=True)
        rotate = asyncio.create_task(self._rotate_loop())
        try:
            await self._stop.wait()
        finally:
            rotate.cancel()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            await self.control.close()
            self.endpoint.close()
            log.info("%s stopped", self.role)

    async def _rotate_loop(self) -> None:
        while True:
            await asyncio.sleep(ROTATE_CHECK_S)
            try:
                self._rotate_once()
            except Exception:  # a full disk must not end key and certificate renewal for good
                log.exception("key rotation failed; trying again in %.0f s", ROTATE_CHECK_S)

    def _rotate_once(self) -> None:
        assert self.node is not None
        wall = time.time()
        if self.node.renew_link_cert(wall):
            log.info("link certificate renewed")
        if self.node.rotate_onion_keys(wall):
            state_dir.save_keys(self.state, self.keys)
            state_dir.publish_descriptor(self.state, self.keys, self.settings, wall)
            log.info("onion key rotated; descriptor re-signed")

    async def _status(self, args: dict[str, Any]) -> dict[str, Any]:
        assert self.node is not None
        return {"role": self.role, "id": self.keys.relay_id.hex(), "nickname": self.settings.nickname,
                "address": list(self.settings.address), "uptime_s": round(time.time() - self.started, 1),
                **self.node.stats(), "io": self._io_stats()}

    def _io_stats(self) -> dict[str, Any]:
        ep = self.endpoint
        if ep is None:
            return {}
        return {"datagrams_in": ep.datagrams_in, "datagrams_out": ep.datagrams_out, "gro": ep.gro, "gso": ep.gso,
                "batched_reads": ep.batched_reads, "batched_sends": ep.batched_sends,
                "send_errors": ep.send_errors, "recv_errors": ep.recv_errors}

    async def _circuits(self, args: dict[str, Any]) -> list[dict[str, Any]]:
        """What this relay knows about each circuit: its neighbours' addresses and nothing else."""
        assert self.node is not None
        out = []
        for circ, from_prev in self.node.circuits.values():
            if not from_prev:
                continue
            prev, nxt = self.node.neighbours_of(circ)
            out.append({"state": circ.state.value, "previous": list(prev), "next": list(nxt) if nxt else None,
                        "terminal": circ.endpoint is not None})
        return out


async def run_relay(state: Path, *, expect_exit: bool | None = None) -> None:
    await RelayService(state, expect_exit=expect_exit).run()
