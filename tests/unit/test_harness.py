"""The suite's own guards can fail: a skip under CI=true fails the run (tests/ci_guard.py), and the leak
check sees a process or namespace the run left behind (tests/leaks.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import leaks

REPO = Path(__file__).resolve().parents[2]

CHILD_TESTS = '''
import pytest

def test_passes():
    pass

def test_skips():
    pytest.skip("no widget on this machine")

@pytest.mark.allowed_skip_in_ci(reason="shows the escape hatch works")
def test_allowed_to_skip():
    pytest.skip("allowed")

@pytest.mark.skipif(True, reason="a skipif mark")
def test_skipif():
    pass
'''

CHILD_MODULE_SKIP = '''
import pytest
pytest.skip("this whole module", allow_module_level=True)
'''


def _child_pytest(tmp_path: Path, ci: str | None, source: str = CHILD_TESTS) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_child.py").write_text(source)
    (tmp_path / "pytest.ini").write_text("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PYTHONPATH"] = str(REPO)
    if ci is not None:
        env["CI"] = ci
    argv = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "tests.ci_guard", "-p", "no:cacheprovider",
            str(tmp_path)]
    return subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


def test_under_ci_every_skip_fails_unless_marked_allowed(tmp_path: Path) -> None:
    res = _child_pytest(tmp_path, "true")
    assert res.returncode == 1, res.stdout + res.stderr
    out = res.stdout
    assert "skipped under CI=true, where every test must run: Skipped: no widget on this machine" in out, out
    assert "a skipif mark" in out, out
    assert "1 failed, 1 passed, 1 skipped, 1 error" in out, out  # a skipif fires in setup: an error


def test_under_ci_a_module_skipped_at_import_fails(tmp_path: Path) -> None:
    res = _child_pytest(tmp_path, "true", CHILD_MODULE_SKIP)
    assert res.returncode != 0, res.stdout + res.stderr
    assert "ERROR collecting test_child.py" in res.stdout and "this whole module" in res.stdout, res.stdout
    res = _child_pytest(tmp_path, None, CHILD_MODULE_SKIP)
    assert res.returncode == 5 and "1 skipped" in res.stdout, res.stdout  # 5: no test ran, not a failure


def test_outside_ci_skips_stay_skips_and_are_listed(tmp_path: Path) -> None:
    res = _child_pytest(tmp_path, None)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "1 passed, 3 skipped" in res.stdout, res.stdout
    assert res.stdout.count("SKIPPED [") == 3, res.stdout  # -rs prints each skip with its reason
    res = _child_pytest(tmp_path, "1")  # only exactly "true" means CI (what .ci/run exports)
    assert res.returncode == 0, res.stdout + res.stderr


def test_the_leak_check_finds_a_process_the_run_started_and_removes_it() -> None:
    baseline = leaks.Baseline()
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        found = leaks.find(baseline)
        assert proc.pid in found.processes and "time.sleep(60)" in found.processes[proc.pid]
        assert f"process {proc.pid}:" in found.describe()
        leaks.remove(leaks.Leaks(processes={proc.pid: found.processes[proc.pid]}))
        assert proc.poll() is not None and proc.pid not in leaks.find(baseline).processes
    finally:
        proc.kill()
        proc.wait()


def test_a_process_without_the_run_mark_is_not_ours() -> None:
    env = {k: v for k, v in os.environ.items() if k != leaks.RUN_MARK}
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], env=env)
    try:
        time.sleep(0)  # the child exists as soon as Popen returns
        assert proc.pid not in leaks.find(leaks.Baseline()).processes
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.skipif(os.geteuid() != 0 and os.environ.get("CI") != "true", reason="namespaces need root")
def test_the_leak_check_finds_a_testbed_namespace() -> None:
    ns = f"{leaks.testbed_prefix()}leakcheck"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        found = leaks.find(leaks.Baseline())
        assert ns in found.namespaces and f"network namespace {ns}" in found.describe()
        leaks.remove(leaks.Leaks(namespaces=[ns]))
        assert ns not in leaks.find(leaks.Baseline()).namespaces
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
