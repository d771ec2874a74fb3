"""A network of relays on one machine: each relay a child process (``python -m shallot relay``) on
127.0.0.1, their state directories and a directory file.  ``shallot demo``, ``shallot app --demo`` and the
integration tests run on it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

from shallot.core.errors import ShallotError
from shallot.crypto.descriptor import encode_directory
from shallot.relay import state as state_dir


def free_udp_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class LocalNetwork:
    """Relays as child processes of ``python -m shallot relay``; always stopped by ``stop``."""

    def __init__(self, root: Path, n_relays: int = 6, n_exits: int = 2, host: str = "127.0.0.1") -> None:
        if n_relays < 3 or n_exits < 1 or n_exits > n_relays:
            raise ShallotError("a local network needs at least 3 relays and at least 1 exit")
        self.root = root
        self.n_relays, self.n_exits, self.host = n_relays, n_exits, host
        self.procs: list[asyncio.subprocess.Process] = []
        self.states: list[Path] = []
        self.directory = root / "directory"

    def create(self) -> None:
        ports = free_udp_ports(self.n_relays, self.host)
        descs = []
        for i, port in enumerate(ports):
            is_exit = i >= self.n_relays - self.n_exits
            state = self.root / f"relay{i}"
            name = f"{'exit' if is_exit else 'relay'}{i}"
            descs.append(state_dir.keygen(state, (self.host, port), name, is_exit))
            self.states.append(state)
        self.directory.write_text(encode_directory(descs))

    async def start(self, progress: Any = None) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        for state in self.states:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "shallot", "relay", "--state", str(state), "--directory", str(self.directory),
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env)
            self.procs.append(proc)
        for state, proc in zip(self.states, self.procs):
            assert proc.stdout is not None
            try:
                line = await asyncio.wait_for(proc.stdout.readline(), 20)
            except TimeoutError:
                line = b""
            if b"listening" not in line:
                if not line:  # its output ended: it is exiting, and asyncio may not have reaped it yet
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(proc.wait(), 5)
                err = b""
                if proc.returncode is not None and proc.stderr is not None:
                    err = await proc.stderr.read()
                raise ShallotError(f"relay in {state} did not start: {(line + err).decode(errors='replace').strip()}")
            if progress:
                progress(line.decode().strip())
        # the directory holds the descriptors re-signed at start
        self.directory.write_text(encode_directory([state_dir.read_descriptor(s) for s in self.states]))

    async def stop(self) -> list[int | None]:
        for proc in self.procs:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        codes: list[int | None] = []
        for proc in self.procs:
            try:
                codes.append(await asyncio.wait_for(proc.wait(), 10))
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                codes.append(await proc.wait())
        self.procs = []
        return codes
