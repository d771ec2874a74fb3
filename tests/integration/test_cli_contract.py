"""The command-line contract, with real subprocesses: outputs, file modes, exit statuses, one-line errors."""

from __future__ import annotations

import base64
import json
import re
import signal
import socket
import stat
import time
from pathlib import Path
from typing import Any

import pytest

from shallot.crypto.descriptor import DIRECTORY_HEADER, Descriptor, encode_directory
from shallot.relay import state as state_dir
from shallot.relay.localnet import free_udp_ports
from tests.integration.conftest import (
    ProcGroup,
    RunningNetwork,
    assert_one_line_error,
    run_cli,
)

pytestmark = pytest.mark.timeout(60)

PROBE_KEYS = {"path", "attempts", "build_ms", "build_round_trips", "sent", "echoed", "rtt_ms_median", "guard_link",
              "link_ms"}
LISTENING_RE = re.compile(r"^shallot (relay|exit) ([A-Za-z0-9_-]+) ([0-9a-f]{40}) listening on 127\.0\.0\.1:(\d+)$")


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _keygen_state(root: Path, name: str, *, exit_node: bool = False, port: int | None = None) -> tuple[Path, int]:
    port = port or free_udp_ports(1)[0]
    state = root / name
    state_dir.keygen(state, ("127.0.0.1", port), name, exit_node)
    return state, port


def _json_line(res: Any) -> dict[str, Any]:
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 1, f"--json must print exactly one line, got {res.stdout!r}"
    result = json.loads(lines[0])
    assert isinstance(result, dict)
    return result


def probe_json(network: RunningNetwork, *args: str, count: int = 20) -> dict[str, Any]:
    return _json_line(run_cli("probe", "--directory", network.directory, "--json", "--count", str(count), *args))


def check_probe_result(result: dict[str, Any], descriptors: list[Descriptor] | None, count: int) -> None:
    assert set(result) == PROBE_KEYS
    assert result["guard_link"] == "direct"
    path = result["path"]
    assert isinstance(path, list) and len(path) == 3 and len(set(path)) == 3
    assert all(isinstance(p, str) and re.fullmatch(r"[0-9a-f]{40}", p) for p in path)
    if descriptors is not None:
        by_id = {d.id_hex: d for d in descriptors}
        assert all(p in by_id for p in path), "path holds relays that are not in the directory"
        assert by_id[path[-1]].is_exit, "the last relay of the path must be an exit"
    assert isinstance(result["build_ms"], float) and result["build_ms"] > 0
    assert type(result["build_round_trips"]) is int and result["build_round_trips"] == 1
    assert type(result["sent"]) is int and type(result["echoed"]) is int
    assert result["sent"] == result["echoed"] == count
    assert isinstance(result["rtt_ms_median"], float) and result["rtt_ms_median"] > 0


# ---------------------------------------------------------------------------------------------- keygen


def test_keygen_creates_private_state_and_refuses_to_overwrite(tmp_path: Path) -> None:
    state = tmp_path / "st"
    port = free_udp_ports(1)[0]
    res = run_cli("keygen", "--state", state, "--address", f"127.0.0.1:{port}", "--nickname", "n", "--exit")
    assert res.returncode == 0, res.stderr
    relay_id = res.stdout.strip()
    assert re.fullmatch(r"[0-9a-f]{40}", relay_id), res.stdout
    assert _mode(state) == 0o700
    assert _mode(state / "keys.json") == 0o600
    desc = state_dir.read_descriptor(state)
    assert desc.id_hex == relay_id
    assert desc.is_exit and desc.nickname == "n" and desc.address == ("127.0.0.1", port)
    keys_before = (state / "keys.json").read_bytes()

    again = run_cli("keygen", "--state", state, "--address", f"127.0.0.1:{port}", "--nickname", "n", "--exit")
    assert_one_line_error(again, str(state))
    assert (state / "keys.json").read_bytes() == keys_before, "a second keygen must not touch the keys"


@pytest.mark.parametrize("address", ["127.0.0.1", "127.0.0.1:0", "127.0.0.1:70000", "127.0.0.1:port",
                                     ":4000", "localhost:4000", "not an address"])
def test_keygen_bad_address_is_a_one_line_error(tmp_path: Path, address: str) -> None:
    res = run_cli("keygen", "--state", tmp_path / "st", "--address", address)
    assert_one_line_error(res)
    assert not (tmp_path / "st" / "keys.json").exists()


