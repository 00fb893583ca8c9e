"""Shared fixtures: every test checks that no worker process outlives it."""

from __future__ import annotations

from collections.abc import Iterator

import psutil
import pytest

# multiprocessing's own helpers live as long as the interpreter, by design; they are not
# workers of a pipeline.
_HELPERS = ("forkserver", "resource_tracker")


def _is_helper(process: psutil.Process, cmdline: str) -> bool:
    # A forkserver's workers inherit its command line: a helper is only the process the
    # test process (or one of its non-helper children) started itself.
    if not any(helper in cmdline for helper in _HELPERS):
        return False
    try:
        parent = process.parent()
        parent_cmdline = " ".join(parent.cmdline()) if parent is not None else ""
    except psutil.NoSuchProcess:
        return True
    return not any(helper in parent_cmdline for helper in _HELPERS)


def worker_processes() -> list[psutil.Process]:
    """This process's children other than multiprocessing's long-lived helpers."""
    children = []
    for child in psutil.Process().children(recursive=True):
        try:
            cmdline = " ".join(child.cmdline())
            if child.status() == psutil.STATUS_ZOMBIE or _is_helper(child, cmdline):
                continue
        except psutil.NoSuchProcess:
            continue
        children.append(child)
    return children


@pytest.fixture(autouse=True)
def no_leftover_processes(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test that leaves a child process behind (subprocess-based tests included)."""
    before = {p.pid for p in worker_processes()}
    yield
    left = [p for p in worker_processes() if p.pid not in before]
    if left:
        _, alive = psutil.wait_procs(left, timeout=3)
        assert not alive, f"child processes left behind: {[p.cmdline() for p in alive]}"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
