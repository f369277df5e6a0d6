"""The fast replica model compiled to C with mypyc: the same Python source, about 2.5x less CPU per request.

The fast model's event loop, replica, decode segments and router index (MODULES) are plain integer and float
arithmetic with type hints, which mypyc compiles as they are. `python -m meshserve.simulator.native build` (needs
the `sim-native` extra: mypy, whose mypyc it is, and a C compiler) puts extension modules beside those sources,
and Python imports them ahead of the .py files; `clean` removes them, leaving the interpreted modules (the plain
path, and what the tests run). The report says which ran (`fast_model_compiled`). Compiled code checks the
annotations at run time, so the modules keep them exact.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MODULES = ("decode_segment", "fast_steps", "fast_replica", "least_outstanding", "fast_fleet")
_HERE = Path(__file__).resolve().parent


def is_compiled() -> bool:
    """Whether the fast model's modules were imported from compiled extensions."""
    from meshserve.simulator import fast_fleet, fast_replica

    return not fast_replica.__file__.endswith(".py") and not fast_fleet.__file__.endswith(".py")


def _built() -> list[Path]:
    """Extension modules a build left: beside the sources, and mypyc's shared runtime in the repository root."""
    found = [p for m in MODULES for p in _HERE.glob(f"{m}.*.so")]
    return found + list(ROOT.glob("*__mypyc.*.so"))


def build() -> int:
    try:
        import mypyc  # noqa: F401
    except ImportError:
        print("error: mypyc is not installed: pip install 'meshserve[sim-native]'", file=sys.stderr)
        return 2
    sources = [str(_HERE / f"{m}.py") for m in MODULES]
    done = subprocess.run(
        [sys.executable, "-m", "mypyc", "--ignore-missing-imports", *sources], cwd=ROOT, check=False
    )
    return done.returncode


def clean() -> int:
    for path in _built():
        path.unlink()
    return 0


if __name__ == "__main__":  # python -m meshserve.simulator.native build|clean
    action = sys.argv[1] if len(sys.argv) > 1 else ""
    if action not in ("build", "clean"):
        print("usage: python -m meshserve.simulator.native build|clean", file=sys.stderr)
        sys.exit(2)
    sys.exit(build() if action == "build" else clean())