def test_keygen_bad_nickname_is_a_one_line_error(tmp_path: Path) -> None:
    res = run_cli("keygen", "--state", tmp_path / "st", "--address", "127.0.0.1:4000", "--nickname", "no spaces!")
    assert_one_line_error(res, "nickname")


# ---------------------------------------------------------------------------------------------- directory


def test_directory_bundles_descriptors(tmp_path: Path) -> None:
    a, _ = _keygen_state(tmp_path, "a")
    b, _ = _keygen_state(tmp_path, "b", exit_node=True)
    out = tmp_path / "dir.txt"
    res = run_cli("directory", "--out", out, a, b)
    assert res.returncode == 0, res.stderr
    text = out.read_text()
    assert text.startswith(DIRECTORY_HEADER + "\n")
    assert text.startswith("shallot-directory 1")
    entries = text.splitlines()[1:]
    assert entries == [state_dir.read_descriptor(a).to_text(), state_dir.read_descriptor(b).to_text()]


def test_directory_rejects_the_same_relay_twice(tmp_path: Path) -> None:
    a, _ = _keygen_state(tmp_path, "a")
    res = run_cli("directory", "--out", tmp_path / "d", a, a)
    assert_one_line_error(res, "twice")
    assert not (tmp_path / "d").exists()


def test_directory_of_a_missing_state_is_a_one_line_error(tmp_path: Path) -> None:
    res = run_cli("directory", "--out", tmp_path / "d", tmp_path / "nope")
    assert_one_line_error(res, "nope")


def _expired_state(tmp_path: Path) -> tuple[Path, Descriptor]:
    """A keygen'd state whose descriptor was published 10 days ago for 1 day."""
    port = free_udp_ports(1)[0]
    state = tmp_path / "old"
    res = run_cli("keygen", "--state", state, "--address", f"127.0.0.1:{port}", "--nickname", "old", "--exit")
    assert res.returncode == 0, res.stderr
    keys, settings = state_dir.load(state)
    desc = Descriptor.create(keys, nickname=settings.nickname, addresses=(settings.address,), exit_node=True,
                             published=int(time.time() - 10 * 86400), lifetime_s=86400)
    (state / "descriptor").write_text(desc.to_text() + "\n")
    return state, desc


def test_expired_descriptor_is_refused_by_directory_and_probe(tmp_path: Path) -> None:
    state, desc = _expired_state(tmp_path)
    res = run_cli("directory", "--out", tmp_path / "d", state)
    assert_one_line_error(res, "expired")
    assert not (tmp_path / "d").exists()

    dfile = tmp_path / "expired-directory"
    dfile.write_text(encode_directory([desc]))
    res = run_cli("probe", "--directory", dfile, "--json", "--count", "1")
    assert_one_line_error(res, "expired")
    assert res.stdout == ""


# ---------------------------------------------------------------------------------------------- relay / exit


@pytest.mark.parametrize(("command", "exit_node", "sig"), [
    ("relay", False, signal.SIGTERM),
    ("relay", False, signal.SIGINT),
    ("relay", True, signal.SIGTERM),
    ("exit", True, signal.SIGINT),
])
def test_relay_prints_listening_line_and_stops_cleanly(tmp_path: Path, procs: ProcGroup, command: str,
                                                       exit_node: bool, sig: int) -> None:
    state, port = _keygen_state(tmp_path, "r", exit_node=exit_node)
    relay_id = state_dir.read_descriptor(state).id_hex
    proc = procs.start(command, "--state", state)
    line = proc.wait_line("listening").strip()
    m = LISTENING_RE.match(line)
    assert m, line
    assert m.group(1) == ("exit" if exit_node else "relay")
    assert m.groups()[1:] == ("r", relay_id, str(port))
    sock = state / state_dir.CONTROL_SOCKET
    assert sock.exists() and _mode(sock) == 0o600
    proc.signal(sig)
    assert proc.wait(15) == 0, proc.stderr()
    assert not sock.exists(), "the control socket must be removed on a clean stop"
    assert "Traceback" not in proc.stderr()


def test_exit_command_on_a_non_exit_state_fails(tmp_path: Path) -> None:
    state, _ = _keygen_state(tmp_path, "r", exit_node=False)
    res = run_cli("exit", "--state", state)
    assert_one_line_error(res, "--exit")


def test_relay_on_a_missing_state_fails(tmp_path: Path) -> None:
    res = run_cli("relay", "--state", tmp_path / "missing")
    assert_one_line_error(res, "keygen")


