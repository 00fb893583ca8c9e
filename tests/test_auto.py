"""`workers: auto`: the controller on synthetic measurements, and stages tuned for real."""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

import fns
import pipeflow
from pipeflow import _auto, _kind
from pipeflow._auto import (
    PROBE_EVERY,
    WINDOW_S,
    AdjustableLimiter,
    ConcurrencyController,
    Decision,
    LatencyHistogram,
    StageTuner,
    Window,
    auto_bounds,
    free_cores,
)
from pipeflow._kind import choose_kind
from pipeflow._pools import pool_for
from pipeflow._report import StageReport

TESTS = Path(__file__).parent


def drive(
    controller: ConcurrencyController,
    throughput_of: Callable[[int], float],
    windows: int,
    latency_of: Callable[[int], float] = lambda limit: 0.005,
) -> list[Decision]:
    """Feed `windows` one-second windows measured from a model of the work."""
    decisions = []
    for t in range(windows):
        limit = controller.limit
        assert controller.low <= limit <= controller.high
        window = Window(1.0, round(throughput_of(limit)), latency_of(limit))
        decision = controller.observe(window, float(t))
        if decision is not None:
            assert controller.low <= decision.workers <= controller.high
            assert decision.workers == controller.limit
            decisions.append(decision)
    return decisions


def settle(controller: ConcurrencyController, throughput_of: Callable[[int], float]) -> int:
    """The limit it holds once a probe under way is over."""
    for _ in range(3):
        if controller.phase == "hold":
            break
        drive(controller, throughput_of, windows=1)
    assert controller.phase == "hold"
    return controller.limit


def saturating(at: int, per_worker: float = 100.0) -> Callable[[int], float]:
    """Throughput that grows with each worker up to `at` workers, then stays flat."""
    return lambda limit: per_worker * min(limit, at)


# --- the controller, on synthetic measurements ---


def test_it_climbs_while_throughput_grows_and_stops_where_it_stops_growing() -> None:
    # each doubling brings 41 % more, up to 16 workers
    controller = ConcurrencyController(1, 64, start=1)
    decisions = drive(controller, lambda limit: 100 * min(limit, 16) ** 0.5, windows=6)
    assert [d.workers for d in decisions] == [2, 4, 8, 16, 32, 16]
    assert controller.limit == 16
    assert "back to 16" in decisions[-1].reason


def test_it_leaps_while_throughput_doubles_then_walks_down_to_the_knee() -> None:
    controller = ConcurrencyController(1, 64, start=1)
    decisions = drive(controller, saturating(16), windows=5)
    # 2 workers did twice the work of 1: then 8, 32; 64 brought nothing: back to 32
    assert [d.workers for d in decisions] == [2, 8, 32, 64, 32]
    drive(controller, saturating(16), windows=PROBE_EVERY * 12)
    # probes down keep what costs nothing: it ends near 16, not at 32
    assert 16 <= settle(controller, saturating(16)) <= 20


def test_it_holds_at_the_upper_bound_when_throughput_still_grows() -> None:
    controller = ConcurrencyController(1, 8, start=1)
    decisions = drive(controller, saturating(1000), windows=20)
    assert controller.limit == 8
    assert [d.workers for d in decisions[:3]] == [2, 8, 8]
    assert "upper bound 8" in decisions[2].reason
    assert max(d.workers for d in decisions) == 8


def test_work_that_does_not_scale_ends_at_the_fewest_workers() -> None:
    # CPU work that holds the GIL: more threads bring nothing
    controller = ConcurrencyController(1, 64, start=4)
    drive(controller, saturating(1), windows=80)
    assert settle(controller, saturating(1)) == 1


def test_a_raise_that_costs_throughput_is_undone() -> None:
    # contention: past 4 workers each one more makes the whole slower
    controller = ConcurrencyController(1, 64, start=1)
    decisions = drive(
        controller,
        lambda limit: 100.0 * limit if limit <= 4 else 400.0 - 20 * (limit - 4),
        windows=80,
    )
    # 8 still beat 2, 16 lost to 8: back to 8, and probes down find 4
    assert [d.workers for d in decisions[:4]] == [2, 8, 16, 8]
    assert settle(controller, lambda limit: 100.0 * min(limit, 4)) == 4


