"""`python -m pipeflow`, the same as the `pipeflow` command."""

import signal
import sys
from typing import Any


def _exit(signum: int, frame: Any) -> None:
    sys.exit(130 if signum == signal.SIGINT else 143)


def main() -> None:
    """The `pipeflow` console script: signals handled first, then the command."""
    # Importing the command's modules takes ~0.3 s (more on a loaded machine): a Ctrl-C
    # meanwhile ends it with its exit code, not a KeyboardInterrupt traceback
    signal.signal(signal.SIGINT, _exit)
    signal.signal(signal.SIGTERM, _exit)
    from ._cli.commands import main as run_command

    run_command()


# Process workers started by spawn or forkserver import this module as `__mp_main__`;
# only the real main module runs the command.
if __name__ == "__main__":
    main()
