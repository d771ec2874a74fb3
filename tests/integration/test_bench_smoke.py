"""The benchmark still runs and reports every figure (a tiny run: this checks shape, not speed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "circuit_bench.py"


def test_circuit_bench_runs_and_reports_both_setups() -> None:
    res = subprocess.run([sys.executable, str(BENCH), "--seconds", "0.3", "--builds", "3", "--rtt-samples", "3",
                          "--window", "8"], capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    for setup in ("circuit", "plain_chain"):
        for load in ("one_way", "echo"):
            assert out[setup][load]["packets_per_s"] > 0, (setup, load, out[setup][load])
        assert out[setup]["rtt_ms_median"] > 0
    assert out["circuit"]["builds"] == 3 and out["build_ms_median"] > 0
    assert 0 < out["goodput_ratio_one_way"] and 0 < out["goodput_ratio_echo"]
