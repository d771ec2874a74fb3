"""``shallot demo``: an embedded local network (relays in child processes on 127.0.0.1) and a probe through it."""

from __future__ import annotations

import random
import tempfile
from pathlib import Path
from typing import Any

from shallot.commands.probe import run_probe
from shallot.core.circuit.path import choose_path
from shallot.core.discovery.directory import load_directory
from shallot.relay.localnet import LocalNetwork


async def run_demo(*, count: int = 10, relays: int = 6, exits: int = 2, quiet: bool = False) -> dict[str, Any]:
    def say(msg: str) -> None:
        if not quiet:
            print(msg, flush=True)

    with tempfile.TemporaryDirectory(prefix="shallot-demo-") as tmp:
        net = LocalNetwork(Path(tmp), relays, exits)
        say(f"creating a local network of {relays} relays ({exits} exits) on 127.0.0.1 ...")
        net.create()
        try:
            await net.start(progress=lambda line: say("  " + line))
            directory = load_directory(net.directory)
            path = choose_path(directory, random.SystemRandom(), path_spec=None, exit_spec=None)
            say("building a circuit and sending datagrams through it ...")
            result = await run_probe(directory, path, count=count)
        finally:
            codes = await net.stop()
            say(f"stopped {len(codes)} relays")
        return {"result": result, "directory": directory}