def test_it_measures_again_when_the_work_changes_mid_run() -> None:
    # a service that answers in 5 ms and takes 8 calls at once, then slows to 20 ms
    # per call and takes 32: the same 8 workers now get a quarter of the throughput
    controller = ConcurrencyController(1, 64, start=4)
    fast, slow = (lambda limit: min(limit, 8) / 0.005), (lambda limit: min(limit, 32) / 0.020)
    drive(controller, fast, windows=30)
    assert settle(controller, fast) == 8
    decisions = drive(controller, slow, windows=30, latency_of=lambda limit: 0.020)
    assert "the work changed" in decisions[0].reason
    assert 32 <= settle(controller, slow) <= 40  # the knee, within a probe step


def test_fewer_items_in_a_window_at_the_same_time_per_item_is_not_a_change_of_the_work() -> None:
    # windows that got fewer (or more) items done while each took as long as before: the
    # input paused, the machine was busy; the work is the same, and so is the limit
    controller = ConcurrencyController(1, 64, start=8)
    drive(controller, saturating(8), windows=3)
    assert controller.phase == "hold"
    decisions = drive(controller, lambda limit: 0.4 * saturating(8)(limit), windows=4)
    decisions += drive(controller, lambda limit: 1.6 * saturating(8)(limit), windows=4)
    assert not [d for d in decisions if "the work changed" in d.reason]


def test_windows_where_the_stage_waited_on_its_queues_change_nothing() -> None:
    controller = ConcurrencyController(1, 64, start=4)
    starved = Window(1.0, 100, 0.005, starved_s=0.8)
    assert all(controller.observe(starved) is None for _ in range(50))
    assert controller.limit == 4
    assert controller.observe(Window(1.0, 0)) is None


@pytest.mark.parametrize("seed", range(20))
def test_bounds_are_respected_whatever_is_measured(seed: int) -> None:
    rand = random.Random(seed)
    low = rand.randint(1, 8)
    high = low + rand.randint(0, 40)
    controller = ConcurrencyController(low, high, start=rand.randint(1, 100))
    assert low <= controller.limit <= high
    drive(
        controller,
        lambda limit: rand.choice([0.0, 1.0, rand.uniform(0, 1e5)]),
        windows=300,
        latency_of=lambda limit: rand.uniform(0, 1),
    )


def test_equal_bounds_never_move() -> None:
    controller = ConcurrencyController(3, 3)
    assert all(d.workers == 3 for d in drive(controller, saturating(100), windows=30))
    assert controller.limit == 3


def test_probes_come_back_when_they_bring_nothing() -> None:
    controller = ConcurrencyController(1, 64, start=8)
    drive(controller, saturating(8), windows=3)
    assert controller.limit == 8
    decisions = drive(controller, saturating(8), windows=PROBE_EVERY * 6)
    probes = [d for d in decisions if "probing" in d.reason]
    assert probes, "it never probed"
    assert settle(controller, saturating(8)) == 8


def test_default_bounds() -> None:
    assert auto_bounds("thread", None, None) == (1, 64)
    assert auto_bounds("async", 2, None) == (2, 256)
    assert auto_bounds("thread", 3, 5) == (3, 5)
    # never more processes than the cores this process may run on
    assert auto_bounds("process", None, 1000) == (1, free_cores())
    assert auto_bounds("process", 1000, None) == (free_cores(), free_cores())


# --- the parts the engine uses ---


@pytest.mark.anyio
async def test_the_limiter_follows_its_limit_down_and_up() -> None:
    limiter = AdjustableLimiter(3)
    for _ in range(3):
        await limiter.acquire()
    limiter.set_limit(1)
    waiter = asyncio.ensure_future(limiter.acquire())
    await asyncio.sleep(0)
    limiter.release()
    limiter.release()
    await asyncio.sleep(0)
    assert not waiter.done(), "it let a call in above the lowered limit"
    limiter.release()  # none held: one may go
    await asyncio.sleep(0)
    assert waiter.done() and limiter.held == 1
    third = asyncio.ensure_future(limiter.acquire())
    await asyncio.sleep(0)
    assert not third.done()
    limiter.set_limit(2)  # a raise lets a waiter in at once
    await asyncio.sleep(0)
    assert third.done() and limiter.held == 2


@pytest.mark.anyio
async def test_a_cancelled_waiter_of_the_limiter_gives_nothing_away() -> None:
    limiter = AdjustableLimiter(1)
    await limiter.acquire()
    waiter = asyncio.ensure_future(limiter.acquire())
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    limiter.release()
    assert limiter.held == 0
    await limiter.acquire()
    assert limiter.held == 1


def test_latency_percentiles_weigh_each_item() -> None:
    histogram = LatencyHistogram()
    histogram.add(0.001, items=98)
    histogram.add(0.1, items=2)
    report = StageReport("s", "thread", 1)
    histogram.fill(report)
    assert report.latency_p50_s == pytest.approx(0.001, rel=0.05)
    assert report.latency_p90_s == pytest.approx(0.001, rel=0.05)
    assert report.latency_p99_s == pytest.approx(0.1, rel=0.05)


