"""Circuits from the client's side, sans-I/O: building in one round trip, sending and receiving through
the onion layers, tearing down (client.py), choosing the relays of a path (path.py), the guard policy a
guard manager will replace (guards.py), and the circuit manager that decides when to build, switch,
retry and give up (manager.py)."""

from shallot.core.circuit.client import (
    CircuitBuilt,
    CircuitClosed,
    CircuitFailed,
    CircuitState,
    ClientCircuit,
    ClientEvent,
    ClientNode,
    ConfigReceived,
    DatagramReceived,
    Dialer,
    DirectDialer,
    client_link_layer,
    destroy_text,
)

__all__ = ["CircuitBuilt", "CircuitClosed", "CircuitFailed", "CircuitState", "ClientCircuit", "ClientEvent",
           "ClientNode", "ConfigReceived", "DatagramReceived", "Dialer", "DirectDialer", "client_link_layer",
           "destroy_text"]
