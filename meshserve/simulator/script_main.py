"""The entry of the simulator's refit and replay scripts (`python -m meshserve.simulator.eager_steps`, step_noise,
validation_cycles, validation_faults, validation_hang_overload): bad input, a missing or malformed file or an
unknown calibration, GPU or model, is one line on stderr and exit code 2, not a traceback. Errors of any other
kind are the scripts' own bugs and keep their tracebacks."""

from __future__ import annotations

import json
import sys
import tarfile
from collections.abc import Callable

from meshserve.errors import InvalidArgumentError


def run_script(main: Callable[[], object], prog: str) -> None:
    try:
        main()
    except InvalidArgumentError as e:
        fail(prog, str(e))
    except (OSError, json.JSONDecodeError, tarfile.TarError, EOFError) as e:  # EOFError: a truncated .gz
        fail(prog, f"{e.__class__.__name__}: {e}")


def fail(prog: str, message: str) -> None:
    """One line on stderr, exit code 2 (argparse's for a usage error)."""
    print(f"python -m {prog}: error: {message}", file=sys.stderr)
    sys.exit(2)
