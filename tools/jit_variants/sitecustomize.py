"""Logs every Triton kernel specialization a process builds (disk-cache hit or not), with the time since start-up.

Put this folder first on PYTHONPATH and set JIT_VARIANTS_LOG=FILE: each Python process appends one line per new
(kernel, signature/specialization, constexprs) to FILE.PID. tools/w2_jit_probe.sh reads them: the variants built
after the engine's start-up are compiles that land inside serving (a cold Triton cache pays ~0.5 s each).
"""

import os
import time

_LOG = os.environ.get("JIT_VARIANTS_LOG")
if _LOG:
    _T0 = time.time()
    try:
        from triton import knobs

        def _hook(*, key, repr, fn, compile, is_manual_warmup, already_compiled):  # noqa: A002 (Triton's name)
            consts = {k: v for k, v in compile["constants"].items() if isinstance(v, (int, float, bool, str))}
            with open(f"{_LOG}.{os.getpid()}", "a") as f:
                attrs = {k: v for k, v in compile["configs"][0].items() if v}  # divisibility per argument index
                f.write(f"{time.time():.3f}\t{time.time() - _T0:.3f}\t{repr}\t{consts}\t{attrs}\n")
            return None  # go on compiling

        knobs.runtime.jit_cache_hook = _hook
    except Exception as e:  # noqa: BLE001 (a probe must never stop the process it watches)
        print(f"jit_variants: no hook ({e})")
