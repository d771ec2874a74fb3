"""For every tier: under CI=true a skip fails (tests/ci_guard.py), and a run that leaves a process,
a testbed namespace, a temporary veth, or a Shallot TUN device or nftables table in the root namespace
behind fails at the end, saying what it found (tests/leaks.py), after removing it."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator

import pytest

from tests import leaks
from tests.ci_guard import pytest_configure, pytest_make_collect_report, pytest_runtest_makereport

__all__ = ["pytest_configure", "pytest_make_collect_report", "pytest_runtest_makereport"]

leaks.mark_run()  # before any fixture or test starts a process: they all inherit the mark
# every engine of the run (in-process or a child) keeps its entry guards here, never in the user's home or
# /var/lib/shallot; removed at the end
STATE_DIR = os.environ.setdefault("SHALLOT_STATE_DIR", tempfile.mkdtemp(prefix="shallot-test-state-"))


@pytest.fixture(scope="session", autouse=True)
def nothing_left_behind() -> Iterator[None]:
    """Set up before, and torn down after, every other fixture of the run."""
    baseline = leaks.Baseline()
    yield
    if os.path.basename(STATE_DIR).startswith("shallot-test-state-"):
        shutil.rmtree(STATE_DIR, ignore_errors=True)
    found = leaks.wait_for_none(baseline)
    if found:
        leaks.remove(found)
        pytest.fail(f"the test run left this behind (now removed):\n{found.describe()}", pytrace=False)
