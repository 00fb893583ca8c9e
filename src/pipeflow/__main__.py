"""`python -m pipeflow`, the same as the `pipeflow` command."""

from ._cli import main

# Process workers started by spawn or forkserver import this module as `__mp_main__`;
# only the real main module runs the command.
if __name__ == "__main__":
    main()
