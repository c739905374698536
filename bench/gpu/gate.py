"""pytest plugin for bench/gpu/check.sh (``-p gate``): a GPU test that fails only because a module
that was not carried to the GPU machine is missing is reported as skipped, with that reason.

Which modules may be absent is ``GPU_CHECK_ABSENT`` (comma-separated top-level names, set by
run.py to what it could not import: polars and nvidia.dali unless the big parts were carried).
Any other failure, and a missing module not named there, stays a failure.
"""

from __future__ import annotations

import os

import pytest


def _absent() -> set[str]:
    return {m.strip() for m in os.environ.get("GPU_CHECK_ABSENT", "").split(",") if m.strip()}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if not rep.failed or call.excinfo is None or not isinstance(call.excinfo.value, ModuleNotFoundError):
        return
    name = call.excinfo.value.name or ""
    hit = next((m for m in _absent() if name == m or name.startswith(m + ".")), None)
    if hit is None:
        return
    rep.outcome = "skipped"
    rep.longrepr = (str(item.path), item.location[1] or 0,
                    f"Skipped: needs {name}, which was not carried to this machine (bench/gpu/prepare.sh --big)")
