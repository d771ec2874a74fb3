"""Circuits from the client's side, sans-I/O: building in one round trip, sending and receiving through
the onion layers, tearing down (client.py), and choosing the relays of a path (path.py)."""

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
