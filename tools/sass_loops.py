"""The loops of a kernel's SASS (nvdisasm -c output), for the static sm_90 readings of tools/int4_gemv_sass.py
and tools/mla_decode_sass.py: each backward branch's body, and the opcode counts of one."""

from __future__ import annotations

import collections
import re

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
