"""The squares example: CPU work that a process pool spreads over the cores."""


def square(n: int) -> int:
    """Return `n` squared."""
    return n * n
