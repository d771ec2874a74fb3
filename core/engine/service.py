"""The engine process (``shallot engine``, ``shallot connect``): a ClientEngine behind the control API on a
Unix socket until shutdown, SIGTERM or SIGINT, which put the VPN set-up back.  A crash (an exception that
unwinds ``run_engine``) leaves a kill switch on instead (docs/PRIVILEGES.md).  Each typed request goes to
one engine method (docs/PROTOCOL.md §9.5), and each change of state is a "state" event and one line on
stdout."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from pathlib import Path

from shallot.core.control.api import (
    Configure,
    Connect,
    Disconnect,
    EngineConfig,
    EngineState,
    NewCircuit,
    Peers,
    Role,
    SetDirectory,
    Shutdown,
    Status,
    StatusSnapshot,
)
from shallot.core.control.server import ControlServer
from shallot.core.engine.engine import ClientEngine


async def run_engine(socket_path: Path, config: EngineConfig, *, own_ids: tuple[bytes, ...] = (),
                     helper_fd: int | None = None, autoconnect: bool = False, path: str | None = None,
                     exit_spec: str | None = None) -> None:
    """``config`` comes from the command line (``configure`` replaces it); ``own_ids``: this machine's relay,
    never in our circuits; ``helper_fd``: a running privileged helper's socket.  With ``autoconnect``
    (``shallot connect``) it connects at once through ``path`` or to ``exit_spec``."""
    engine = ClientEngine(own_ids=own_ids, helper_fd=helper_fd)
    engine.configure(config, check_directory=False)  # a bad seed fails here, before the socket opens
    stop = asyncio.Event()

    def shutdown(request: Shutdown) -> None:
        stop.set()

    server = ControlServer(socket_path, Role.CLIENT, {
        Status: lambda r: engine.snapshot(),
        Connect: lambda r: engine.connect(exit_spec=r.exit, path_spec=r.path),
        Disconnect: lambda r: engine.disconnect(),
        NewCircuit: lambda r: engine.new_circuit(),
        Configure: lambda r: engine.configure(r.config),
        SetDirectory: lambda r: engine.set_directory(Path(r.path)),
        Peers: lambda r: engine.peers(),
        Shutdown: shutdown,
    })
    try:
        await server.start()
    except BaseException:
        await engine.close()  # what the settings started; the socket path is not ours to remove
        raise
    engine.listeners += [lambda snap: server.publish("state", snap), _say()]
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"shallot engine listening on {socket_path}", flush=True)
    crashed = False
    try:
        if autoconnect:
            await engine.connect(exit_spec=exit_spec, path_spec=path)
        await stop.wait()
    except Exception:
        crashed = True
        raise
    finally:
        if crashed:
            await engine.abandon()  # a bug unwound the engine: the kill switch stays on
        else:
            await engine.close()  # shutdown, SIGTERM, SIGINT (or Ctrl-C before its handler): put everything back
        await server.close()


def _say() -> Callable[[StatusSnapshot], None]:
    """One line per change of state, for people and scripts ("shallot: connected: a -> b -> c")."""
    last: list[EngineState | None] = [None]

    def say(snap: StatusSnapshot) -> None:
        if snap.state is not last[0]:
            last[0] = snap.state
            detail = " -> ".join(h.nickname for h in snap.circuit) or snap.error or snap.step
            print(f"shallot: {snap.state.value}{': ' + detail if detail else ''}", flush=True)

    return say
