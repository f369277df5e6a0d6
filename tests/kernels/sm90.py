"""Compile Triton kernels to sm_90 code on a machine without a GPU (Triton's bundled ptxas), outside the test
process so its interpreter mode does not apply. It catches codegen errors the interpreter lets through
(loop-carried types, scalar conditions, constants specialised to 1).

Every test's script runs in ONE worker subprocess per pytest session (TRITON_INTERPRET=0), each in a fresh
namespace: starting Python and importing torch + triton once instead of once per test file, and kernels that
two scripts share come from the worker's Triton cache. A script that kills or hangs the worker fails its own
test; the next script gets a new worker."""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import selectors
import signal
import subprocess
import sys

import pytest

# reads {"script": ...} lines on stdin, answers {"ok", "out", "err"} lines on the fd given in argv[1]; fd 1
# is pointed at fd 2 so that C-level output (ptxas, LLVM) cannot corrupt the answers
_WORKER = r"""
import contextlib, io, json, os, sys, traceback
answers = os.fdopen(os.dup(1), "w")
os.dup2(2, 1)
for line in sys.stdin:
    script = json.loads(line)["script"]
    out, ok, err = io.StringIO(), True, ""
    with contextlib.redirect_stdout(out):
        try:
            exec(compile(script, "<sm90 script>", "exec"), {"__name__": "__main__"})
        except SystemExit as e:
            ok, err = e.code in (None, 0), f"SystemExit({e.code!r})"
        except BaseException:
            ok, err = False, traceback.format_exc()
    answers.write(json.dumps({"ok": ok, "out": out.getvalue(), "err": "" if ok else err}) + "\n")
    answers.flush()
"""

_worker: subprocess.Popen | None = None


def _start_worker() -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", _WORKER],
        env={**os.environ, "TRITON_INTERPRET": "0"},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,  # its own process group: _stop_worker ends the compile processes it spawned too
    )


def _stop_worker(graceful: bool = True) -> None:
    """End the worker: at the session's end by closing its input (it exits, its atexit hooks stop the compile
    processes a script started: a SIGKILL left them orphaned, ~400 MB each, after every run); a hung or dead
    one, and whatever is left of its group, by SIGKILL."""
    global _worker
    if _worker is None:
        return
    if graceful and _worker.poll() is None:
        with contextlib.suppress(OSError):
            _worker.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            _worker.wait(30)
            _worker = None
            return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(_worker.pid, signal.SIGKILL)
    _worker.wait()
    _worker = None


atexit.register(_stop_worker)


def _run_in_worker(script: str, timeout_s: float) -> dict:
    """The worker's answer for `script`; on a timeout or a dead worker, a failed answer (and a fresh worker next
    time)."""
    global _worker
    if _worker is None or _worker.poll() is not None:
        _worker = _start_worker()
    _worker.stdin.write(json.dumps({"script": script}) + "\n")
    _worker.stdin.flush()
    with selectors.DefaultSelector() as sel:
        sel.register(_worker.stdout, selectors.EVENT_READ)
        ready = sel.select(timeout_s)
    line = _worker.stdout.readline() if ready else ""
    if not line:
        why = f"timed out after {timeout_s} s" if not ready else f"worker died (exit {_worker.wait()})"
        _stop_worker(graceful=False)
        return {"ok": False, "out": "", "err": f"sm_90 compile {why}"}
    return json.loads(line)


def assert_compiles_for_sm90(script: str, timeout_s: int = 300) -> None:
    """Run `script` (which compiles kernels with triton.compile for GPUTarget("cuda", 90, 32) and prints
    "compiled") outside the interpreter; skip when this Triton ships no ptxas."""
    res = _run_in_worker(script, timeout_s)
    if "No such file" in res["err"] and "ptxas" in res["err"]:
        pytest.skip("no ptxas bundled with this triton")
    assert res["ok"] and "compiled" in res["out"], (
        res["err"][-3000:] or f"no 'compiled' in {res['out'][-3000:]!r}"
    )


# A script prelude (prepend it): compile_sm90(kernel, sig, const, warps, stages) compiles one specialization for
# sm_90 as the launcher specialises it on a GPU (16-byte aligned pointers, strides divisible by 16: without
# that the loads compile to scalar ones with no cp.async pipeline, and shared memory is not what a GPU sees);
# sig names the non-i32 arguments' types, const the constexprs.
COMPILE_SM90_PRELUDE = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

def compile_sm90(kernel, sig, const, warps, stages):
    names = list(kernel.arg_names)
    sig = {**{n: "i32" for n in names}, **sig, **{n: "constexpr" for n in const}}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names if n.endswith("_ptr") or "stride" in n}
    src = ASTSource(kernel, sig, constexprs={(names.index(n),): v for n, v in const.items()}, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
"""
