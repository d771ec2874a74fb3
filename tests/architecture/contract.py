"""The architecture as rules (docs/ARCHITECTURE.md): layers that import only downwards, pure packages that
never touch a clock, socket, loop or ambient randomness, and the app's one door into the core.

Each rule is a function from an import graph (tests/architecture/imports.py) to a list of violations, so
the tests can run it on the real tree and on made-up graphs that must fail.
"""

from __future__ import annotations

from dataclasses import dataclass

from tests.architecture.imports import Import


@dataclass(frozen=True)
class Layer:
    names: tuple[str, ...]  # packages or modules; a name covers itself and everything below it
    independent: bool = False  # the names of this layer must not import each other


# the control API's vocabulary (core/control/api.py and the modules it gathers): pure types every layer speaks,
# from the circuit manager that decides in EngineState and ErrorKind up to the app; the control server and
# client that carry them stay in core.control's own layer
CONTROL_VOCABULARY = ("shallot.core.control.api", "shallot.core.control.state", "shallot.core.control.errors",
                      "shallot.core.control.config", "shallot.core.control.messages")

# top to bottom; a module may import its own layer and the layers below, never one above
LAYERS = (
    Layer(("shallot.cli", "shallot.__main__", "shallot.commands", "shallot")),  # the composition root
    Layer(("shallot.app",)),
    Layer(("shallot.exit",)),
    Layer(("shallot.relay",)),
    Layer(("shallot.core.engine",)),
    Layer(("shallot.core.control", "shallot.core.vpn", "shallot.core.io"), independent=True),
    Layer(("shallot.core.circuit", "shallot.core.nat", "shallot.core.discovery"), independent=True),
    Layer(("shallot.core.link",)),
    Layer(("shallot.core.wire", "shallot.core.ratelimit", "shallot.core.peercred", "shallot.core.errors",
           "shallot.core.privfile",
           "shallot.core", *CONTROL_VOCABULARY)),
    Layer(("shallot.crypto",)),
    Layer(("shallot.resources",)),
)

# sans-I/O code: time, randomness and I/O are passed in
PURE = ("shallot.crypto", "shallot.core.wire", "shallot.core.link", "shallot.core.circuit", "shallot.core.nat",
        "shallot.core.ratelimit", "shallot.core.errors", *CONTROL_VOCABULARY,
        "shallot.core.discovery.addresses", "shallot.core.discovery.records", "shallot.core.discovery.storage",
        "shallot.core.discovery.wire", "shallot.core.discovery.view", "shallot.core.vpn.helper_protocol",
        "shallot.relay.forwarder", "shallot.relay.endpoints", "shallot.relay.quotas",
        "shallot.exit.echo", "shallot.exit.policy", "shallot.exit.ipservice", "shallot.exit.endpoints",
        "shallot.exit.dnsquery",
        "shallot.app.presenter")
NOT_PURE = ("asyncio", "socket", "time", "threading", "secrets", "os", "select", "selectors", "subprocess",
            "random", "shutil", "signal", "fcntl", "pathlib", "tempfile", "uvloop", "qasync", "PySide6",
            "pytun", "pyroute2", "rpcudp", "kademlia.network", "kademlia.protocol", "kademlia.crawling")

# the desktop app reaches the core only through the control API (and names a few plain helpers; killmark:
# whether a kill switch outlived its engine, which no engine may be left to say)
APP_DOORS = ("shallot.app", "shallot.core.control", "shallot.core.errors", "shallot.core.discovery.directory",
             "shallot.relay.localnet", "shallot.core.vpn.killmark")


def covers(name: str, module: str) -> bool:
    return module == name or (module.startswith(name + ".") and name != "shallot")


def owner(module: str) -> tuple[int, str] | None:
    """(layer index, the name in it) that covers ``module``, the most specific name winning."""
    best: tuple[int, str] | None = None
    for index, layer in enumerate(LAYERS):
        for name in layer.names:
            if covers(name, module) and (best is None or len(name) > len(best[1])):
                best = (index, name)
    return best


def is_pure(module: str) -> bool:
    return any(covers(name, module) for name in PURE)


def unassigned(graph: dict[str, list[Import]]) -> list[str]:
    return sorted(m for m in graph if owner(m) is None)


def layer_violations(graph: dict[str, list[Import]]) -> list[str]:
    out = []
    for module, imports in graph.items():
        src = owner(module)
        for imp in imports:
            dst = owner(imp.target)
            if src is None or dst is None or not imp.target.startswith("shallot"):
                continue
            if dst[0] < src[0]:
                out.append(f"{module}:{imp.line} imports {imp.target}, a layer above it ({dst[1]} > {src[1]})")
            elif dst[0] == src[0] and LAYERS[src[0]].independent and dst[1] != src[1]:
                out.append(f"{module}:{imp.line} imports {imp.target}: {src[1]} and {dst[1]} are independent")
    return sorted(out)


def _parents(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _runs_pure(package: str, graph: dict[str, list[Import]], seen: set[str]) -> bool:
    """Running ``package``'s ``__init__`` (Python does before any module below it) imports only pure code."""
    if is_pure(package) or package in seen or package not in graph:
        return True
    seen.add(package)
    for imp in graph[package]:
        if imp.typing_only:
            continue
        if any(covers(name, imp.target) for name in NOT_PURE):
            return False
        if imp.target.startswith("shallot.") and not (is_pure(imp.target) or _runs_pure(imp.target, graph, seen)):
            return False
    return True


def purity_violations(graph: dict[str, list[Import]]) -> list[str]:
    """Pure modules import only pure modules, and every package ``__init__`` that importing them runs (a
    re-export of an asyncio module there would load it behind the pure module's back) is pure too."""
    out = []
    for module, imports in graph.items():
        if not is_pure(module):
            continue
        for parent in _parents(module):
            if not _runs_pure(parent, graph, set()):
                out.append(f"{module}: its package {parent} imports impure code when it loads")
        for imp in imports:
            if imp.typing_only:
                continue
            bad = any(covers(name, imp.target) for name in NOT_PURE)
            if imp.target.startswith("shallot.") and (not is_pure(imp.target) or not all(
                    _runs_pure(parent, graph, set()) for parent in _parents(imp.target))):
                bad = True
            if bad:
                out.append(f"{module}:{imp.line} imports {imp.target}: pure code gets time, randomness and I/O "
                           "passed in")
    return sorted(set(out))


def door_violations(graph: dict[str, list[Import]]) -> list[str]:
    out = []
    for module, imports in graph.items():
        if not covers("shallot.app", module):
            continue
        for imp in imports:
            if imp.target.startswith("shallot.") and not any(covers(door, imp.target) for door in APP_DOORS):
                out.append(f"{module}:{imp.line} imports {imp.target}: the app talks to the core through "
                           "shallot.core.control")
    return sorted(out)
