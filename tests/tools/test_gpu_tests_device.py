"""tools/gpu_tests_device.sh: with PARALLEL=N a test that failed only beside others (the device's out-of-memory
clashes) passes on its rerun alone, a real failure stays one, and the script exits with pytest's code."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).parents[2]

# fails in an xdist worker, passes in a plain pytest process; a parameter id with " - " in it (the summary line's
# separator) must still be rerun by its own id
TESTS = '''
import os
import pytest

@pytest.mark.gpu
@pytest.mark.parametrize("v", ["a b - c", "ok"])
def test_clashes_only_in_parallel(v):
    assert os.environ.get("PYTEST_XDIST_WORKER") is None or v == "ok"

@pytest.mark.gpu
def test_fails_alone_too(request):
    assert request.config.getoption("--real-failure") == "no"
'''
CONFTEST = '''
def pytest_addoption(parser):
    parser.addoption("--real-failure", default="yes")
'''


def _run(tmp_path: Path, extra_env: dict[str, str], *args: str) -> tuple[int, str]:
    repo = tmp_path / "repo"
    (repo / "tools").mkdir(parents=True)
    shutil.copy(REPO / "tools" / "gpu_tests_device.sh", repo / "tools")
    # the device's environment script, less its wheels: the test's interpreter stands for the device's python3
    (repo / "tools" / "device_env.sh").write_text('cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1\n'
                                                 'OUT=${OUT:-/tmp/out}\n')
    (repo / "tests").mkdir()
    (repo / "tests" / "test_zz.py").write_text(TESTS)
    (repo / "tests" / "conftest.py").write_text(CONFTEST)
    (repo / "pytest.ini").write_text("[pytest]\nmarkers =\n    gpu: on the device\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "python3"  # (a symlink would lose this interpreter's virtual environment)
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    wrapper.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", OUT=str(tmp_path / "out"), **extra_env)
    env.pop("PYTEST_XDIST_WORKER", None)  # (this test may itself run in a worker)
    p = subprocess.run(["bash", str(repo / "tools" / "gpu_tests_device.sh"), *args], cwd=repo, env=env,
                       capture_output=True, text=True, timeout=300)
    return p.returncode, p.stdout


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash, timeout")
def test_parallel_failures_are_rerun_alone_and_only_real_ones_stay(tmp_path):
    rc, out = _run(tmp_path, {"PARALLEL": "2", "LIMIT": "200"}, "tests/test_zz.py")
    assert "== parallel: 2 failed, 1 passed" in out
    assert rc == 1 and "1 failed, 1 passed" in out.splitlines()[-1], out
    assert "FAILED tests/test_zz.py::test_fails_alone_too" in out and "a b - c" not in out.split("== parallel")[1]
    rc, out = _run(tmp_path / "again", {"PARALLEL": "2", "LIMIT": "200"}, "tests/test_zz.py", "--real-failure", "no")
    assert rc == 0 and "(rerun alone)" in out and "1 passed" in out.splitlines()[-1], out


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash, timeout")
def test_without_parallel_one_run_and_its_code(tmp_path):
    rc, out = _run(tmp_path, {"LIMIT": "120"}, "tests/test_zz.py", "--real-failure", "no")
    assert rc == 0 and "3 passed" in out.splitlines()[-1], out
