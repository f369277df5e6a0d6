"""Checking a claimed throughput against the roofline: a figure above it is physically impossible."""

from __future__ import annotations

from dataclasses import dataclass

from meshserve.planner.plan import Candidate


@dataclass(frozen=True)
class ClaimVerdict:
    """Whether a claimed decode tok/s can be true on this layout, and why, in one line."""

    claimed_tok_per_s: float
    roofline_tok_per_s: float
    predicted_tok_per_s: float
    impossible: bool
    message: str


def check_claim(candidate: Candidate, claimed_tok_per_s: float, hbm_gb_s: float) -> ClaimVerdict:
    """Compare a claim with `candidate`'s ceiling at the same concurrency (efficiency 1, no KV, no comm)."""
    p = candidate.prediction
    roof, gb = p.roofline_tok_per_s, p.roofline_bytes_per_gpu / 1e9
    basis = (f"{candidate.layout.label} at {p.concurrency} concurrent: {gb:.1f} GB per GPU per step "
             f"at {hbm_gb_s / 1e3:.2f} TB/s")
    # as many decimals as tell the two apart: a claim of 209 against the 8B's 208.6 on one H100 read "209 tok/s
    # exceeds the roofline 209 tok/s"
    digits = next((d for d in range(4) if f"{claimed_tok_per_s:.{d}f}" != f"{roof:.{d}f}"), 0)
    claim, ceiling = f"{claimed_tok_per_s:,.{digits}f}", f"{roof:,.{digits}f}"
    if claimed_tok_per_s > roof:
        msg = f"IMPOSSIBLE: {claim} tok/s exceeds the roofline {ceiling} tok/s ({basis})"
        return ClaimVerdict(claimed_tok_per_s, roof, p.decode_tok_per_s, True, msg)
    msg = (f"possible: {claim} tok/s is {claimed_tok_per_s / roof:.0%} of the roofline "
           f"{ceiling} tok/s ({basis}); predicted {p.decode_tok_per_s:,.0f}")
    return ClaimVerdict(claimed_tok_per_s, roof, p.decode_tok_per_s, False, msg)
