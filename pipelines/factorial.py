"""Q7 of the notebook: factorials of 1..10 on a thread pool."""

import math


def calculate_factorial(n: int) -> tuple[int, int]:
    """`(n, n!)`, as the notebook's function returns it."""
    return n, math.factorial(n)


def describe(result: tuple[int, int]) -> str:
    """The notebook's line: `Factorial of N is M`."""
    n, factorial = result
    return f"Factorial of {n} is {factorial}"
