"""Property tests of the engine's invariants over random pipelines and random failures."""

from __future__ import annotations

import anyio
import anyio.lowlevel
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeflow import ListSink, Pipeline, PipelineError, Stage


class FailOn:
    """A map that raises on the items in `bad` (picklable, for process stages too)."""

    def __init__(self, bad: frozenset[int], factor: int) -> None:
        self.bad = bad
        self.factor = factor

    def __call__(self, n: int) -> int:
        if n in self.bad:
            raise ValueError(f"bad item {n}")
        return n * self.factor


class AsyncFailOn(FailOn):
    async def __call__(self, n: int) -> int:  # type: ignore[override]
        await anyio.lowlevel.checkpoint()
        return super().__call__(n)


stage_specs = st.fixed_dictionaries(
    {
        "kind": st.sampled_from(["async", "thread", "thread", "process"]),
        "workers": st.integers(1, 4),
        "batch": st.one_of(st.just("auto"), st.integers(1, 50)),
        "ordered": st.booleans(),
        "queue_size": st.integers(1, 4),
        "on_error": st.sampled_from(["skip", "dead_letter", "dead_letter", "fail"]),
        "bad": st.frozensets(st.integers(0, 300), max_size=8),
    }
)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(specs=st.lists(stage_specs, min_size=1, max_size=3), count=st.integers(0, 300))
@pytest.mark.timeout(300)
def test_random_pipelines_account_for_every_item_and_keep_order(
    specs: list[dict], count: int
) -> None:  # type: ignore[type-arg]
    stages = []
    for position, spec in enumerate(specs):
        fn_type = AsyncFailOn if spec["kind"] == "async" else FailOn
        stages.append(
            Stage(
                fn_type(spec["bad"], 1),
                name=f"s{position}",
                kind=spec["kind"],
                workers=spec["workers"],
                batch=spec["batch"],
                ordered=spec["ordered"],
                queue_size=spec["queue_size"],
                on_error=spec["on_error"],
            )
        )
    sink, dead = ListSink(), ListSink()
    pipeline = Pipeline(stages, sink=sink, dead_letter=dead)

    async def run_it():  # type: ignore[no-untyped-def]
        with anyio.fail_after(60):  # a hang fails the example instead of stalling the suite
            return await pipeline.run(range(count))

    reaching = set(range(count))  # the items that reach each stage in turn
    fails = False
    for spec in specs:
        if spec["on_error"] == "fail" and reaching & spec["bad"]:
            fails = True
            break
        reaching -= spec["bad"]
    if fails:
        # the run fails on some bad item; every item is still accounted for in its report
        with pytest.raises(PipelineError) as caught:
            anyio.run(run_it)
        error = caught.value
        bad_of_stage = {f"s{p}": spec["bad"] for p, spec in enumerate(specs)}
        assert error.index in bad_of_stage[error.stage]
        for stage in error.report.stages:  # type: ignore[attr-defined]
            settled = stage.items_out + stage.skipped + stage.dead_lettered + stage.failed
            assert stage.items_in == settled + stage.in_flight
        return

    report = anyio.run(run_it)

    expected = list(range(count))
    for spec in specs:
        expected = [n for n in expected if n not in spec["bad"]]
    all_ordered = all(spec["ordered"] for spec in specs)
    assert (sink.items if all_ordered else sorted(sink.items)) == expected
    for stage in report.stages:
        assert stage.items_in == stage.items_out + stage.skipped + stage.dead_lettered
        assert stage.in_flight == 0 and stage.failed == 0
    assert len(dead.items) == sum(s.dead_lettered for s in report.stages)
    assert report.items_read == count and report.items_written == len(expected)
