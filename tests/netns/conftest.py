"""Fixtures for tests that need network namespaces: they skip with the reason on a machine that cannot
make them, but never when CI=true (CI runs as root and must run them)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.netns.testbed import StandardTopology, Testbed, require_testbed


@pytest.fixture(scope="module")
def topology() -> Iterator[StandardTopology]:
    require_testbed()
    host_resolv = _host_resolv_conf()
    tb = Testbed()
    try:
        yield StandardTopology(tb).build()
    finally:
        tb.close()
        # clients under test rewrite their namespace's DNS settings: the host's must never change
        assert _host_resolv_conf() == host_resolv, "the host's /etc/resolv.conf changed during the tests"


def _host_resolv_conf() -> tuple[str, str]:
    path = Path("/etc/resolv.conf")
    link = os.readlink(path) if path.is_symlink() else ""
    try:
        return link, hashlib.sha256(path.read_bytes()).hexdigest()
    except FileNotFoundError:
        return link, ""
