"""A pytest plugin: a skipped test fails the run unless the skip is about the machine (a GPU it has or lacks).
A declared test dependency that is missing, or moto's S3 server that does not start, must not let the suite go
green without what those tests cover."""

from __future__ import annotations

import pytest

MACHINE_SKIPS = ("this machine has a CUDA GPU", "this machine has no CUDA GPU")


def _reason(report) -> str:
    return report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)


def _fail_unless_allowed(report) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = _reason(report)
        if not any(allowed in reason for allowed in MACHINE_SKIPS):
            report.outcome = "failed"
            report.longrepr = (
                f"skipped, which this suite does not allow: {reason} (`make test` installs every "
                "test dependency; a test that needs moto's S3 server must get one)"
            )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_unless_allowed(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _fail_unless_allowed(outcome.get_result())
