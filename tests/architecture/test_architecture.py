"""The architecture holds (docs/ARCHITECTURE.md): imports point down the layers, pure packages stay free
of clocks, sockets, loops and ambient randomness, and the app enters the core through the control API.
Each rule is also run on a made-up graph that breaks it, so a rule that can no longer fail fails here."""

from __future__ import annotations

import pytest

from tests.architecture.contract import (
    door_violations,
    layer_violations,
    owner,
    purity_violations,
    unassigned,
)
from tests.architecture.imports import Import, graph, imports_of, modules

GRAPH = graph()


def test_the_graph_is_the_one_python_sees() -> None:
    mods = modules()
    assert {"shallot.cli", "shallot.core.link.layer", "shallot.crypto.noise", "shallot.app.window",
            "shallot.relay.forwarder", "shallot.exit.ipservice"} <= set(mods)
    targets = {i.target for i in GRAPH["shallot.core.link.layer"]}
    assert "shallot.crypto.link_handshake" in targets  # ``from shallot.crypto import link_handshake as lh``
    assert "shallot.core.io.circuit_client" in {i.target for i in GRAPH["shallot.commands.probe"]}


def test_every_module_has_a_layer() -> None:
    assert unassigned(GRAPH) == []


def test_imports_point_down_the_layers() -> None:
    assert layer_violations(GRAPH) == []


def test_pure_code_does_no_io() -> None:
    assert purity_violations(GRAPH) == []


def test_the_app_enters_the_core_through_the_control_api() -> None:
    assert door_violations(GRAPH) == []


# ---------------------------------------------------------------------------------------------- the rules can fail
KNOWN = {"shallot.core", "shallot.core.io", "shallot.core.io.udp", "shallot.core.wire", "shallot.core.wire.cells",
         "shallot.relay", "shallot.relay.forwarder", "shallot.core.link", "shallot.core.link.layer"}


def _imports(source: str, module: str, *, is_package: bool = False) -> set[str]:
    return {i.target for i in imports_of(source, module, is_package=is_package, known=KNOWN)}


@pytest.mark.parametrize(("source", "expected"), [
    ("import shallot.core.io.udp", "shallot.core.io.udp"),
    ("from shallot.core.io import udp", "shallot.core.io.udp"),
    ("from shallot.core.io.udp import run", "shallot.core.io.udp"),
    ("from ..io import udp", "shallot.core.io.udp"),
    ("from ...relay import forwarder", "shallot.relay.forwarder"),
    ("from . import cells", "shallot.core.wire.cells"),
    ("import importlib\nimportlib.import_module('shallot.relay.forwarder')", "shallot.relay.forwarder"),
    ("__import__('shallot.relay.forwarder')", "shallot.relay.forwarder"),
    ("def later():\n    from shallot.relay.forwarder import RelayNode", "shallot.relay.forwarder"),
])
def test_every_way_of_importing_is_seen(source: str, expected: str) -> None:
    assert expected in _imports(source, "shallot.core.wire.stun")


def test_an_upward_import_is_a_violation() -> None:
    bad = {"shallot.core.wire.cells": [Import("shallot.relay.forwarder", 3, False)]}
    assert layer_violations(bad) == ["shallot.core.wire.cells:3 imports shallot.relay.forwarder, a layer above it "
                                     "(shallot.relay > shallot.core.wire)"]
    typing_only = {"shallot.core.wire.cells": [Import("shallot.relay.forwarder", 3, True)]}
    assert layer_violations(typing_only), "an annotation-only import still ties the layers together"


def test_siblings_that_must_be_independent() -> None:
    assert layer_violations({"shallot.core.nat.dialer": [Import("shallot.core.circuit.client", 9, False)]})
    assert layer_violations({"shallot.core.vpn.tunnel": [Import("shallot.core.io.udp", 9, False)]})
    assert not layer_violations({"shallot.core.io.circuit_client": [Import("shallot.core.nat", 9, False)]})


def test_impure_imports_in_pure_code_are_violations() -> None:
    assert purity_violations({"shallot.core.link.layer": [Import("time", 1, False)]})
    assert purity_violations({"shallot.core.link.layer": [Import("shallot.core.io.udp", 1, False)]})
    assert not purity_violations({"shallot.core.link.layer": [Import("random", 1, True)]})  # annotations only
    assert not purity_violations({"shallot.core.io.udp": [Import("socket", 1, False)]})


def test_a_package_init_that_loads_impure_code_taints_the_pure_modules_below_it() -> None:
    graph = {"shallot.core.control": [Import("shallot.core.control.server", 1, False)],
             "shallot.core.control.server": [Import("asyncio", 1, False)],
             "shallot.core.control.state": [],
             "shallot.core.circuit.manager": [Import("shallot.core.control.state", 3, False)]}
    assert purity_violations(graph) == [
        "shallot.core.circuit.manager:3 imports shallot.core.control.state: pure code gets time, randomness and "
        "I/O passed in",
        "shallot.core.control.state: its package shallot.core.control imports impure code when it loads"]
    graph["shallot.core.control"] = []  # an __init__ that imports nothing is fine
    assert purity_violations(graph) == []


def test_the_app_may_not_reach_into_the_engine() -> None:
    assert door_violations({"shallot.app.controller": [Import("shallot.core.engine.engine", 1, False)]})
    assert not door_violations({"shallot.app.controller": [Import("shallot.core.control", 1, False)]})


def test_owner_picks_the_most_specific_name() -> None:
    assert owner("shallot.core.link.layer")[1] == "shallot.core.link"
    assert owner("shallot.core")[1] == "shallot.core"
    assert owner("shallot")[1] == "shallot"
    assert owner("shallot.cli")[1] == "shallot.cli"
