"""A stage module whose import is slow: it writes $PIPEFLOW_TEST_MARKER, then takes 30 s."""

from __future__ import annotations

import os
import time

with open(os.environ["PIPEFLOW_TEST_MARKER"], "w") as marker:
    marker.write(str(os.getpid()))
time.sleep(30)  # a signal ends the command meanwhile


def square(n: int) -> int:
    return n * n
