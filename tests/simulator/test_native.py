"""The mypyc build of the fast model: whether it is in use, and its command's errors.

With a build present (python -m meshserve.simulator.native build) every fast-model test runs on the compiled
modules; without one, on the interpreted ones: both must pass test_fast_replica.py's bar.
"""

from __future__ import annotations

import subprocess
import sys

from meshserve.simulator import native
from meshserve.simulator.config import SimConfig
from meshserve.simulator.fleet import simulate
from meshserve.simulator.trace import poisson_trace


def test_report_says_whether_the_compiled_model_ran():
    built = {p.name.split(".")[0] for p in native._built()}
    assert native.is_compiled() == ({"fast_replica", "fast_fleet"} <= built)
    trace = poisson_trace(10.0, 2.0, 1)
    assert (
        simulate(SimConfig(gpu="H200", replica_model="fast"), trace)["fast_model_compiled"]
        == native.is_compiled()
    )
    assert simulate(SimConfig(gpu="H200"), trace)["fast_model_compiled"] is False


def test_unknown_action_is_a_usage_error():
    done = subprocess.run(
        [sys.executable, "-m", "meshserve.simulator.native", "bogus"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2 and done.stderr.startswith("usage:")
