"""Under CI=true a skipped test is a failed test: every tier must run there (root, Debian, all tools
installed), so a skip can only mean a test that silently stopped testing.  A test that may skip in CI
says so with ``@pytest.mark.allowed_skip_in_ci(reason="...")`` (none does today).

Loaded by tests/conftest.py; its own test (tests/unit/test_ci_guard.py) runs it as a plugin in a child
pytest."""

from __future__ import annotations

import os
from collections.abc import Generator
from typing import Any

import pytest

MARK = "allowed_skip_in_ci"


def in_ci() -> bool:
    return os.environ.get("CI") == "true"


def _skip_reason(longrepr: Any) -> str:
    if isinstance(longrepr, tuple) and len(longrepr) == 3:  # (path, line, "Skipped: reason")
        return f"{longrepr[2]} ({longrepr[0]}:{longrepr[1]})"
    return str(longrepr)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", f"{MARK}(reason): this test may skip when CI=true, for the reason given")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, None]:
    outcome = yield
    report = outcome.get_result()
    if not (report.skipped and in_ci()) or hasattr(report, "wasxfail"):
        return
    allowed = item.get_closest_marker(MARK)
    if allowed is not None and allowed.kwargs.get("reason"):
        return
    report.outcome = "failed"
    report.longrepr = f"skipped under CI=true, where every test must run: {_skip_reason(report.longrepr)}"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Generator[None, Any, None]:
    outcome = yield
    report = outcome.get_result()
    if report.skipped and in_ci():  # a whole module skipped at import (pytest.skip(allow_module_level=True))
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true, where every test must run: {_skip_reason(report.longrepr)}"
