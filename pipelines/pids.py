"""Q3 of the notebook: processes that each report their pid.

The notebook starts three `Process` objects that each print 0..4. Here each item is one
such job, and a process pool runs it: the output (and the report's `by_worker`) shows
which worker process handled which job.
"""

import os


def print_numbers(job: int) -> list[str]:
    """The lines one job prints: `Process PID - Number: i` for i in 0..4."""
    pid = os.getpid()
    return [f"Process {pid} - Number: {i}" for i in range(5)]
