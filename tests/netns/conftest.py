"""Fixtures for tests that need network namespaces: they skip with the reason on a machine that cannot
make them, but never when CI=true (CI runs as root and must run them)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.netns.testbed import StandardTopology, Testbed, available, remove_stale


@pytest.fixture(scope="module")
def topology() -> Iterator[StandardTopology]:
    reason = available()
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(f"netns tests must run in CI: {reason}")
        pytest.skip(reason)
    remove_stale()
    tb = Testbed()
    try:
        yield StandardTopology(tb).build()
    finally:
        tb.close()
