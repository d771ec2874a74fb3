"""``shallot app --demo``: the embedded local network of ``shallot demo`` (relay/localnet.py LocalNetwork: relays as
child processes on 127.0.0.1 and a directory file), run from a thread of its own so that starting relays,
reading their output and stopping them never touches the GUI's event loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

from shallot.relay.localnet import LocalNetwork

log = logging.getLogger("shallot.app.demo")


class DemoNetwork:
    def __init__(self, n_relays: int = 6, n_exits: int = 2) -> None:
        # short and under /tmp: the demo engine's control socket lives here too (sun_path holds 108 bytes)
        self.root = Path(tempfile.mkdtemp(prefix="shallot-demo-", dir="/tmp"))
        self.net = LocalNetwork(self.root, n_relays, n_exits)
        self.socket = self.root / "engine.sock"
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="shallot-demo-network", daemon=True)
        self._thread.start()
        self._drains: set[asyncio.Task[None]] = set()

    @property
    def directory(self) -> Path:
        return self.net.directory

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.net.procs]

    async def start(self) -> Path:
        """Start the relays (awaitable from any loop); returns the directory file."""
        await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self._start(), self._loop))
        return self.net.directory

    async def stop(self) -> None:
        if self._loop.is_closed():
            return
        with contextlib.suppress(Exception):
            await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self._stop(), self._loop))
        self._close_loop()

    def stop_blocking(self) -> None:
        """For the very end of the process, when no event loop runs any more."""
        if self._loop.is_closed():
            return
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(30)
        self._close_loop()

    def _close_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():
            self._loop.close()
        shutil.rmtree(self.root, ignore_errors=True)

    async def _start(self) -> None:
        self.net.create()
        await self.net.start(progress=lambda line: log.info("demo: %s", line))
        for proc in self.net.procs:  # relays write a little now and then: never let a full pipe stall them
            for stream in (proc.stdout, proc.stderr):
                task = asyncio.create_task(self._drain(stream))
                self._drains.add(task)
                task.add_done_callback(self._drains.discard)

    async def _drain(self, stream: Any) -> None:
        if stream is None:
            return
        while await stream.readline():
            pass

    async def _stop(self) -> None:
        await self.net.stop()
        for task in list(self._drains):
            task.cancel()
