"""Attach the tail of the webui server's log to every failing e2e test's report."""

import pytest

from . import webui_harness


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        tail = webui_harness.read_log_tail()
        if tail:
            report.sections.append((f"webui log tail ({webui_harness.CURRENT_LOG['path']})", tail))
