"""For every tier: under CI=true a skip fails (tests/ci_guard.py), and a run that leaves a process,
a testbed namespace, a temporary veth, or a Shallot TUN device or nftables table in the root namespace
behind fails at the end, saying what it found (tests/leaks.py), after removing it."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests import leaks
from tests.ci_guard import pytest_configure, pytest_make_collect_report, pytest_runtest_makereport

__all__ = ["pytest_configure", "pytest_make_collect_report", "pytest_runtest_makereport"]

leaks.mark_run()  # before any fixture or test starts a process: they all inherit the mark


@pytest.fixture(scope="session", autouse=True)
def nothing_left_behind() -> Iterator[None]:
    """Set up before, and torn down after, every other fixture of the run."""
    baseline = leaks.Baseline()
    yield
    found = leaks.wait_for_none(baseline)
    if found:
        leaks.remove(found)
        pytest.fail(f"the test run left this behind (now removed):\n{found.describe()}", pytrace=False)


@pytest.fixture(scope="session", autouse=True)
def engine_state_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Every engine of the run (in-process, or a child process: they inherit the environment) keeps its entry
    guards under pytest's own temporary directory, never in the user's home or /var/lib/shallot."""
    old = os.environ.get("SHALLOT_STATE_DIR")
    os.environ["SHALLOT_STATE_DIR"] = str(tmp_path_factory.mktemp("engine-state"))
    yield
    if old is None:
        os.environ.pop("SHALLOT_STATE_DIR", None)
    else:
        os.environ["SHALLOT_STATE_DIR"] = old