def test_relay_on_a_port_in_use_fails(tmp_path: Path) -> None:
    blocker = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        blocker.bind(("127.0.0.1", 0))
        port = blocker.getsockname()[1]
        state, _ = _keygen_state(tmp_path, "r", port=port)
        res = run_cli("relay", "--state", state)
        assert_one_line_error(res, "in use", str(port))
        assert not (state / state_dir.CONTROL_SOCKET).exists()
    finally:
        blocker.close()


def test_relay_with_corrupt_keys_fails(tmp_path: Path) -> None:
    state, _ = _keygen_state(tmp_path, "r")
    (state / "keys.json").write_text('{"format": "shallot-relay-keys-1", "identity_seed": "nope"}')
    res = run_cli("relay", "--state", state)
    assert_one_line_error(res, "keys.json")


def test_directory_out_to_a_missing_folder_fails(tmp_path: Path) -> None:
    a, _ = _keygen_state(tmp_path, "a")
    res = run_cli("directory", "--out", tmp_path / "no" / "such" / "dir.txt", a)
    assert_one_line_error(res, "cannot write")


def test_status_when_nothing_runs(tmp_path: Path) -> None:
    state, _ = _keygen_state(tmp_path, "r")
    assert_one_line_error(run_cli("status", "--state", state), "nothing is running")
    assert_one_line_error(run_cli("status", "--socket", tmp_path / "engine.sock"), "nothing is running")


def test_status_of_a_running_relay(network: RunningNetwork) -> None:
    desc = network.non_exits[0]
    res = run_cli("status", "--state", network.state(desc), "--json")
    assert res.returncode == 0, res.stderr
    status = json.loads(res.stdout)
    assert status["id"] == desc.id_hex and status["role"] == "relay" and status["nickname"] == desc.nickname
    assert isinstance(status["counters"], dict)


# ---------------------------------------------------------------------------------------------- probe


def test_probe_json_contract(network: RunningNetwork) -> None:
    result = probe_json(network, count=20)
    check_probe_result(result, network.descriptors, 20)


def test_probe_path_by_nicknames(network: RunningNetwork) -> None:
    guard, middle = network.non_exits[:2]
    exit_ = network.exits[0]
    result = probe_json(network, "--path", f"{guard.nickname},{middle.nickname},{exit_.nickname}", count=5)
    check_probe_result(result, network.descriptors, 5)
    assert result["path"] == [guard.id_hex, middle.id_hex, exit_.id_hex]


def test_probe_path_by_full_ids_and_exit_agrees(network: RunningNetwork) -> None:
    # an exit may sit in the middle too; the last one must be an exit
    guard, middle, exit_ = network.non_exits[2], network.exits[0], network.exits[1]
    path = [guard.id_hex, middle.id_hex, exit_.id_hex]
    result = probe_json(network, "--path", ",".join(path), "--exit", exit_.id_hex.upper(), count=5)
    check_probe_result(result, network.descriptors, 5)
    assert result["path"] == path


@pytest.mark.parametrize("which", [0, 1])
def test_probe_exit_is_honoured(network: RunningNetwork, which: int) -> None:
    exit_ = network.exits[which]
    result = probe_json(network, "--exit", exit_.id_hex, count=5)
    check_probe_result(result, network.descriptors, 5)
    assert result["path"][-1] == exit_.id_hex


def test_probe_exit_by_nickname(network: RunningNetwork) -> None:
    exit_ = network.exits[1]
    result = probe_json(network, "--exit", exit_.nickname, count=3)
    check_probe_result(result, network.descriptors, 3)
    assert result["path"][-1] == exit_.id_hex


def test_probe_human_output(network: RunningNetwork) -> None:
    res = run_cli("probe", "--directory", network.directory, "--count", "3")
    assert res.returncode == 0, res.stderr
    assert "3/3 echoed" in res.stdout and "1 round trip(s)" in res.stdout, res.stdout
    assert res.stdout.startswith("circuit   you -> ")


# ---------------------------------------------------------------------------------------------- probe: bad input


