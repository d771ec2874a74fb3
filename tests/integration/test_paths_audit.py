"""``shallot paths`` on a signed directory file of real descriptors (keygen'd state directories bundled by
``shallot directory``): the review's Sybil network (A.3a: 30 honest relays in 30 /16s, 5 exits; 300
identities on 3 attacker addresses, 100 exits), audited as a fresh client would choose its paths.

The fair share and the target are those of tests/unit/test_path_sybil.py: (3/33)^2 = 1/121 = 0.826 % of
paths with guard and exit both the attacker's, target at most 2/121 = 1.653 %.
"""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import pytest

from shallot.relay import state as state_dir
from tests.integration.conftest import assert_one_line_error, run_cli

pytestmark = pytest.mark.timeout(120)

TARGET = 2 * Fraction(3, 33) ** 2
ATTACKER = ("200.9.0.1", "201.9.0.1", "202.9.0.1")


def _network(root: Path) -> Path:
    states = []
    for i in range(30):  # honest: one /16 each, the first five exits
        states.append(root / f"h{i}")
        state_dir.keygen(states[-1], (f"{20 + i}.1.0.1", 9000), f"honest{i}", i < 5)
    for j in range(300):  # the attacker: 100 identities per address, every third one an exit
        states.append(root / f"s{j}")
        state_dir.keygen(states[-1], (ATTACKER[j // 100], 10000 + j % 100), f"sybil{j}", j % 3 == 0)
    out = root / "directory"
    res = run_cli("directory", "--out", out, *states)
    assert res.returncode == 0, res.stderr
    return out


def test_paths_audits_the_sybil_network(tmp_path: Path) -> None:
    directory = _network(tmp_path)
    res = run_cli("paths", "--directory", directory, "--sample", "10000", "--seed", "1", "--json",
                  "--colluding", ",".join(f"{ip}/32" for ip in ATTACKER))
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert result["sample"] == 10000 and result["relays_in_view"] == 330
    for pos in ("guard", "middle", "exit"):
        row = result["positions"][pos]
        assert sum(row["relays"].values()) == sum(row["ips"].values()) == sum(row["slash16"].values()) == 10000
        assert all(":" not in ip for ip in row["ips"])  # IP without port
        for ip in ATTACKER:  # each attacker address is one operator: a few per cent of a position, not 30 %
            assert row["ips"].get(ip, 0) < 0.2 * 10000, (pos, ip, row["ips"].get(ip))
    share = result["colluding"]["guard_and_exit"]
    print(f"\nshallot paths: attacker guard and exit in {share:.2%} of 10000 paths "
          f"(target <= {float(TARGET):.3%}); same-operator guard/exit: {result['guard_exit_same_operator']}")
    assert share <= TARGET
    assert result["guard_exit_same_operator"]["any"] == 0.0  # no two hops in one /16 or family, ever

    human = run_cli("paths", "--directory", directory, "--sample", "500")
    assert human.returncode == 0, human.stderr
    assert "500 paths sampled from 330 relays" in human.stdout
    assert "guard and exit look like one operator in 0.00% of paths" in human.stdout
    for pos in ("guard:", "middle:", "exit:"):
        assert pos in human.stdout


def test_paths_refuses_bad_arguments_in_one_line(tmp_path: Path) -> None:
    assert_one_line_error(run_cli("paths", "--directory", tmp_path / "none", "--sample", "10"))
    assert_one_line_error(run_cli("paths", "--directory", tmp_path / "none", "--sample", "0"))
