"""The loops of a kernel's SASS (nvdisasm -c output), for the static sm_90 readings of tools/int4_gemv_sass.py,
tools/mla_decode_sass.py and tools/decode_attention_sass.py: a compiled kernel's registers, stack and SASS
(cubin_facts), each backward branch's body, and the opcode counts of one."""

from __future__ import annotations

import collections
import os
import re
import subprocess
import tempfile


def cubin_facts(compiled) -> tuple[int, int, str]:
    """(registers, stack bytes, SASS) of a kernel compiled by triton.compile, read from its cubin with the
    cuobjdump and nvdisasm bundled with Triton."""
    import triton

    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        use = subprocess.run([f"{bin_dir}/cuobjdump", "-res-usage", f.name], check=True, capture_output=True,
                             text=True).stdout
        sass = subprocess.run([f"{bin_dir}/nvdisasm", "-c", f.name], check=True, capture_output=True,
                              text=True).stdout
    regs, stack = (int(v) for v in re.search(r"REG:(\d+) STACK:(\d+)", use).groups())
    return regs, stack, sass

_INSTRUCTION = re.compile(r"\s+/\*[0-9a-f]{4}\*/")


def backward_loops(sass: str) -> list[list[str]]:
    """Every loop body: the instruction lines from a label to a branch back to it."""
    lines = sass.splitlines()
    labels = {ln.strip()[:-1]: i for i, ln in enumerate(lines) if re.match(r"\.L_x_\d+:", ln.strip())}
    loops = []
    for i, ln in enumerate(lines):
        m = re.search(r"BRA `\((\.L_x_\d+)\)", ln)
        if m and labels.get(m.group(1), i) < i:
            loops.append([x for x in lines[labels[m.group(1)] : i + 1] if _INSTRUCTION.match(x)])
    return loops


def opcodes(body: list[str]) -> collections.Counter:
    """Opcode counts of instruction lines (predicates and modifiers' operands dropped)."""
    return collections.Counter(
        re.sub(r"^\s*/\*[0-9a-f]{4}\*/\s*(@!?U?P\w+\s+)?", "", x).split()[0].rstrip(";") for x in body
    )
