"""A stand-in engine process for GUI tests: the control API of core/control/ on a Unix socket, answering
status, connect and configure with one fixed snapshot (JSON, argv[2]).  A process of its own, so that a
test can kill it with SIGKILL as an engine dies.  Usage: standin_engine.py SOCKET SNAPSHOT_JSON"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from shallot.core.control.api import Configure, Connect, Role, Status
from shallot.core.control.server import ControlServer


async def main(sock: Path, snapshot: dict[str, object]) -> None:
    server = ControlServer(sock, Role.CLIENT, {cls: (lambda request: snapshot) for cls in (Status, Connect, Configure)})
    await server.start()
    print("listening", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), json.loads(sys.argv[2])))