def test_probe_missing_directory_file(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-directory"
    res = run_cli("probe", "--directory", missing, "--json")
    assert_one_line_error(res, str(missing))
    assert res.stdout == ""


def test_probe_unreadable_directory_file(tmp_path: Path) -> None:
    # a directory where a file should be: unreadable even for root (chmod 000 would not stop root)
    res = run_cli("probe", "--directory", tmp_path, "--json")
    assert_one_line_error(res, str(tmp_path))
    binary = tmp_path / "binary"
    binary.write_bytes(b"\xff\xfe\x00garbage\x80\x81")
    res = run_cli("probe", "--directory", binary, "--json")
    assert_one_line_error(res, str(binary))


@pytest.mark.parametrize("text", ["", "hello world\n", "shallot-directory 2\nAAAA\n", "shallot-directory 1\n",
                                  "shallot-directory 1\n!!! not base64 !!!\n"])
def test_probe_not_a_directory(tmp_path: Path, text: str) -> None:
    f = tmp_path / "d"
    f.write_text(text)
    res = run_cli("probe", "--directory", f, "--json")
    assert_one_line_error(res)


def _corrupt(line: str) -> str:
    raw = bytearray(base64.b64decode(line, validate=True))
    raw[50] ^= 0x01  # inside the signed link key: the signature no longer verifies
    return base64.b64encode(bytes(raw)).decode()


def test_probe_all_descriptors_corrupted(network: RunningNetwork, tmp_path: Path) -> None:
    lines = network.directory.read_text().splitlines()
    bad = tmp_path / "bad-directory"
    bad.write_text("\n".join([lines[0], *(_corrupt(ln) for ln in lines[1:])]) + "\n")
    res = run_cli("probe", "--directory", bad, "--json")
    assert_one_line_error(res, "signature")
    assert res.stdout == ""


def test_probe_one_descriptor_corrupted_uses_the_others(network: RunningNetwork, tmp_path: Path) -> None:
    lines = network.directory.read_text().splitlines()
    corrupted = network.exits[0]
    idx = next(i for i, ln in enumerate(lines) if ln == corrupted.to_text())
    lines[idx] = _corrupt(lines[idx])
    f = tmp_path / "one-bad"
    f.write_text("\n".join(lines) + "\n")
    for _ in range(3):  # random paths: the corrupted relay is never picked
        res = run_cli("probe", "--directory", f, "--json", "--count", "3")
        assert res.returncode == 0, res.stderr
        assert "Traceback" not in res.stderr
        result = json.loads(res.stdout)
        check_probe_result(result, network.descriptors, 3)
        assert corrupted.id_hex not in result["path"]
        assert result["path"][-1] == network.exits[1].id_hex  # the only exit left
    res = run_cli("probe", "--directory", f, "--json", "--exit", corrupted.id_hex)
    # the skipped entry is reported as a warning; the error itself is still one line, and last
    assert res.returncode != 0 and "Traceback" not in res.stderr
    *warnings, error = res.stderr.strip().splitlines()
    assert error.startswith("shallot: error:") and corrupted.id_hex in error, error
    assert all("WARNING" in w and "signature" in w for w in warnings), warnings


@pytest.mark.parametrize("option", ["--path", "--exit"])
def test_probe_unknown_relay(network: RunningNetwork, option: str) -> None:
    unknown = "ab" * 20
    assert unknown not in {d.id_hex for d in network.descriptors}
    value = (f"{network.non_exits[0].id_hex},{unknown},{network.exits[0].id_hex}" if option == "--path"
             else unknown)
    res = run_cli("probe", "--directory", network.directory, "--json", option, value)
    assert_one_line_error(res, "unknown relay", unknown)
    assert res.stdout == ""


@pytest.mark.parametrize("spec", ["a,b", "x,y,z,w"])
def test_probe_path_needs_three_relays(network: RunningNetwork, spec: str) -> None:
    res = run_cli("probe", "--directory", network.directory, "--path", spec)
    assert_one_line_error(res, "three")


def test_probe_path_must_end_at_an_exit_and_be_distinct(network: RunningNetwork) -> None:
    a, b, c = network.non_exits[:3]
    res = run_cli("probe", "--directory", network.directory, "--path", f"{a.id_hex},{b.id_hex},{c.id_hex}")
    assert_one_line_error(res, "not an exit")
    e = network.exits[0]
    res = run_cli("probe", "--directory", network.directory, "--path", f"{a.id_hex},{a.id_hex},{e.id_hex}")
    assert_one_line_error(res)
    res = run_cli("probe", "--directory", network.directory, "--path", f"{a.id_hex},{b.id_hex},{e.id_hex}",
                  "--exit", network.exits[1].id_hex)
    assert_one_line_error(res, "--exit")


@pytest.mark.parametrize("args", [["--size", "1361"], ["--size", "-1"], ["--count", "-1"]])
def test_probe_bad_numbers(network: RunningNetwork, args: list[str]) -> None:
    res = run_cli("probe", "--directory", network.directory, *args)
    assert_one_line_error(res)


# ---------------------------------------------------------------------------------------------- demo


def test_demo_json() -> None:
    result = _json_line(run_cli("demo", "--json", timeout=40))
    check_probe_result(result, None, result["sent"])
    assert result["sent"] == result["echoed"] == 10
