"""Verification of proposals against the target model's distributions at k + 1 positions.

Greedy rows keep the longest prefix of proposals equal to the target's argmax, then take the target's argmax
at the first disagreement (or after the last proposal): exactly the tokens decoding without speculation gives.
Random rows use rejection sampling (Leviathan et al. 2023; Chen et al. 2023): proposal d at position j is
accepted with probability min(1, p_j(d) / q_j(d)); the first rejected one is replaced by a sample of
norm(max(0, p_j - q_j)); if all are accepted a bonus token comes from p_k. The output is distributed as
the target's samples would be. q is the proposer's distribution, a one-hot at d when it proposes
deterministically (n-gram, greedy drafts): then acceptance is p_j(d) and the residual is p_j without d.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from meshserve.host_lists import to_device
from meshserve.layers.sampler import apply_min_p, apply_top_k_top_p, random_sample
from meshserve.sampling import SamplingParams


@dataclass
class VerifyResult:
    """Per sequence: the tokens the step produced (accepted proposals, then the target's own token) and how
    many proposals were accepted."""

    token_ids: list[list[int]]
    num_accepted: list[int]


def target_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """[R, V] probabilities each row's sampler would draw from: temperature, min_p, top_k, top_p (the
    Sampler's order), in float32. Rows of greedy params get temperature 1 (callers use their argmax)."""
    logits = logits.to(torch.float32, copy=True)
    dev = logits.device
    temp = to_device([1.0 if p.greedy else p.temperature for p in params], dev, torch.float32)
    logits.div_(temp.unsqueeze(1))
    if any(p.min_p > 0 for p in params):
        logits = apply_min_p(logits, to_device([p.min_p for p in params], dev, torch.float32))
    vocab = logits.shape[-1]
    top_k = [min(p.top_k, vocab) if p.top_k > 0 else 0 for p in params]
    use_k, use_p = any(k for k in top_k), any(p.top_p < 1.0 for p in params)
    if use_k or use_p:
        logits = apply_top_k_top_p(
            logits,
            to_device(top_k, dev) if use_k else None,
            to_device([p.top_p for p in params], dev, torch.float32) if use_p else None,
        )
    return torch.softmax(logits, dim=-1)


def verify(
    logits: torch.Tensor,
    draft_token_ids: list[list[int]],
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
    draft_probs: torch.Tensor | None = None,
) -> VerifyResult:
    """Verify each sequence's proposals.

    logits: [sum(k_b + 1), V], each sequence's k_b + 1 rows in turn (the scores after its last verified
    token and after each proposal). draft_probs: [sum(k_b), V] proposal distributions, or None for
    deterministic proposers (one-hot q). generators: a seeded request's generator, or None.
    """
    return verify_result(verify_on_device(logits, draft_token_ids, params, generators, draft_probs).tolist())


def verify_result(packed: list[list[int]]) -> VerifyResult:
    """VerifyResult from verify_on_device's rows, read back to the host."""
    tokens = [row[2 : 2 + row[0]] + [row[1]] for row in packed]
    return VerifyResult(tokens, [row[0] for row in packed])


def verify_host_rows(draft_token_ids: list[list[int]], params: list[SamplingParams]) -> list[list[int]]:
    """What verify_on_device needs from the host, one row per sequence: (k_b, its first logits row, greedy,
    proposals padded to K) ([B, 3 + K]); a caller with other small arrays to upload packs them in one copy."""
    ks = [len(d) for d in draft_token_ids]
    kmax = max(ks)
    offsets = [0]
    for k in ks[:-1]:
        offsets.append(offsets[-1] + k + 1)
    return [[k, off, int(p.greedy), *d, *[0] * (kmax - k)]
            for k, off, p, d in zip(ks, offsets, params, draft_token_ids, strict=True)]


def verify_on_device(
    logits: torch.Tensor,
    draft_token_ids: list[list[int]],
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
    draft_probs: torch.Tensor | None = None,
    greedy_tokens: torch.Tensor | None = None,
    host_rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """verify() without reading anything back: [B, 2 + K] int64 rows of (accepted count, the target's own
    token, the proposals), for an asynchronous copy to the host (verify_result reads it). greedy_tokens
    ([B, K + 1], benchmarks only: spec_decode/replay_proposer.py's oracle) replaces the argmax after it is
    computed, so the work stays that of a real step. host_rows: verify_host_rows' rows already on the device
    (uploaded with the caller's own), else copied here."""
    num_seqs = len(draft_token_ids)
    dev = logits.device
    ks = [len(d) for d in draft_token_ids]
    kmax = max(ks)
    width = kmax + 1
    # [B, K+1] row index into logits, padding rows repeat the sequence's last row.
    # one host-to-device copy per step: [B, 3 + K] rows of (k_b, first logits row, greedy, proposals padded)
    packed = host_rows if host_rows is not None else to_device(verify_host_rows(draft_token_ids, params), dev)
    k_t, draft, greedy = packed[:, 0], packed[:, 3:], packed[:, 2].bool()
    cols = torch.arange(width, device=dev)
    rows = packed[:, 1:2] + torch.minimum(cols.unsqueeze(0), k_t.unsqueeze(1))
    valid = cols[:kmax].unsqueeze(0) < k_t.unsqueeze(1)  # [B, K]

    flat_logits = logits.index_select(0, rows.reshape(-1))  # [B*(K+1), V]
    argmax = flat_logits.argmax(dim=-1).view(num_seqs, width)
    if greedy_tokens is not None:
        argmax = greedy_tokens
    accept = draft == argmax[:, :kmax]
    random_rows = [b for b, p in enumerate(params) if not p.greedy]
    probs = None
    if random_rows:
        probs = target_probs(flat_logits, [p for p in params for _ in range(width)]).view(num_seqs, width, -1)
        p_d = probs[:, :kmax].gather(2, draft.unsqueeze(2)).squeeze(2)  # [B, K]
        if draft_probs is not None:
            q_full = _pad_draft_probs(draft_probs, ks, kmax)  # [B, K, V]
            q_d = q_full.gather(2, draft.unsqueeze(2)).squeeze(2)
        else:
            q_full, q_d = None, torch.ones_like(p_d)
        u = _uniforms(ks, generators, dev)
        accept = torch.where(greedy.unsqueeze(1), accept, u * q_d < p_d)
    num_accepted = (accept & valid).int().cumprod(dim=1).sum(dim=1)  # [B]
    final = argmax.gather(1, num_accepted.long().unsqueeze(1)).squeeze(1)
    if random_rows:
        idx = num_accepted.long()
        p_a = probs[torch.arange(num_seqs, device=dev), idx]  # [B, V]
        rejected = idx < k_t
        # residual distribution at the first rejection: max(0, p - q), renormalised
        if kmax == 0:
            residual = p_a
        elif q_full is not None:
            q_a = q_full[torch.arange(num_seqs, device=dev), idx.clamp(max=max(kmax - 1, 0))]
            residual = (p_a - q_a).clamp_(min=0)
        else:
            residual = p_a.clone()
            d_a = draft.gather(1, idx.clamp(max=max(kmax - 1, 0)).unsqueeze(1))
            residual.scatter_(1, d_a, 0.0)
        mass = residual.sum(dim=1, keepdim=True)
        residual = torch.where(mass > 0, residual / mass.clamp(min=1e-30), p_a)  # p == q: nothing to correct
        dist = torch.where(rejected.unsqueeze(1), residual, p_a)
        gens = {b: g for b, g in enumerate(generators) if g is not None and not params[b].greedy}
        sampled = random_sample(dist, gens)
        final = torch.where(greedy, final, sampled)
    return torch.cat([num_accepted.long().unsqueeze(1), final.long().unsqueeze(1), draft], dim=1)


def _pad_draft_probs(draft_probs: torch.Tensor, ks: list[int], kmax: int) -> torch.Tensor:
    """[sum(k_b), V] -> [B, K, V], padding with the sequence's last row (never read past its k_b)."""
    out = draft_probs.new_zeros(len(ks), kmax, draft_probs.shape[-1])
    start = 0
    for b, k in enumerate(ks):
        out[b, :k] = draft_probs[start : start + k]
        start += k
    return out


def _uniforms(ks: list[int], generators: list[torch.Generator | None], device) -> torch.Tensor:
    """[B, K] uniforms in [0, 1) for rows of ks[b] proposals; a seeded row draws its own k_b from its own
    generator, so its samples do not depend on the batch (drawing the batch's K moved its generator by as many
    as the row with the most proposals had)."""
    u = torch.rand(len(ks), max(ks), device=device)
    for b, g in enumerate(generators):
        if g is not None:
            u[b, : ks[b]] = torch.rand(ks[b], device=device, generator=g)
    return u
