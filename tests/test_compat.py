"""The CPython internals pipeflow reads are wrapped with a fallback for when they are gone."""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os

from pipeflow import _compat


class _Bare(concurrent.futures.Executor):
    """An executor with none of the standard pools' internals."""


def test_without_the_internals_the_fallbacks_keep_a_pool_usable() -> None:
    bare = _Bare()
    assert _compat.max_workers(bare) == (os.cpu_count() or 1)
    assert _compat.pool_processes(bare) == {}
    assert _compat.add_thread(bare) is False


def test_with_the_internals_a_thread_pool_grows_by_one() -> None:
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        assert _compat.max_workers(pool) == 2
        assert _compat.add_thread(pool) is True
        assert _compat.max_workers(pool) == 3


def test_a_process_pool_shows_its_live_workers_and_none_once_shut_down() -> None:
    context = _compat.process_context("forkserver", import_main=False)
    assert context.get_start_method() == "forkserver"
    pool = concurrent.futures.ProcessPoolExecutor(2, mp_context=context)
    try:
        assert pool.submit(os.getpid).result(timeout=30) in _compat.pool_processes(pool)
    finally:
        pool.shutdown(wait=True)
    assert _compat.pool_processes(pool) == {}


def test_importing_the_main_module_keeps_the_stock_context() -> None:
    context = _compat.process_context("forkserver", import_main=True)
    assert context is multiprocessing.get_context("forkserver")
