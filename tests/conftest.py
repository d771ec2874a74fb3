"""For every tier: under CI=true a skip fails (tests/ci_guard.py), and a run that leaves a process,
a testbed namespace, a temporary veth, or a Shallot TUN device or nftables table in the root namespace
behind fails at the end, saying what it found (tests/leaks.py), after removing it."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

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


def _engine_state_dir() -> str:
    """Every engine of the run (in-process, or a child: they inherit the environment, and tiers copy it at
    import) keeps its entry guards here, never in the user's home or /var/lib/shallot.  Named after this
    process, so a run that was killed before its clean-up is cleaned up by the next one."""
    tmp = Path(tempfile.gettempdir())
    for old in tmp.glob("shallot-test-state-*"):
        try:
            os.kill(int(old.name.split("-")[3]), 0)
        except (ProcessLookupError, ValueError, IndexError):
            shutil.rmtree(old, ignore_errors=True)
        except PermissionError:
            pass  # another user's live run
    return tempfile.mkdtemp(prefix=f"shallot-test-state-{os.getpid()}-")


STATE_DIR = os.environ.setdefault("SHALLOT_STATE_DIR", _engine_state_dir())


@pytest.fixture(scope="session", autouse=True)
def engine_state_dir() -> Iterator[None]:
    yield
    if Path(STATE_DIR).name.startswith(f"shallot-test-state-{os.getpid()}-"):
        shutil.rmtree(STATE_DIR, ignore_errors=True)
