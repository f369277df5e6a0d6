"""The device side of PDL (kernels/pdl.py): where a kernel waits on the previous grid and where it lets the next
one launch, by its USE_GDC constexpr (GDC_OFF, GDC_EARLY, GDC_LATE). Both are no-ops when USE_GDC is off, so
the interpreter (which has no griddepcontrol) runs the plain kernel.

Every kernel calls gdc_wait before its first load of anything a previous kernel may write (and before any early
exit), and gdc_trigger_late after its last global load (its main loop's end): the trigger lands at one of the
two by USE_GDC. An exit counts as a trigger, so a program that returns early needs neither.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def gdc_wait(USE_GDC: tl.constexpr):
    """Wait until the previous grid completed and its memory is visible; the early trigger right after."""
    if USE_GDC:
        tl.extra.cuda.gdc_wait()
    if USE_GDC == 1:  # GDC_EARLY (a literal: jit code reads only constexpr globals)
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def gdc_trigger_late(USE_GDC: tl.constexpr):
    """The late trigger: this program has read everything it streams; only math and stores remain."""
    if USE_GDC == 2:  # GDC_LATE
        tl.extra.cuda.gdc_launch_dependents()
