"""Runs ITEMS items of 1 MiB through a 2-worker process stage (default batch) and prints
the parent's peak RSS in MiB and the report's counts, as JSON: test_accounting runs it in
a subprocess, so that its peak is this run's alone."""

from __future__ import annotations

import json
import resource
import sys

import accounting_fns as fns
import pipeflow


def peak_rss_mib() -> float:
    """This process's peak RSS: VmHWM, which (unlike ru_maxrss) starts afresh at exec."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(items: int) -> None:
    pipeline = pipeflow.Pipeline(
        [pipeflow.Stage(fns.first_byte, kind="process", workers=2)],
        source=fns.mib_items(items),
    )
    report = pipeline.run_sync()
    peak_mib = peak_rss_mib()
    print(
        json.dumps(
            {"peak_mib": peak_mib, "read": report.items_read, "written": report.items_written}
        )
    )


if __name__ == "__main__":
    main(int(sys.argv[1]))