def test_the_tuner_records_each_change_and_applies_it() -> None:
    now = [0.0]
    applied: list[int] = []
    report = StageReport("s", "thread", 64)
    tuner = StageTuner(1, 64, 4, report, applied.append, clock=lambda: now[0])
    assert report.workers == 4 and report.workers_auto == {"min": 1, "max": 64}
    for _ in range(round(7 * WINDOW_S / 0.01)):  # a few windows, no probe yet
        now[0] += 0.01
        # every worker completes a 10 ms call each 10 ms: throughput grows with workers
        tuner.completed(report.workers, 0.01 * report.workers, calls=report.workers)
    # twice the throughput for twice the workers: then a leap
    assert applied == [8, 32, 64]
    assert [w for _, w in report.concurrency] == [4, 8, 32, 64]
    assert report.decisions[0]["reason"] == "start"
    assert "upper bound 64" in report.decisions[-1]["reason"]
    times = [t for t, _ in report.concurrency]
    assert times == sorted(times)


def test_a_call_that_started_before_a_change_is_not_counted_at_the_new_limit() -> None:
    now = [0.0]
    windows: list[tuple[int, Window]] = []
    report = StageReport("s", "thread", 64)
    tuner = StageTuner(1, 64, 4, report, lambda workers: None, clock=lambda: now[0])
    observe = tuner.controller.observe

    def seen(window: Window, t: float = 0.0) -> Decision | None:
        windows.append((tuner.controller.limit, window))
        return observe(window, t)

    tuner.controller.observe = seen  # type: ignore[method-assign]
    tuner.completed(1, 0.01)  # the first completion starts the clock
    while report.workers == 4:
        now[0] += 0.01
        tuner.completed(4, 0.04, calls=4)  # 4 calls of 10 ms each 10 ms
    assert report.workers == 8
    # 30 ms calls begun at 4 workers end after the change: they say nothing of 8
    for _ in range(3):
        now[0] += 0.001
        tuner.completed(1, 0.03)
    while report.workers == 8:
        now[0] += 0.01
        tuner.completed(8, 0.08, calls=8)
    limit, window = windows[-1]
    assert limit == 8
    # every call counted at 8 ran at 8: 800 items/s, not diluted by the calls begun at 4
    assert window.throughput == pytest.approx(800)


def test_a_climb_is_measured_in_calls_per_worker_not_in_long_windows() -> None:
    # calls of 5 ms: each window of the climb holds 2 calls per worker
    now = [0.0]
    report = StageReport("s", "thread", 64)
    tuner = StageTuner(1, 64, 4, report, lambda workers: None, clock=lambda: now[0])
    tuner.completed(1, 0.005)
    while now[0] < 1.0 and "upper bound" not in report.decisions[-1]["reason"]:
        now[0] += 0.005
        workers = report.workers
        tuner.completed(workers, 0.005 * workers, calls=workers)
    assert [w for _, w in report.concurrency] == [4, 8, 32, 64]
    # 4 windows: at 4, 8, 32 and 64 workers, each of 2 calls per worker and a settling
    assert now[0] <= 4 * (_auto.CLIMB_WAVES + 1) * 0.005 + 1e-9
    assert now[0] < 2 * WINDOW_S


def test_the_tuner_goes_on_from_a_window_measured_before_it() -> None:
    applied: list[int] = []
    report = StageReport("s", "thread", 64)
    tuner = StageTuner(1, 64, 4, report, applied.append, clock=lambda: 1.0)
    tuner.seed(Window(0.05, 40, 0.005))
    assert applied == [8]
    assert report.decisions[0]["reason"] == "start"
    assert "800 items/s at 4: trying 8" in report.decisions[1]["reason"]


def test_a_hint_takes_the_next_step_of_the_climb_straight_to_it_if_it_is_higher() -> None:
    applied: list[int] = []
    report = StageReport("s", "thread", 64)
    tuner = StageTuner(1, 64, 4, report, applied.append, clock=lambda: 1.0)
    tuner.seed(Window(0.05, 40, 0.005), (34, "room for 34"))
    assert applied == [34]
    assert report.decisions[1]["reason"].endswith("trying 34 (room for 34)")
    # a hint lower than the step is not taken; one is used once
    controller = ConcurrencyController(1, 64, start=4)
    controller.hint(6, "room for 6")
    decisions = drive(controller, saturating(64), windows=2)
    assert [d.workers for d in decisions] == [8, 32]
    controller = ConcurrencyController(1, 64, start=4)
    controller.hint(500, "room for 500")
    decisions = drive(controller, saturating(4), windows=2)
    assert [d.workers for d in decisions] == [64, 4]  # clamped, then 64 did not pay


