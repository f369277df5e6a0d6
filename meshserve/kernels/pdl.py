"""Programmatic dependent launch (PDL) for the batch-1 decode kernels, on Hopper and newer.

A batch-1 decode step of a small model is a chain of ~10 short kernels per layer, each a few us of work plus
the gap while the next one launches and ramps up. With PDL a kernel is launched with the CUDA attribute
"programmatic stream serialization" (Triton 3.4+: `launch_pdl=True`, through cuLaunchKernelEx; inside stream
capture it becomes a programmatic edge of the CUDA graph, CUDA 12.3+), so it may start once every program of
the previous kernel has executed `griddepcontrol.launch_dependents` (`tl.extra.cuda.gdc_launch_dependents`)
or exited. It then runs its prologue (index math, loads of weights no kernel writes) and executes
`griddepcontrol.wait` (`tl.extra.cuda.gdc_wait`) before it reads or writes anything a previous kernel may
touch; the wait returns when the previous grid has completed and its memory is visible.

Rules every kernel here keeps (what makes the chain safe):
  * every program executes gdc_wait before its first load of an activation / metadata tensor and before its
    first store, early exits included: a grid that finished without waiting could complete before its
    predecessor, and the kernel after it would read stale data (the wait is transitive only through waits);
  * gdc_launch_dependents right after the wait: the next kernel can start only once all programs of this one
    are resident, so its programs take free slots at the tail and cannot starve ours.
Kernels without the attribute (torch's, cuBLAS) simply serialize as before, in either direction.

The switch is per process (the kernel wrappers are called from many layers): the model runner binds it from
the backend selection (MESHSERVE_PDL=1, layers/backend_selection.py); it is off by default until measured.
Kernels take USE_GDC as a last constexpr defaulting to False (callers that never use PDL leave it out), False
under the Triton interpreter (which has no griddepcontrol), so the CPU path is the plain kernel; kernels with a
PDL-only layout (the GEMV's weight preload) take that as a separate constexpr the CPU tests can exercise.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

_enabled = False


def set_enabled(on: bool) -> None:
    """Turn PDL on or off for the decode kernels of this process (bound by the model runner)."""
    global _enabled
    _enabled = bool(on)


def is_enabled() -> bool:
    return _enabled


@contextlib.contextmanager
def enabled(on: bool = True):
    """PDL set to `on` inside the block (tests, benchmarks), restored after."""
    before = _enabled
    set_enabled(on)
    try:
        yield
    finally:
        set_enabled(before)


def resolve(pdl: bool | None) -> bool:
    """A wrapper's explicit `pdl` argument, or the process switch when None."""
    return _enabled if pdl is None else bool(pdl)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def _device_supports(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def gdc_kwargs(x: torch.Tensor, pdl: bool | None = None) -> dict:
    """Launch keywords for a kernel with a USE_GDC constexpr: {"USE_GDC": True, "launch_pdl": True} when PDL
    is on (explicitly or by the switch) and x lives on an sm_90+ GPU outside the interpreter, else
    {"USE_GDC": False} (the kernel compiles without griddepcontrol and launches as before)."""
    if not (resolve(pdl) and x.is_cuda and not _interpreting()):
        return {"USE_GDC": False}
    on = _device_supports(x.device.index if x.device.index is not None else torch.cuda.current_device())
    return {"USE_GDC": True, "launch_pdl": True} if on else {"USE_GDC": False}
