"""The protocol core stays sans-I/O: its modules never import a clock, a socket, an event loop or
ambient randomness (randomness and time are always passed in), so they run identically in tests,
simulations and the real engine."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PURE_FILES = ("core/cells.py", "core/ippacket.py", "core/link.py", "core/circuit.py", "core/path.py",
              "core/stun.py", "core/natclass.py", "core/natmsg.py", "core/nat.py",
              "relay/forwarder.py", "exit/echo.py", "exit/policy.py", "exit/ipservice.py",
              "core/discovery/addresses.py", "core/discovery/records.py", "core/discovery/storage.py",
              "core/discovery/wire.py", "core/discovery/view.py", "app/presenter.py")
PURE = sorted([*ROOT.glob("crypto/*.py"), *(ROOT / f for f in PURE_FILES)])
FORBIDDEN = {"asyncio", "socket", "time", "threading", "secrets", "os", "select", "selectors", "subprocess",
             "random", "uvloop", "qasync", "PySide6", "shallot.core.udp", "shallot.core.engine",
             "shallot.core.client", "shallot.core.control", "shallot.relay.service",
             "shallot.core.discovery.dht", "shallot.core.discovery.service", "shallot.core.discovery.cache",
             "rpcudp", "kademlia.network", "kademlia.protocol", "kademlia.crawling"}


def _imports(path: Path) -> set[str]:
    """Modules imported at run time (imports under ``if TYPE_CHECKING:`` are for annotations only)."""
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                   and getattr(node.test, "id", None) == "TYPE_CHECKING" for n in ast.walk(node)}
    names: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("path", PURE, ids=lambda p: str(p.relative_to(ROOT)))
def test_pure_module_imports_no_io(path: Path) -> None:
    bad = {name for name in _imports(path) if name in FORBIDDEN or name.split(".")[0] in FORBIDDEN}
    assert not bad, f"{path.name} imports {sorted(bad)}: pass time, randomness and I/O in instead"


def test_the_check_sees_imports() -> None:
    assert "shallot.crypto.noise" in _imports(ROOT / "crypto/link_handshake.py")
    assert "asyncio" in _imports(ROOT / "core/udp.py")