@pytest.mark.parametrize(("workers", "every"), [(2, 2 * PROBE_EVERY), (8, PROBE_EVERY)])
def test_a_probe_down_from_few_workers_costs_more_and_comes_less_often(
    workers: int, every: int
) -> None:
    # from 2 workers a probe down runs a window at half the throughput; from 8, at 3/4
    controller = ConcurrencyController(1, workers, start=workers)
    decisions = drive(controller, saturating(workers), windows=1 + 3 * PROBE_EVERY)
    assert "held at the upper bound" in decisions[0].reason
    first_probe = next(d for d in decisions if "probing down" in d.reason)
    assert first_probe.t == every


def test_probes_that_bring_nothing_come_less_and_less_often() -> None:
    controller = ConcurrencyController(1, 64, start=8)
    drive(controller, saturating(8), windows=3)
    decisions = drive(controller, saturating(8), windows=400)
    probes = [d.t for d in decisions if "probing" in d.reason]
    gaps = [b - a for a, b in itertools.pairwise(probes)]
    assert gaps == sorted(gaps), gaps
    assert gaps[-1] >= _auto.MAX_PROBE_EVERY
    assert controller.limit == 8


# --- stages tuned for real ---


def run_command(
    tmp_path: Path, stage: str, items: int, expect: str = "wait: workers auto chose"
) -> tuple[list[Any], dict[str, Any]]:
    config = tmp_path / "auto.yaml"
    config.write_text(
        f"name: auto\nsource:\n  range: {{stop: {items}}}\nstages:\n{stage}"
        f"sink:\n  jsonl: {tmp_path / 'out.jsonl'}\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "pipeflow", "run", str(config), "--report", "report.json"],
        cwd=TESTS,
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads((TESTS / "report.json").read_text())
    (TESTS / "report.json").unlink()
    lines = (tmp_path / "out.jsonl").read_text().splitlines()
    assert expect in done.stderr, done.stderr
    return [json.loads(line) for line in lines], report


@pytest.mark.parametrize(
    ("kind", "fn"),
    [("thread", "fns:waits_counting"), ("async", "fns:waits_counting_async")],
)
def test_a_stage_with_auto_workers_stays_within_its_bounds_and_loses_nothing(
    tmp_path: Path, kind: str, fn: str
) -> None:
    stage = f"  - name: wait\n    fn: {fn}\n    kind: {kind}\n    workers: {{min: 2, max: 5}}\n"
    outputs, report = run_command(tmp_path, stage, items=1500)
    assert sorted(n for n, _ in outputs) == list(range(1500))
    # counted inside the function: never more calls at once than the upper bound
    assert max(seen for _, seen in outputs) <= 5
    stage_report = report["stages"][0]
    assert stage_report["workers_auto"] == {"min": 2, "max": 5}
    assert stage_report["items_out"] == 1500
    assert all(2 <= workers <= 5 for _, workers in stage_report["concurrency"])
    assert 2 <= stage_report["workers"] <= 5
    assert stage_report["decisions"][0]["reason"] == "start"
    assert stage_report["latency_p50_s"] > 0
    assert stage_report["latency_p50_s"] <= stage_report["latency_p99_s"]


def test_a_process_stage_with_auto_workers_starts_one_process_and_no_more_than_the_cores() -> None:
    stage = pipeflow.Stage(fns.square, kind="process", workers={"min": 1, "max": 32})
    pools: dict[str, Any] = {}
    pool = pool_for(stage, {}, pools)
    assert pool is not None and pool.workers == free_cores()
    pool.start()
    try:
        # the others are spawned only when the stage raises its concurrency
        assert len(pool.pids()) == 1
    finally:
        pool.shutdown(kill=False)


def test_a_process_stage_with_auto_workers_loses_nothing(tmp_path: Path) -> None:
    stage = "  - name: wait\n    fn: fns:pid_of\n    kind: process\n    workers: auto\n"
    outputs, report = run_command(tmp_path, stage, items=400)
    assert len(outputs) == 400
    assert len(set(outputs)) <= free_cores()
    stage_report = report["stages"][0]
    assert stage_report["workers_auto"] == {"min": 1, "max": free_cores()}
    assert all(1 <= w <= free_cores() for _, w in stage_report["concurrency"])


# --- kind: auto ---

ONE = Window(1.0, 100, 0.01)


@pytest.mark.parametrize(
    ("items_two", "cpu_scaling", "kind", "why"),
    [
        (100, 1.05, "process", "holds the GIL"),
        (100, 1.8, "thread", "releases the GIL"),
        (150, 1.0, "thread", "releases the GIL"),
    ],
)
def test_choose_kind_takes_processes_only_when_items_and_cpu_time_both_say_the_gil_is_held(
    items_two: int, cpu_scaling: float, kind: str, why: str
) -> None:
    # a busy machine blurs items per second and CPU time alike: threads, the default,
    # unless neither grew with a second thread
    two = Window(1.0, items_two, 0.02)
    chosen, reason = choose_kind(ONE, two, 0.95, 2, 1e-6, None, cpu_scaling)
    assert chosen == kind and why in reason


@pytest.mark.parametrize(
    ("two", "cpu_share", "cores", "pickle_s", "unpicklable", "kind", "why"),
    [
        (Window(1.0, 200, 0.01), 0.02, 2, 1e-6, None, "thread", "it waits"),
        (Window(1.0, 190, 0.01), 0.95, 2, 1e-6, None, "thread", "releases the GIL"),
        (Window(1.0, 105, 0.02), 0.95, 2, 1e-6, None, "process", "processes, up to 2"),
        (Window(1.0, 105, 0.02), 0.95, 1, 1e-6, None, "thread", "1 free core"),
        (Window(1.0, 105, 0.02), 0.95, 2, None, "an item cannot be pickled", "thread", "item"),
        (Window(1.0, 105, 0.02), 0.95, 2, 0.009, None, "thread", "pickling an item"),
    ],
)
def test_choose_kind(
    two: Window,
    cpu_share: float,
    cores: int,
    pickle_s: float | None,
    unpicklable: str | None,
    kind: str,
    why: str,
) -> None:
    chosen, reason = choose_kind(ONE, two, cpu_share, cores, pickle_s, unpicklable)
    assert chosen == kind
    assert why in reason


def probe_with_fake_clock(
    monkeypatch: pytest.MonkeyPatch,
) -> tuple[_kind.KindProbe, list[float], list[int]]:
    """A probe on a fake clock that reads a function's CPU time from `fn.cpu_s` (the
    system's own figures are not read)."""
    monkeypatch.setattr(_kind, "sched_seconds", lambda threads: None)
    monkeypatch.setattr(_kind, "free_cores", lambda: 2)
    now = [0.0]
    limits: list[int] = []
    probe = _kind.KindProbe(
        _kind.CpuTimed(fns.square),
        StageReport("s", "thread", 4),
        limits.append,
        clock=lambda: now[0],
        first=4,
    )
    probe.fn.sample = (3, 9)
    return probe, now, limits


def test_kind_auto_tells_a_function_that_waits_from_a_few_calls_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    probe, now, limits = probe_with_fake_clock(monkeypatch)
    probe.completed(1, 0.005)  # warms up
    while probe.choice is None:
        now[0] += 0.005
        probe.completed(4, 0.02)  # 4 calls of 5 ms that use no CPU
    assert limits == [4]  # never 1 call at a time
    assert probe.choice[0] == "thread"
    assert "it waits: 4 calls at once wanted 0.00 of a CPU" in probe.choice[1]
    assert probe.first_window is not None and probe.first_window.items > 0
    # no CPU wanted: room for as many calls as the floor of 1 % of a CPU per 4 allows
    assert probe.room == (320, "320 calls at once would want 80% of one CPU")


def test_kind_auto_tells_a_function_that_computes_while_the_stage_waits_on_its_output(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # threads that hold the GIL starve the event loop, and with it the stage's output:
    # 60 % of the time no call runs; when they run, the 4 calls share the one CPU the
    # GIL gives them, so each call of 2.5 ms of work takes 10 ms
    probe, now, limits = probe_with_fake_clock(monkeypatch)
    probe.completed(1, 0.01)
    for _ in range(100):
        if limits != [4]:
            break
        now[0] += 0.005
        probe.report.blocked_s += 0.003
        probe.fn.cpu_s += 0.002
        probe.completed(1, 0.008)
    assert limits == [4, 1]
    assert probe.choice is None


def test_kind_auto_measures_a_function_that_computes_one_call_then_two_at_a_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    probe, now, limits = probe_with_fake_clock(monkeypatch)
    probe.completed(1, 0.005)
    while limits == [4]:
        now[0] += 0.005
        probe.fn.cpu_s += 0.005  # one CPU's worth: the GIL held by the 4 calls
        probe.completed(1, 0.02)
    assert limits == [4, 1]
    # a call begun with 4 at once, ending after the change, is not measured at 1
    now[0] += 0.001
    probe.completed(1, 0.02)
    assert probe._items == 0
    while probe.choice is None:
        now[0] += 0.005
        probe.fn.cpu_s += 0.005
        probe.completed(1, 0.005)
    assert limits == [4, 1, 2]
    assert probe.first_window is None
    assert "holds the GIL" in probe.choice[1] and probe.choice[0] == "process"


def test_kind_auto_does_not_measure_calls_admitted_before_the_limit_changed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 4 calls hold the limit's permits when it drops to 1: the 3 still to complete were
    # admitted at 4 at once, however late they started (a chunk that waited for company,
    # a thread that waited for the GIL), and they ran beside each other
    probe, now, limits = probe_with_fake_clock(monkeypatch)
    held = [4]
    probe.held = lambda: held[0]
    probe.completed(1, 0.005)
    while limits == [4]:
        now[0] += 0.005
        probe.fn.cpu_s += 0.005
        probe.completed(1, 0.02)
    assert limits == [4, 1]
    for _ in range(3):
        now[0] += 0.02
        probe.fn.cpu_s += 0.005
        # started after the change, by the worker's clock, and slowed by its neighbours
        probe.completed(1, 0.02, started=now[0] - 0.015)
        assert probe._items == 0
    now[0] += 0.005
    probe.completed(1, 0.005, started=now[0] - 0.005)
    assert probe._items == 1


@pytest.mark.anyio
async def test_a_switch_to_processes_loses_and_repeats_no_item(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # whatever this machine measures, the probe chooses processes: the switch is tested
    monkeypatch.setattr(_kind, "choose_kind", lambda *args: ("process", "chosen by the test"))
    pipeline = pipeflow.Pipeline(
        [pipeflow.Stage(fns.holds_the_gil, kind="auto", workers=2)], sink=pipeflow.ListSink()
    )
    with anyio.fail_after(50):
        report = await pipeline.run(range(600))
    items = pipeline.sink.items  # type: ignore[attr-defined]
    assert len(items) == 600 and sorted(items) == list(range(600))
    stage = report.stages[0]
    assert stage.kind_choice == {"kind": "process", "reason": "chosen by the test"}
    assert stage.kind == "process" and stage.items_out == 600
    threads = sum(n for worker, n in stage.by_worker.items() if not worker.startswith("pid"))
    processes = sum(n for worker, n in stage.by_worker.items() if worker.startswith("pid"))
    assert threads > 0 and processes > 0, stage.by_worker
    assert threads + processes == 600  # an item run twice would be counted twice


@pytest.mark.anyio
async def test_one_thread_goes_on_while_the_chosen_process_pool_starts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # the probe found 2 threads no better than 1: while the process pool starts, one
    # call at a time leaves the GIL to the start
    import os
    import threading
    import time

    from pipeflow._pools import PoolHandle

    monkeypatch.setattr(_kind, "choose_kind", lambda *args: ("process", "chosen by the test"))
    written: list[tuple[int, int, int, float, float]] = []
    begun: list[int] = []
    starting: list[float] = []  # when the start began, and when it let the pool go
    enough = threading.Event()

    def write(item: tuple[int, int, int, float, float]) -> None:
        written.append(item)
        if begun and len(written) >= begun[0] + 200:
            enough.set()

    start = PoolHandle.start

    def slow_start(self: PoolHandle) -> None:
        if self.kind == "process" and not self.lazy:
            begun.append(len(written))
            starting.append(time.perf_counter())
            enough.wait(timeout=30)  # ready once the threads have written 200 more items
            starting.append(time.perf_counter())
        start(self)

    monkeypatch.setattr(PoolHandle, "start", slow_start)
    stage = pipeflow.Stage(fns.holds_the_gil_counting, kind="auto", workers=4)
    pipeline = pipeflow.Pipeline([stage], sink=pipeflow.CallableSink(write))
    with anyio.fail_after(50):
        report = await pipeline.run(range(1000))
    assert enough.is_set() and report.stages[0].kind == "process"
    assert [item[0] for item in written] == list(range(1000))
    # the calls admitted before the start end as they would; after the last of them,
    # and until the pool is ready, one call at a time
    began, ready = starting
    stale_end = max(end for *_, started, end in written if started < began)
    during = [item for item in written if stale_end <= item[3] and item[4] <= ready]
    assert len(during) >= 20
    assert {pid for _, _, pid, _, _ in during} == {os.getpid()}
    assert {seen for _, seen, _, _, _ in during} == {1}, during


@pytest.mark.anyio
@pytest.mark.parametrize("start_fails", [False, True])
async def test_threads_go_on_while_the_process_pool_starts_and_an_input_that_ends_first_stays(
    monkeypatch: pytest.MonkeyPatch, start_fails: bool
) -> None:
    import os
    import threading

    from pipeflow._pools import PoolHandle

    chosen, written_all = threading.Event(), threading.Event()

    def choose(*args: Any) -> tuple[str, str]:
        chosen.set()
        return "process", "chosen by the test"

    monkeypatch.setattr(_kind, "choose_kind", choose)
    pids: list[int] = []
    start = PoolHandle.start

    def slow_start(self: PoolHandle) -> None:
        start(self)
        if self.kind == "process" and self.executor is not None:
            pids.extend(self.pids())
            # the pool is ready only once every item was written, by the threads
            written_all.wait(timeout=30)
            if start_fails:
                raise OSError("no more processes")

    monkeypatch.setattr(PoolHandle, "start", slow_start)

    def source() -> Any:
        yield from range(300)
        chosen.wait(timeout=30)  # the probe has chosen: the rest comes after
        yield from range(300, 400)

    written: list[int] = []

    def write(item: int) -> None:
        written.append(item)
        if len(written) == 400:
            written_all.set()

    stage = pipeflow.Stage(fns.holds_the_gil, kind="auto", workers="auto")
    pipeline = pipeflow.Pipeline([stage], sink=pipeflow.CallableSink(write))
    with anyio.fail_after(50):
        report = await pipeline.run(source())
    assert sorted(written) == list(range(400))
    stage_report = report.stages[0]
    assert stage_report.kind == "thread" and stage_report.items_out == 400
    assert stage_report.kind_choice is not None
    assert stage_report.kind_choice["kind"] == "thread"
    assert "but its input ended before the move" in stage_report.kind_choice["reason"]
    # a pool the stage never used does not fail the run, but the reason says so
    failed = "(its process pool did not start: no more processes)"
    assert (failed in stage_report.kind_choice["reason"]) == start_fails
    assert report.status == "ok"
    assert all(not worker.startswith("pid") for worker in stage_report.by_worker)
    # the pool that started meanwhile was shut down with the run
    assert pids
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_kind_auto_through_the_command_records_its_choice_and_loses_nothing(
    tmp_path: Path,
) -> None:
    stage = "  - name: work\n    fn: fns:holds_the_gil\n    kind: auto\n    workers: 2\n"
    outputs, report = run_command(tmp_path, stage, items=600, expect="work: kind auto chose")
    assert len(outputs) == 600 and sorted(outputs) == list(range(600))
    stage_report = report["stages"][0]
    assert stage_report["kind_choice"]["kind"] in ("thread", "process")
    assert stage_report["kind_choice"]["kind"] == stage_report["kind"]
    assert (
        "GIL" in stage_report["kind_choice"]["reason"]
        or "waits" in stage_report["kind_choice"]["reason"]
    )
    assert sum(stage_report["by_worker"].values()) == 600


def test_kind_auto_keeps_an_unpicklable_function_on_threads(tmp_path: Path) -> None:
    stage = "  - name: work\n    fn: config_fns:unpicklable\n    kind: auto\n"
    outputs, report = run_command(tmp_path, stage, items=50, expect="work: kind auto chose thread")
    assert len(outputs) == 50
    choice = report["stages"][0]["kind_choice"]
    assert choice["kind"] == "thread" and "cannot be pickled" in choice["reason"]


def test_kind_auto_runs_an_async_def_on_the_loop(tmp_path: Path) -> None:
    stage = "  - name: work\n    fn: fns:waits_counting_async\n    kind: auto\n"
    outputs, report = run_command(tmp_path, stage, items=50, expect="work: kind auto chose async")
    assert sorted(n for n, _ in outputs) == list(range(50))
    assert report["stages"][0]["kind"] == "async"


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("kind", "fn"), [("thread", fns.waits_counting), ("async", fns.waits_counting_async)]
)
async def test_a_stage_never_runs_more_calls_at_once_than_its_current_limit(
    monkeypatch: pytest.MonkeyPatch, kind: str, fn: Callable[[int], Any]
) -> None:
    # the controller keeps its start (4) while the pool has room for 16
    monkeypatch.setattr(ConcurrencyController, "observe", lambda self, window, t=0.0: None)
    pipeline = pipeflow.Pipeline(
        [pipeflow.Stage(fn, kind=kind, workers={"min": 1, "max": 16}, batch=1)],  # type: ignore[arg-type]
        sink=pipeflow.ListSink(),
    )
    with anyio.fail_after(50):
        report = await pipeline.run(range(400))
    outputs = pipeline.sink.items  # type: ignore[attr-defined]
    assert sorted(n for n, _ in outputs) == list(range(400))
    assert max(seen for _, seen in outputs) <= _auto.START
    assert report.stages[0].workers == _auto.START


def test_the_summary_and_the_live_display_say_what_auto_chose() -> None:
    import io

    from rich.console import Console

    from pipeflow._cli.console import LiveProgress, print_summary
    from pipeflow._report import RunReport

    stage = StageReport("fetch", "process", 2, items_in=10, items_out=10)
    stage.workers_auto = {"min": 1, "max": 2}
    stage.concurrency = [(0.0, 1), (0.2, 2)]
    stage.decisions = [{"t": 0.2, "workers": 2, "reason": "trying 2"}]
    stage.kind_choice = {"kind": "process", "reason": "it holds the GIL"}
    report = RunReport("p", status="ok", stages=[stage])
    out = io.StringIO()
    console = Console(file=out, width=200)
    print_summary(console, report)
    text = out.getvalue()
    assert "fetch: kind auto chose process (it holds the GIL)" in text
    assert "fetch: workers auto chose 2 of 1-2 (path 1 -> 2; last: trying 2)" in text
    live = io.StringIO()
    Console(file=live, width=200).print(LiveProgress(console).render(report))
    assert "process x2 auto" in live.getvalue()


def test_kind_auto_says_so_when_the_input_ends_before_it_could_measure(tmp_path: Path) -> None:
    stage = "  - name: work\n    fn: fns:square\n    kind: auto\n    workers: 2\n"
    outputs, report = run_command(tmp_path, stage, items=3, expect="work: kind auto chose thread")
    assert sorted(outputs) == [0, 1, 4]
    assert "before it was measured" in report["stages"][0]["kind_choice"]["reason"]


@pytest.mark.parametrize(
    ("workers", "message"),
    [
        ("fast", "expected an int, auto or {min: 1, max: 64}, got 'fast'"),
        ("{min: 0, max: 4}", "workers min must be a positive int, got 0"),
        ("{min: 5, max: 2}", "workers min (5) must not be above max (2)"),
        ("{min: 1, most: 3}", "unknown key 'most' in workers; write {min: 1, max: 64}"),
        ("{max: 5000}", "workers must be at most 1024 for kind thread"),
    ],
)
def test_a_bad_workers_value_is_one_line_at_its_position(
    tmp_path: Path, workers: str, message: str
) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(
        "source:\n  range: {stop: 3}\nstages:\n  - name: sq\n    fn: config_fns:square\n"
        f"    kind: thread\n    workers: {workers}\nsink:\n  null: {{}}\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "pipeflow", "validate", str(config)],
        cwd=TESTS,
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert done.returncode == 2
    [line] = done.stderr.splitlines()
    assert line.startswith(f"{config}:7:14: stages.sq.workers: ")
    assert message in line


def test_workers_auto_on_a_dask_stage_is_refused() -> None:
    pytest.importorskip("distributed")
    with pytest.raises(pipeflow.ConfigError, match="workers: auto applies to kinds"):
        pipeflow.Stage(fns.square, kind="dask", workers="auto")


@pytest.mark.parametrize(
    ("options", "reason"),
    [
        ({"workers": 4, "rate": "1000/s"}, "with a rate or a group"),
        ({"workers": 4, "op": "map_batch", "group": 5}, "with a rate or a group"),
        ({"workers": 1}, "with one worker"),
    ],
)
def test_kind_auto_stays_on_threads_where_it_cannot_measure_or_move_safely(
    options: dict[str, Any], reason: str
) -> None:
    # a move to processes would drop a rate's call cap or a group's reader; one thread
    # cannot show whether two threads do more than one
    fn = fns.double_all if options.get("op") == "map_batch" else fns.square
    stage = pipeflow.Stage(fn, kind="auto", **options)  # type: ignore[arg-type]
    sink = pipeflow.ListSink()
    report = pipeflow.Pipeline([stage], sink=sink).run_sync(range(40))
    choice = report.stages[0].kind_choice
    assert choice is not None and choice["kind"] == "thread" and reason in choice["reason"]
    assert report.stages[0].kind == "thread"
    assert len(sink.items) == 40
