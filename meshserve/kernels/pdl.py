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
  * gdc_launch_dependents right after the wait (the "early" trigger): the next kernel can start only once all
    programs of this one have triggered, i.e. are resident, so its programs take free slots at the tail.
  One exception, argued where it is made: the MoE down GEMV (triton_moe_gemv._down_preloaded) reads the
  routing's ids before its wait, as the routing launch is two back and the gate_up launch between waits on it
  in every program before it can trigger or exit.
Kernels without the attribute (torch's, cuBLAS) simply serialize as before, in either direction.

The measured split (one H200, W1, 2026-11-30): Qwen3-0.6B 864.6 -> 1,093.0 tok/s, Llama-3.1-8B 211.7 -> 191.9.
A likely cause of the 8B's loss is static: the GEMV's preloaded columns (4 x 2,048 values held in registers
across the wait) take it from 29 to 61 registers a thread at 8 warps (ptxas for sm_90), so 4 instead of 8
programs fit on an SM, and every program of every wave then streams the rest of its row (half of a 4,096 row,
86% of down_proj's 14,336) with half the loads in flight. Qwen3-0.6B's rows (1,024) are the preload whole.
The variants below (selected by the environment in layers/backend_selection.py) exist to A/B that on the device:
  trigger "late"      gdc_launch_dependents after the program's last global load (its main loop) instead of
                      right after the wait. The early trigger already holds the next grid back until our last
                      wave is resident, so its programs take only slots ours no longer need; but they then sit
                      there (preloading weights, polling the wait) beside our tail. Late, they arrive when our
                      programs have read everything: less overlap, no contention
  one_wave_only       PDL only for launches whose grid fits in one wave (programs <= SMs x resident programs
                      per SM, estimated on the host from num_warps): multi-wave grids (the 8B's GEMVs) launch
                      plain (stream order, which keeps the chain safe) and keep the plain GEMV layout
  preload "all" | "none" | "row"   the GEMV's weight preload always (as measured), never (PDL launch and wait
                      only, the plain layout's occupancy), or only when it holds the whole row (K <= MAX_PRE_K);
                      the MoE down GEMV's preload of its experts' tiles follows it ("none": no preload)
  moe "preload" | "launch" | "off"   the MoE layer's softmax top-k and MoE GEMV launches with PDL, the down
                      GEMV preloading its experts' tiles before its wait (148 registers a thread against 46:
                      3 programs an SM instead of 10) or not ("launch"), or all three plain ("off": the chain
                      as before 2026-12-03, when only the dense kernels had PDL). H200 W1 Qwen3-30B-A3B:
                      off 330.6, launch 345.3, preload 349.3 tok/s (2026-12-03)

Llama-3.1-8B-sized dense models (hidden size above 2,048, 16-bit weights) take PDL in one-row decode steps only,
without the GEMV's preload of a partial row (auto_policy; H200 2026-12-04, two processes each: W1 221.1 -> 229.3
tok/s, where W2 lost 0.8% and fp8 weights' W1 3% with it on in every decode step).

Steps that carry prompt tokens run without PDL by default (`steps="decode"`; MESHSERVE_PDL_STEPS=all keeps it on
in every step): W3 on Qwen3-0.6B, one H200, 2026-12-02, mixed steps of ~254 decode rows + ~1,024 prompt tokens
took 9.6-10.2 ms with PDL against 8.46 ms without (same SM clock), while decode-only steps were faster with it
(2.0 against 2.5 ms at <= 64 rows, 6.8 against 7.0 at ~254): goodput at QPS 384 192 against 211 req/s. Why
the big steps lose is not measured; they have few launch gaps to hide (as the 8B's batch-1 layers).
The model runner marks each forward (`step_scope`); the mark is per thread, so graph captures and warm-ups
of mixed steps build and record the plain launches, and the decode graphs the PDL ones.

The switch is per process (the kernel wrappers are called from many layers): the model runner binds a
PdlPolicy from the backend selection (MESHSERVE_PDL=auto by default: dense models of hidden size <= 2,048; 1 / 0
force it, layers/backend_selection.py). Kernels take USE_GDC as a last constexpr defaulting to False (callers that never use PDL leave it
out): False, or GDC_EARLY / GDC_LATE (where the trigger goes: kernels/pdl_jit.py), False under the Triton
interpreter (which has no griddepcontrol), so the CPU path is the plain kernel; kernels with a PDL-only layout
(the GEMV's weight preload) take that as a separate constexpr the CPU tests can exercise.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import threading

import torch

# USE_GDC values: off, wait + trigger right after it, wait + trigger after the last global load
GDC_OFF, GDC_EARLY, GDC_LATE = False, 1, 2
TRIGGERS = ("early", "late")
PRELOADS = ("all", "none", "row")
STEPS = ("decode", "all", "one")  # which forwards PDL applies to: decode-only steps, every step, one-row decodes
MOES = ("preload", "launch", "off")  # the MoE layer's launches: PDL with the down GEMV's preload, PDL, plain
# the host's occupancy model for one_wave_only: Hopper's per-SM limits, and a register budget a thread of these
# kernels stays under (the PDL GEMV: 61 at 8 warps, 56 at 4; the norm and SiLU kernels fewer)
MAX_THREADS_PER_SM, MAX_PROGRAMS_PER_SM, REGS_PER_SM, REGS_PER_THREAD = 2048, 32, 65536, 64


@dataclasses.dataclass(frozen=True)
class PdlPolicy:
    """How the decode kernels launch: PDL on or off, and the variants under A/B (see the module docstring)."""

    enabled: bool = False
    trigger: str = "early"  # "early" | "late": where gdc_launch_dependents goes
    one_wave_only: bool = False  # PDL only for grids that fit in one wave
    preload: str = "all"  # "all" | "none" | "row": when the GEMV preloads weights before the wait
    steps: str = "decode"  # "decode" | "all" | "one": PDL in decode-only forwards, every forward, one-row decodes
    moe: str = "preload"  # "preload" | "launch" | "off": the MoE layer's routing and MoE GEMV launches

    def __post_init__(self):
        if (self.trigger not in TRIGGERS or self.preload not in PRELOADS or self.steps not in STEPS
                or self.moe not in MOES):
            raise ValueError(f"PdlPolicy: trigger in {TRIGGERS}, preload in {PRELOADS}, steps in {STEPS}, "
                             f"moe in {MOES}, "
                             f"got {self}")


_policy = PdlPolicy()


def set_policy(policy: PdlPolicy) -> None:
    """Bind the PDL policy of this process (the model runner, from its kernel selection)."""
    global _policy
    _policy = policy


def policy() -> PdlPolicy:
    return _policy


def set_enabled(on: bool) -> None:
    """Turn PDL on or off for the decode kernels of this process, keeping the policy's variants."""
    set_policy(dataclasses.replace(_policy, enabled=bool(on)))


def is_enabled() -> bool:
    return _policy.enabled


@contextlib.contextmanager
def enabled(on: bool = True, **variants):
    """PDL set to `on` (and any PdlPolicy field given) inside the block (tests, benchmarks), restored after."""
    before = _policy
    set_policy(dataclasses.replace(_policy, enabled=bool(on), **variants))
    try:
        yield
    finally:
        set_policy(before)


_step = threading.local()  # .plain: this thread's current forward carries prompt tokens and PDL skips it


@contextlib.contextmanager
def step_scope(decode_only: bool, rows: int | None = None):
    """Mark the forward run inside the block (this thread): a step carrying prompt tokens launches its kernels
    plain under the policy's steps="decode" (the default), whatever the switch; a decode-only step as the
    switch says; under steps="one" only a decode-only step of one row (rows; None: not known, plain). Nested
    scopes restore the outer mark."""
    before = getattr(_step, "plain", False)
    if _policy.steps == "one":
        _step.plain = not (decode_only and rows == 1)
    else:
        _step.plain = not decode_only and _policy.steps == "decode"
    try:
        yield
    finally:
        _step.plain = before


@contextlib.contextmanager
def plain():
    """Kernels launched inside the block (this thread) without PDL, whatever the switch (the decode graphs'
    greedy head under MESHSERVE_PDL_HEAD=0, an A/B)."""
    before = getattr(_step, "plain", False)
    _step.plain = True
    try:
        yield
    finally:
        _step.plain = before


def resolve(pdl: bool | None) -> bool:
    """A wrapper's explicit `pdl` argument, or the process switch when None (off inside a forward that
    step_scope marked plain)."""
    if pdl is not None:
        return bool(pdl)
    return _policy.enabled and not getattr(_step, "plain", False)


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (no griddepcontrol, no inline PTX there)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def _device_supports(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


@functools.cache
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def one_wave_programs(num_sms: int, num_warps: int) -> int:
    """How many programs of `num_warps` warps are resident at once on num_sms SMs, by threads, the program cap
    and the register budget (an estimate: the compiled kernel's registers are not known before the launch)."""
    threads = 32 * num_warps
    per_sm = min(MAX_PROGRAMS_PER_SM, MAX_THREADS_PER_SM // threads, REGS_PER_SM // (threads * REGS_PER_THREAD))
    return num_sms * max(1, per_sm)


# MESHSERVE_PDL=auto turns PDL on for models of hidden size up to this (see auto_enables)
AUTO_MAX_HIDDEN = 2048


def auto_enables(hidden_size: int | None) -> bool:
    """MESHSERVE_PDL=auto's rule (the default): PDL (early trigger, preload "all") for models whose hidden size
    is at most AUTO_MAX_HIDDEN, dense or MoE, none for larger ones or an unknown size (the norm fold and the
    short-context graphs take the same rule for dense models only: layers/backend_selection.py). Why the hidden size:
    it is the K of the QKV and gate_up rows, and with it every layer's weight bytes. At 1,024 (Qwen3-0.6B) a
    layer's kernels run a few us each, so the launch gaps PDL hides are a large part of the step, and the GEMV
    preload (2,048 columns) holds those rows whole; at 4,096 (Llama-3.1-8B, -9% on 2026-11-30) a layer streams
    ~200 MB, the gaps are small beside it, and the preload's registers halve the programs per SM for the rows'
    remaining columns. 2,048 is the largest row the preload still holds whole. MoE models of 2,048 (Qwen3-30B-A3B,
    DeepSeek-V2-Lite) since 2026-12-03: W1 on an H200, two processes each, Qwen3-30B-A3B 255.0 -> 282.3 tok/s
    (+10.7%; 250.3 -> 278.9 on 2026-12-02), DeepSeek-V2-Lite 327.8 -> 338.0 (+3.1%; decode graph 2.89 -> 2.78
    ms), W2 Qwen3-30B-A3B the same within noise (22.12 / 22.30 s); tests/gpu/test_pdl_decode.py's mixed-step test
    keeps their tokens. H200 W1 Qwen3-0.6B: +26% on 2026-11-30,
    -28% on 2026-12-01 (852.6 -> 615.9, not reproduced since), +25% twice on 2026-12-02 (862.3 -> 1,080.0 and
    1,072.1, in two calls; the GPU tests passed), so it is on by default for such models. Those were single
    runs: later that day the same build spread over 712-1,073 tok/s from one process to the next with PDL on
    (30 processes, median 895) and 680-853 with it off (4, median 825), so the gain is +8% at the medians, not
    +25%, and any one-run A/B of this model is noise (BENCHMARKS.md "Twenty-first session"). The next session
    found the spread was the host (a W1 step's host work as long as the GPU's in some processes): the decode
    graph's own device time, replayed back to back, is the same in every process, 0.789 ms with PDL and 1.043
    without (-24%; BENCHMARKS.md "Twenty-second session")."""
    return hidden_size is not None and hidden_size <= AUTO_MAX_HIDDEN


def auto_policy(hidden_size: int | None, moe: bool, quantized: bool, world_size: int = 1,
                waiting_weights: bool = False) -> dict | None:
    """MESHSERVE_PDL=auto's PdlPolicy fields for a model, or None (PDL off). Hidden size <= AUTO_MAX_HIDDEN
    (auto_enables): on in every decode-only step, the GEMV preloading up to 2,048 columns. Larger dense models of
    16-bit weights on one GPU (world_size: TP x PP ranks): on in one-row decode steps only, the GEMV preloading
    only rows it holds whole (none of an 8B's): H200 W1 Llama-3.1-8B, two processes each, 2026-12-04: 221.1 tok/s
    without PDL, 229.3 with (+3.7%; decode graph 4.49 -> 4.33 ms), 214.9 with the partial-row preload (its
    registers halve the programs an SM), 217.4 one_wave_only; in every decode step W2 lost 0.8% (9,619 -> 9,542
    output tok/s), so those stay plain. Not measured, so off: larger MoE models (Mixtral), larger models over
    several GPUs (their per-layer all-reduces). Quantized models of that size stay plain unless their format's
    batch-1 GEMV requests its first weights before the PDL wait (waiting_weights: per-channel fp8, the words
    GEMV; AWQ / GPTQ int4, the half GEMV): H200 W1 Llama-3.1-8B fp8, 2026-12-04, two processes each: 339.1 tok/s
    plain (half GEMV), 354.0 so (361.7 / 362.2 in single runs; before it the fp8 GEMV had no wait of its own and
    PDL cost 3%, 333.0 -> 322.9); AWQ int4 (thirty-fifth session, same two-process A/B): 391.9 plain, 424.4 so."""
    if auto_enables(hidden_size):
        return {}
    if hidden_size is None or moe or world_size > 1 or (quantized and not waiting_weights):
        return None
    return {"preload": "row", "steps": "one"}


def gdc_kwargs(x: torch.Tensor, pdl: bool | None = None, programs: int | None = None,
               num_warps: int = 4) -> dict:
    """Launch keywords for a kernel with a USE_GDC constexpr: {"USE_GDC": GDC_EARLY or GDC_LATE (the policy's
    trigger), "launch_pdl": True} when PDL is on (explicitly or by the switch) and x lives on an sm_90+ GPU outside
    the interpreter, else {"USE_GDC": False} (the kernel compiles without griddepcontrol and launches as before).
    programs / num_warps: the launch's grid size and warps, for the one_wave_only variant (None: one wave)."""
    if not (resolve(pdl) and x.is_cuda and not interpreting()):
        return {"USE_GDC": GDC_OFF}
    index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    if not _device_supports(index):
        return {"USE_GDC": GDC_OFF}
    if _policy.one_wave_only and programs is not None and programs > one_wave_programs(_num_sms(index), num_warps):
        return {"USE_GDC": GDC_OFF}
    return {"USE_GDC": GDC_LATE if _policy.trigger == "late" else GDC_EARLY, "launch_pdl": True}


def preload_columns(x: torch.Tensor, k: int, pdl: bool | None, gdc: dict, max_pre_k: int) -> int:
    """Columns of weights a GEMV program of a K-long row loads before the wait, for a launch with keywords gdc:
    none with PDL off (the plain layout, bit for bit), under preload "none", or where the launch itself went
    plain (one_wave_only); under "row" only when the whole row fits in max_pre_k. In the interpreter the layout
    follows the switch alone (no launch there uses PDL), so CPU tests exercise it."""
    if not resolve(pdl) or _policy.preload == "none" or (x.is_cuda and not interpreting() and not gdc["USE_GDC"]):
        return 0
    pre = min(1 << max(0, k - 1).bit_length(), max_pre_k)  # next power of two, capped
    return 0 if _policy.preload == "row" and pre < k else pre
