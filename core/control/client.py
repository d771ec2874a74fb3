"""Async client of the control API (docs/PROTOCOL.md §9), used by ``shallot status`` and the desktop app."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from shallot.core.control.protocol import CONTROL_VERSION, MAX_LINE, ControlError
from shallot.core.errors import ShallotError


class ControlClient:
    """Async client of the control API, used by ``shallot status`` and the desktop app."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, hello: dict[str, Any]) -> None:
        self._reader, self._writer = reader, writer
        self.hello = hello
        self._next_id = 1
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._events: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self._reader_task = asyncio.create_task(self._read_loop())

    @classmethod
    async def connect(cls, path: Path, timeout: float = 5.0) -> ControlClient:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path), limit=MAX_LINE), timeout)
            hello = json.loads(await asyncio.wait_for(reader.readline(), timeout))
        except FileNotFoundError:
            raise ShallotError(f"nothing is running there: {path} does not exist") from None
        except (TimeoutError, OSError, ValueError) as exc:
            raise ShallotError(f"cannot talk to {path}: {exc}") from None
        if not isinstance(hello, dict) or hello.get("shallot") != "control":
            raise ShallotError(f"{path} is not a Shallot control socket")
        if hello.get("version") != CONTROL_VERSION:
            raise ShallotError(f"{path} speaks control version {hello.get('version')}, we speak {CONTROL_VERSION}")
        return cls(reader, writer, hello)

    async def call(self, cmd: str, timeout: float = 30.0, **args: Any) -> Any:
        rid = self._next_id
        self._next_id += 1
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        self._writer.write(json.dumps({"id": rid, "cmd": cmd, "args": args}).encode() + b"\n")
        await self._writer.drain()
        try:
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._pending.pop(rid, None)

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        await self.call("subscribe")
        while True:
            item = await self._events.get()
            if item is None:
                return
            yield item

    async def close(self) -> None:
        self._reader_task.cancel()
        self._writer.close()
        with contextlib.suppress(Exception):
            await self._writer.wait_closed()

    async def _read_loop(self) -> None:
        try:
            while True:
                line = await self._reader.readline()
                if not line:
                    break
                msg = json.loads(line)
                if "event" in msg:
                    self._events.put_nowait(msg)
                    continue
                fut = self._pending.get(msg.get("id"))
                if fut is None or fut.done():
                    continue
                if msg.get("ok"):
                    fut.set_result(msg.get("result"))
                else:
                    err = msg.get("error") or {}
                    fut.set_exception(ControlError(str(err.get("kind")), str(err.get("message"))))
        except (ConnectionError, ValueError, asyncio.CancelledError):
            pass
        finally:
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(ShallotError("the control connection closed"))
            self._events.put_nowait(None)
