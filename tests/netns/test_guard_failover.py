"""Fast failover without giving up guards (docs/PROTOCOL.md §5.10, §9.5 "Dead circuits"): under a running
`shallot connect` the guard of the circuit is killed with SIGKILL; the time from the kill to the first HTTP
answer through the tunnel is measured, printed and held to 5 s (it was 23.1 s before entry guards: three
unanswered 3 s pings 5 s apart, then a rebuild).  Then a restarted `shallot connect` keeps the guard it
moved to: the dead first primary is still backing off, and the state file says so.

Two guard-capable relays besides the middle: the testbed's guard and a fourth relay in its own /16."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from shallot.crypto.descriptor import encode_directory
from shallot.relay import state as state_dir
from tests.netns.test_circuit_through_nat import _wait_line
from tests.netns.test_kill_switch import _status, start_four_relays
from tests.netns.testbed import StandardTopology

HTTP_PORT = 8080
FAILOVER_LIMIT_S = 5.0
# in the client namespace, started right after the kill (its start-up counts against us): one GET at a time
# with a short timeout until one is answered; prints the monotonic time of the answer (CLOCK_MONOTONIC is one
# clock for every process of the machine)
HTTP_UNTIL_ANSWERED = """
import sys, time, urllib.request
url = sys.argv[1]
while True:
    try:
        with urllib.request.urlopen(url, timeout=0.5) as r:
            r.read()
        print(f"answered {time.monotonic():.6f}", flush=True)
        break
    except OSError:
        time.sleep(0.02)
"""


@pytest.mark.timeout(240)
def test_killing_the_guard_costs_under_five_seconds_and_a_restart_keeps_the_new_guard(
        topology: StandardTopology, tmp_path: Path) -> None:
    tb = topology.tb
    states, procs = start_four_relays(topology, tmp_path)
    site = tmp_path / "site"
    site.mkdir()
    (site / "index.html").write_text("through the tunnel\n")
    _wait_line(tb.spawn(topology.ns["web"], [sys.executable, "-u", "-m", "http.server", str(HTTP_PORT), "--bind",
                                             "0.0.0.0", "--directory", str(site)]), "Serving HTTP", timeout=20)
    directory = tmp_path / "directory"
    directory.write_text(encode_directory([state_dir.read_descriptor(s) for s in states.values()]))
    client_ns, sock = topology.ns["client"], tmp_path / "engine.sock"
    env = {"SHALLOT_STATE_DIR": str(tmp_path / "client-state")}  # a fresh guard set, this test's alone
    argv = [sys.executable, "-m", "shallot", "connect", "--directory", str(directory), "--exit", "exit",
            "--socket", str(sock)]
    url = f"http://{topology.addr['web']}:{HTTP_PORT}/"

    connect = tb.spawn(client_ns, argv, env=env)
    _wait_line(connect, "shallot: connected", timeout=30)
    assert "through the tunnel" in tb.exec(client_ns, "curl", "-sS", "--max-time", "5", url).stdout
    first = _status(sock)
    guard = first["circuit"][0]["nickname"]
    primaries = [g["nickname"] for g in first["guards"] if g["primary"]]
    assert guard == primaries[0] and guard != "exit", first["guards"]

    killed_at = time.monotonic()
    procs[guard].kill()  # SIGKILL: the guard vanishes without a word
    getter = tb.spawn(client_ns, [sys.executable, "-c", HTTP_UNTIL_ANSWERED, url])
    line = _wait_line(getter, "answered", timeout=60)
    failover = float(line.split()[-1]) - killed_at
    print(f"\nguard {guard} killed (SIGKILL) -> first HTTP answer through the tunnel: {failover:.2f} s "
          f"(limit {FAILOVER_LIMIT_S:.0f} s; 23.1 s before entry guards)")
    after = _status(sock)
    new_guard = after["circuit"][0]["nickname"]
    assert new_guard == primaries[1], (guard, after["guards"])  # the next primary, not a fresh draw
    states_now = {g["nickname"]: g["state"] for g in after["guards"]}
    assert states_now[guard] == "retrying" and len(after["guards"]) == 3, after["guards"]
    if failover > FAILOVER_LIMIT_S:  # what the relays and the engine saw, for whoever reads the failure
        for role, proc in procs.items():
            if proc.poll() is None:
                print("relay", role, json.dumps(_status(states[role] / state_dir.CONTROL_SOCKET))[:3000])
        connect.terminate()
        print("engine log:", connect.communicate(timeout=20)[1][-6000:])
    assert failover <= FAILOVER_LIMIT_S

    connect.terminate()
    assert connect.wait(15) == 0
    saved = json.loads((tmp_path / "client-state" / "guards").read_text())
    assert [g["nickname"] for g in saved["guards"]][:2] == primaries  # the order survives
    again = tb.spawn(client_ns, argv, env=env)  # a restart: same primaries, the dead one still backing off
    _wait_line(again, "shallot: connected", timeout=30)
    assert _status(sock)["circuit"][0]["nickname"] == new_guard
    again.terminate()
    assert again.wait(15) == 0

