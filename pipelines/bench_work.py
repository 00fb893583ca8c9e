"""Work for the bench examples: one stage that burns CPU, one that waits like I/O."""

import time


def collatz_steps(n: int) -> int:
    """Total Collatz steps of every number from 1 to `n`: pure Python, CPU-bound."""
    total = 0
    for start in range(1, n + 1):
        value = start
        while value != 1:
            value = value // 2 if value % 2 == 0 else 3 * value + 1
            total += 1
    return total


def fetch(n: int) -> dict[str, int]:
    """Pretend to fetch record `n` over the network: 50 ms of waiting, no CPU."""
    time.sleep(0.05)
    return {"id": n, "size": n * 7 % 1000}
