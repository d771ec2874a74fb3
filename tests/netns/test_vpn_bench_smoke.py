"""bench/vpn_bench.py still runs end to end and reports every figure (a one-second run in its own testbed:
this checks that the benchmark works, not how fast the VPN is; speed is the benchmark's own business)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.netns.testbed import require_testbed

BENCH = Path(__file__).resolve().parents[2] / "bench" / "vpn_bench.py"

pytestmark = pytest.mark.timeout(180)


def test_vpn_bench_runs_and_reports_both_paths() -> None:
    require_testbed()
    res = subprocess.run([sys.executable, str(BENCH), "--seconds", "1"], capture_output=True, text=True,
                         timeout=170)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout)
    for path in ("raw_path", "through_circuit"):
        assert out[path]["iperf3_mbit_s"] > 0 and out[path]["iperf3_download_mbit_s"] > 0, out
        assert out[path]["ping_ms"] > 0, out
    assert out["throughput_ratio"] > 0 and out["download_ratio"] > 0 and out["ping_ratio"] > 0
    print(f"\n    vpn_bench (1 s, under the test suite's load): {out['through_circuit']['iperf3_mbit_s']} Mbit/s "
          f"through the circuit, {out['raw_path']['iperf3_mbit_s']} Mbit/s raw")
