"""Q1 of the notebook, CPU-bound side: pure-Python arithmetic that holds the GIL.

Threads of one process take turns on the GIL, so a thread pool runs this no faster than
one thread; a process pool runs one item per core.
"""


def count_primes(limit: int) -> dict[str, int]:
    """The number of primes below `limit`, by trial division (slow on purpose)."""
    count = 0
    for n in range(2, limit):
        divisor = 2
        while divisor * divisor <= n:
            if n % divisor == 0:
                break
            divisor += 1
        else:
            count += 1
    return {"limit": limit, "primes": count}
