"""Rules for the whole test tree.

`SYNAPO_REQUIRE_HOST` (set by the nox sessions `verl` and `trl`; a comma-separated list of module names) makes a
host library mandatory: if it does not import, the run stops with an error before any test, and any skip whose
reason names it (a `pytest.importorskip`, a version check) is reported as a failure. Without the variable, host
tests skip as usual, so `pytest` in an environment without verl or TRL still works.
"""

from __future__ import annotations

import importlib
import os
import re

import pytest


def _required_hosts() -> list[str]:
    return [h.strip() for h in os.environ.get("SYNAPO_REQUIRE_HOST", "").split(",") if h.strip()]


def _skip_reason(report: pytest.BaseReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:  # (path, lineno, reason)
        return str(longrepr[2])
    return str(longrepr)


def _fail_host_skip(report: pytest.BaseReport) -> None:
    """Turn a skip caused by a required host into a failure (in place)."""
    if not report.skipped or hasattr(report, "wasxfail"):
        return
    reason = _skip_reason(report)
    for host in _required_hosts():
        if re.search(rf"\b{re.escape(host)}\b", reason):
            report.outcome = "failed"
            report.longrepr = f"SYNAPO_REQUIRE_HOST={host}: a skip because of {host} is a failure here: {reason}"
            return


def pytest_sessionstart(session: pytest.Session) -> None:
    for host in _required_hosts():
        try:
            importlib.import_module(host)
        except Exception as exc:  # ImportError, or a host that breaks at import (wrong transformers, ...)
            raise pytest.UsageError(
                f"SYNAPO_REQUIRE_HOST={host} but `import {host}` fails: {type(exc).__name__}: {exc}"
            ) from exc


def pytest_report_header(config: pytest.Config) -> str | None:
    hosts = _required_hosts()
    return f"synapo: required hosts {hosts} (a skip because of them fails)" if hosts else None


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector):
    outcome = yield
    _fail_host_skip(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    _fail_host_skip(outcome.get_result())
