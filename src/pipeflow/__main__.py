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
    if sys.argv[1:2] == ["run"]:
        # the forkserver's start-up overlaps the command's imports and config (see
        # _forkserver); a run without process stages leaves it unused
        from ._forkserver import start_forkserver

        start_forkserver()
    from ._cli.commands import main as run_command

    run_command()


# Process workers started by spawn or forkserver import this module as `__mp_main__`;
# only the real main module runs the command.
if __name__ == "__main__":
    main()
