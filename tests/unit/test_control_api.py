"""The control API's types write exactly the JSON of docs/PROTOCOL.md §9: the snapshot's keys, the hello,
the peers reply, the EngineConfig of ``configure`` and the error kinds' names."""

from __future__ import annotations

from shallot.core.control.api import (
    FINAL,
    Configure,
    Connect,
    EngineConfig,
    EngineState,
    ErrorKind,
    Hello,
    HopStatus,
    PeersReply,
    RelayEntry,
    Role,
    SetDirectory,
    Status,
    StatusSnapshot,
    encode_request,
)

SNAPSHOT_KEYS = ["state", "step", "error", "error_code", "mode", "trying", "kill_switch", "directory", "exit",
                 "circuit", "build_ms", "rtt_ms", "connected_since", "circuit_since", "circuits_built", "bytes_sent",
                 "bytes_received", "relays_known", "dht_peers", "discovery", "nat", "blocked", "guards",
                 "guard_warning"]


def test_the_snapshot_has_the_keys_of_the_protocol() -> None:
    hops = tuple(HopStatus(role, f"{i:x}" * 40, f"n{i}", f"127.0.0.1:{7000 + i}", role == "exit", 1.5)
                 for i, role in enumerate(("guard", "middle", "exit")))
    snap = StatusSnapshot(EngineState.CONNECTED, circuit=hops, error_kind=None)
    raw = snap.to_json()
    assert list(raw) == SNAPSHOT_KEYS
    assert list(raw["circuit"][0]) == ["id", "nickname", "address", "exit", "rtt_ms"]
    assert (raw["state"], raw["error_code"], raw["mode"], raw["trying"]) == ("connected", "", "probe", True)
    failed = StatusSnapshot(EngineState.ERROR, error="x", error_kind=ErrorKind.HELPER_DENIED, trying=False)
    assert failed.to_json()["error_code"] == "helper-denied"
    assert StatusSnapshot.from_json(raw) == snap


def test_hello_and_requests_on_the_wire() -> None:
    hello = Hello(Role.CLIENT, frozenset({"status", "configure"}))
    assert hello.to_json() == {"shallot": "control", "version": 2, "role": "client",
                               "supports": ["configure", "status"]}
    assert encode_request(1, Status()) == {"id": 1, "cmd": "status", "args": {}}
    assert encode_request(2, Connect(exit="x1")) == {"id": 2, "cmd": "connect", "args": {"exit": "x1"}}
    assert encode_request(3, SetDirectory("/d"))["args"] == {"path": "/d"}
    assert encode_request(4, Configure(EngineConfig(bootstrap=("192.0.2.1:7001",), vpn=True))) == {
        "id": 4, "cmd": "configure", "args": {"directory": None, "bootstrap": ["192.0.2.1:7001"], "cache": None,
                                              "vpn": True, "kill_switch": True, "dns": True,
                                              "private_network": False}}
    assert EngineConfig.from_json({}) == EngineConfig()  # every field has its default


def test_peers_reply_keys() -> None:
    dated = RelayEntry("ab", "n", "127.0.0.1:7001", True, 10, 20)
    undated = RelayEntry("ab", "n", "127.0.0.1:7001", False)
    assert PeersReply(True, (), (dated,)).to_json() == {
        "dht_peers": [], "relays": [{"id": "ab", "nickname": "n", "address": "127.0.0.1:7001", "exit": True,
                                     "published": 10, "expires": 20}], "dht": True}
    assert list(undated.to_json()) == ["id", "nickname", "address", "exit"]  # a directory file's entry


def test_error_kinds_keep_their_wire_names() -> None:
    wire = {"bad-request", "unknown-command", "internal", "error", "not-connected", "no-directory", "bad-directory",
            "bad-config", "busy", "helper-missing", "helper-denied", "helper-failed"}
    assert wire <= {k.value for k in ErrorKind}
    assert FINAL == {ErrorKind.HELPER_MISSING, ErrorKind.HELPER_DENIED, ErrorKind.HELPER_FAILED}
    assert ErrorKind.from_wire("helper-missing") is ErrorKind.HELPER_MISSING
    assert ErrorKind.from_wire("") is None and ErrorKind.from_wire(7) is None
