"""The sampler: turns one step's logits into next tokens (and their logprobs), batched over requests.

Order of operations (as in vLLM v1): logprobs of the raw logits -> allowed / banned ids -> logit bias ->
penalties -> greedy argmax | temperature -> min_p -> top_k -> top_p -> exponential-race sampling.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from meshserve.kernels.fused import fused_ops_for
from meshserve.sampling import SamplingParams

# Temperatures below this are greedy (same threshold as SamplingParams.greedy).
_GREEDY_EPS = 1e-5


def _pad_ids(rows: list[list[int]], pad: int, device: torch.device | str) -> torch.Tensor:
    """[B, max_len] int64 tensor of `rows`, right-padded with `pad` (an id past the vocabulary)."""
    width = max((len(r) for r in rows), default=0)
    padded = [r + [pad] * (width - len(r)) for r in rows]
    return torch.tensor(padded, dtype=torch.int64, device=device).reshape(len(rows), width)


@dataclass
class SamplingMetadata:
    """Per-row sampling settings for one step, as tensors on the logits' device."""

    temperature: torch.Tensor  # [B] float32; 0 for greedy rows
    top_p: torch.Tensor  # [B] float32
    top_k: torch.Tensor  # [B] int64; 0 = disabled
    min_p: torch.Tensor  # [B] float32
    repetition_penalty: torch.Tensor  # [B] float32
    presence_penalty: torch.Tensor  # [B] float32
    frequency_penalty: torch.Tensor  # [B] float32
    # [B, Lp] / [B, Lo] int64 padded with vocab_size; None when no row uses penalties.
    prompt_token_ids: torch.Tensor | None
    output_token_ids: torch.Tensor | None
    generators: dict[int, torch.Generator]  # row -> generator of a seeded (random) request
    # Per row, ids to mask to -inf (EOS/stop ids while output < min_tokens, bad words); None if none.
    banned_token_ids: list[list[int]] | None
    # Per row, the only ids it may take (allowed_token_ids), None for a row without; None if no row has one.
    allowed_token_ids: list[list[int] | None] | None
    # Per row, {token id: bias} added to the logits (OpenAI's logit_bias); None if no row has one.
    logit_bias: list[dict[int, float] | None] | None
    max_num_logprobs: int | None  # largest logprobs k of any row; None = no row wants logprobs
    # Fast-path flags; the top_p/top_k/min_p ones only look at random (non-greedy) rows.
    all_greedy: bool
    all_random: bool
    no_top_p: bool
    no_top_k: bool
    no_min_p: bool
    no_penalties: bool

    @classmethod
    def build(
        cls,
        params: list[SamplingParams],
        prompt_token_ids: list[list[int]],
        output_token_ids: list[list[int]],
        generators: list[torch.Generator | None],
        vocab_size: int,
        device: torch.device | str,
        banned_token_ids: list[list[int]] | None = None,
    ) -> SamplingMetadata:
        """Gather the batch's SamplingParams into tensors on `device` (params are already validated).

        Generators of greedy rows are dropped: greedy rows draw no randomness, so a seeded request's
        generator only advances on steps where it actually samples.
        """
        greedy = [p.greedy for p in params]
        random_params = [p for p, g in zip(params, greedy) if not g]
        # top_k <= 0 means disabled (0); a k past the vocabulary is the whole vocabulary.
        top_k = [min(p.top_k, vocab_size) if p.top_k > 0 else 0 for p in params]
        use_penalties = [p.uses_penalties for p in params]
        no_penalties = not any(use_penalties)

        prompt_ids = output_ids = None
        if not no_penalties:
            # Rows without penalties get no ids: their penalties are identities anyway.
            prompt_ids = _pad_ids([list(t) if u else [] for t, u in zip(prompt_token_ids, use_penalties)],
                                  vocab_size, device)
            output_ids = _pad_ids([list(t) if u else [] for t, u in zip(output_token_ids, use_penalties)],
                                  vocab_size, device)

        if banned_token_ids is not None and not any(banned_token_ids):
            banned_token_ids = None
        logit_bias = [p.logit_bias for p in params] if any(p.logit_bias for p in params) else None
        allowed = ([p.allowed_token_ids for p in params] if any(p.allowed_token_ids is not None for p in params)
                   else None)
        asked = [p.logprobs for p in params if p.logprobs is not None]

        # every per-row float setting in one host array and one copy (not six small synchronous ones)
        floats = torch.tensor([[0.0 if g else p.temperature for p, g in zip(params, greedy)],
                               [p.top_p for p in params], [p.min_p for p in params],
                               [p.repetition_penalty for p in params], [p.presence_penalty for p in params],
                               [p.frequency_penalty for p in params]], dtype=torch.float32)
        if torch.device(device).type == "cuda":
            floats = floats.pin_memory()
        floats = floats.to(device, non_blocking=True)

        return cls(
            temperature=floats[0],
            top_p=floats[1],
            top_k=torch.tensor(top_k, dtype=torch.int64).to(device, non_blocking=True),
            min_p=floats[2],
            repetition_penalty=floats[3],
            presence_penalty=floats[4],
            frequency_penalty=floats[5],
            prompt_token_ids=prompt_ids,
            output_token_ids=output_ids,
            generators={i: gen for i, (gen, g) in enumerate(zip(generators, greedy))
                        if gen is not None and not g},
            banned_token_ids=banned_token_ids,
            allowed_token_ids=allowed,
            logit_bias=logit_bias,
            max_num_logprobs=max(asked) if asked else None,
            all_greedy=all(greedy),
            all_random=not any(greedy),
            no_top_p=all(p.top_p >= 1.0 for p in random_params),
            no_top_k=all(k == 0 or k >= vocab_size for k, g in zip(top_k, greedy) if not g),
            no_min_p=all(p.min_p <= 0.0 for p in random_params),
            no_penalties=no_penalties,
        )


@dataclass
class SamplerOutput:
    """One step's sampled tokens and, when any row asked, their logprobs."""

    sampled_token_ids: torch.Tensor  # [B] int64
    logprobs: torch.Tensor | None  # [B] float32: logprob of the sampled token (raw logits)
    ranks: torch.Tensor | None  # [B] int64: 1-based rank of the sampled token in the vocabulary
    top_token_ids: torch.Tensor | None  # [B, k] int64, k = max_num_logprobs (may be 0 columns)
    top_logprobs: torch.Tensor | None  # [B, k] float32


def compute_logprobs(
    logits: torch.Tensor, token_ids: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """log_softmax in float32 of [T, V] logits; returns (logprob of token_ids [T], 1-based rank [T],
    top-k ids [T, k], top-k logprobs [T, k]). Used for sample logprobs and prompt_logprobs."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    token_logprobs = logprobs.gather(-1, token_ids.long().unsqueeze(-1))
    # Rank = tokens strictly more likely + 1, so ties share the better rank.
    ranks = (logprobs > token_logprobs).sum(dim=-1) + 1
    top_logprobs, top_ids = logprobs.topk(k, dim=-1)  # sorted descending
    return token_logprobs.squeeze(-1), ranks, top_ids, top_logprobs


def apply_banned(logits: torch.Tensor, banned_token_ids: list[list[int]] | None) -> torch.Tensor:
    """Set each row's banned ids to -inf, in place."""
    if not banned_token_ids:
        return logits
    rows = [i for i, ids in enumerate(banned_token_ids) for _ in ids]
    cols = [t for ids in banned_token_ids for t in ids]
    if rows:
        index = torch.tensor([rows, cols], dtype=torch.int64, device=logits.device)
        logits[index[0], index[1]] = float("-inf")
    return logits


def apply_allowed(logits: torch.Tensor, allowed_token_ids: list[list[int] | None] | None) -> torch.Tensor:
    """Set every id outside a row's allowed ids to -inf, in place; rows without a list keep all."""
    if not allowed_token_ids:
        return logits
    restricted = [i for i, ids in enumerate(allowed_token_ids) if ids is not None]
    rows = [i for i in restricted for _ in allowed_token_ids[i]]
    cols = [t for i in restricted for t in allowed_token_ids[i]]
    # one host-to-device copy: the restricted rows, then the (row, id) pairs they allow
    flat = torch.tensor(restricted + rows + cols, dtype=torch.int64).to(logits.device, non_blocking=True)
    r, n = len(restricted), len(rows)
    blocked = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device)
    blocked[flat[:r]] = True
    blocked[flat[r : r + n], flat[r + n :]] = False
    return logits.masked_fill_(blocked, float("-inf"))


def apply_logit_bias(logits: torch.Tensor, logit_bias: list[dict[int, float] | None] | None) -> torch.Tensor:
    """Add each row's {token id: bias} to its logits, in place."""
    if not logit_bias:
        return logits
    rows = [i for i, bias in enumerate(logit_bias) for _ in (bias or ())]
    cols = [t for bias in logit_bias for t in (bias or ())]
    values = [b for bias in logit_bias for b in (bias or {}).values()]
    index = torch.tensor([rows, cols], dtype=torch.int64).to(logits.device, non_blocking=True)
    logits.index_put_((index[0], index[1]), torch.tensor(values, dtype=logits.dtype).to(logits.device),
                      accumulate=True)
    return logits


def _token_counts(ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[B, V] occurrence counts of `ids` ([B, L], padded with ids >= V, which land in a dropped bin)."""
    counts = torch.zeros(ids.shape[0], vocab_size + 1, dtype=torch.int64, device=ids.device)
    counts.scatter_add_(1, ids.clamp(max=vocab_size), torch.ones_like(ids))
    return counts[:, :vocab_size]


def apply_penalties(logits: torch.Tensor, metadata: SamplingMetadata) -> torch.Tensor:
    """Apply repetition (prompt + output), presence and frequency (output only) penalties; returns new logits.

    Rows whose penalties are identities (1, 0, 0) come back unchanged.
    """
    if metadata.no_penalties or metadata.prompt_token_ids is None or metadata.output_token_ids is None:
        return logits
    vocab_size = logits.shape[-1]
    output_counts = _token_counts(metadata.output_token_ids, vocab_size)
    prompt_seen = _token_counts(metadata.prompt_token_ids, vocab_size) > 0
    output_seen = output_counts > 0

    # Repetition: shrink positive logits and push negative ones further down, for any seen token.
    rep = metadata.repetition_penalty.to(logits.dtype).unsqueeze(1).expand_as(logits)
    rep = torch.where(prompt_seen | output_seen, rep, torch.ones_like(rep))
    logits = torch.where(logits > 0, logits / rep, logits * rep)

    freq = metadata.frequency_penalty.to(logits.dtype).unsqueeze(1)
    presence = metadata.presence_penalty.to(logits.dtype).unsqueeze(1)
    return logits - freq * output_counts.to(logits.dtype) - presence * output_seen.to(logits.dtype)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Mask tokens whose probability is below min_p times the row's top probability (in place)."""
    probs = torch.softmax(logits, dim=-1)
    threshold = min_p.unsqueeze(1) * probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill_(probs < threshold, float("-inf"))


def apply_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None
) -> torch.Tensor:
    """Mask tokens outside each row's top-k and top-p sets; None skips that filter.

    top_k 0 disables top-k for a row; ties with the k-th logit are kept. top-p keeps the smallest
    prefix (by descending probability) whose mass reaches top_p, and always the top token.
    """
    vocab_size = logits.shape[-1]
    if top_k is None and top_p is None:
        return logits
    if top_p is None:
        assert top_k is not None
        return _apply_top_k_only(logits, top_k)

    # Ascending sort: the tail to drop is then a prefix, and the last column is the top token.
    logits_sorted, order = logits.sort(dim=-1, descending=False)
    if top_k is not None:
        k = torch.where(top_k > 0, top_k, vocab_size).clamp(max=vocab_size)
        kth = logits_sorted.gather(1, (vocab_size - k).unsqueeze(1))
        logits_sorted.masked_fill_(logits_sorted < kth, float("-inf"))
    probs_sorted = torch.softmax(logits_sorted, dim=-1)
    cum = probs_sorted.cumsum(dim=-1)
    # A token is dropped when the mass at or below it is <= 1 - p, i.e. the mass strictly above it
    # already reaches p.
    drop = cum <= (1.0 - top_p.unsqueeze(1))
    drop[:, -1] = False
    logits_sorted.masked_fill_(drop, float("-inf"))
    return logits_sorted.scatter(1, order, logits_sorted)


def _apply_top_k_only(logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Top-k without a full sort: threshold each row at its k-th largest logit (in place)."""
    vocab_size = logits.shape[-1]
    disabled = top_k <= 0
    k = top_k.masked_fill(disabled, 1).clamp(max=vocab_size)
    # A host sync for max k is cheaper than sorting the whole vocabulary.
    max_k = int(k.max().item())
    top_values = logits.topk(max_k, dim=-1).values
    kth = top_values.gather(1, (k - 1).unsqueeze(1))
    kth.masked_fill_(disabled.unsqueeze(1), float("-inf"))
    return logits.masked_fill_(logits < kth, float("-inf"))


def random_sample(probs: torch.Tensor, generators: dict[int, torch.Generator]) -> torch.Tensor:
    """Sample one token per row by the exponential race argmax(p / q), q ~ Exp(1).

    Seeded rows draw their q from their own generator, so their samples do not depend on the batch.
    """
    q = torch.empty_like(probs)
    if len(generators) != probs.shape[0]:
        q.exponential_()
    for row, generator in generators.items():
        q[row].exponential_(generator=generator)
    return probs.div_(q).argmax(dim=-1)


def _temperature_only(metadata: SamplingMetadata) -> bool:
    """Nothing but temperature (or greedy) per row: no filters, penalties, masks, logprobs or seeds."""
    return (metadata.max_num_logprobs is None and not metadata.banned_token_ids and not metadata.logit_bias
            and not metadata.allowed_token_ids and metadata.no_penalties
            and metadata.no_top_p and metadata.no_top_k and metadata.no_min_p and not metadata.generators)


class Sampler(torch.nn.Module):
    """Samples the next token of every row of a [B, V] logits batch, as vLLM v1 does.

    Holds no state between calls: per-row settings and generators come in the SamplingMetadata. Promises
    one token id per row, and logprobs of the raw logits when any row asked. With `fused` (the backend
    selection's fused_sampler) a batch on a GPU that only asks for temperatures takes one Triton pass
    (Gumbel-max over the raw logits); everything else takes the torch path below. With `greedy_argmax` (the
    selection's switch) argmax(), the plain greedy rows' ids, takes the same pass without noise on a GPU.
    """

    def __init__(self, fused: bool = False, greedy_argmax: bool = False):
        super().__init__()
        self.fused = fused
        self.greedy_argmax = greedy_argmax

    def argmax(self, logits: torch.Tensor) -> torch.Tensor:
        """Each row's argmax, int64 [B] (plain greedy rows: StepSampler's, the decode graphs' greedy head):
        kernels/triton_sampling.greedy_argmax on a GPU for up to its GREEDY_MAX_ROWS rows when switched on (the
        same ids: ties to the lowest id), else torch's."""
        if fused_ops_for(logits, self.greedy_argmax) is not None:
            from meshserve.kernels import triton_sampling

            if triton_sampling.greedy_argmax_fits(logits):
                return triton_sampling.greedy_argmax(logits)
        return logits.argmax(dim=-1)

    def forward(self, logits: torch.Tensor, metadata: SamplingMetadata) -> SamplerOutput:
        if (not metadata.all_greedy and _temperature_only(metadata)
                and fused_ops_for(logits, self.fused) is not None):
            from meshserve.kernels.triton_sampling import sample_gumbel

            # a fresh Philox stream per step, drawn from the (seeded) host generator: no device sync
            seed = int(torch.randint(2**31 - 1, (1,)).item())
            return SamplerOutput(sample_gumbel(logits, metadata.temperature, seed), None, None, None, None)
        logprobs = ranks = top_ids = top_logprobs = None
        need_logprobs = metadata.max_num_logprobs is not None

        # Work on a float32 copy: the caller's tensor stays raw, which is what logprobs are taken from.
        raw_logits = logits
        logits = logits.to(torch.float32, copy=True)
        apply_allowed(logits, metadata.allowed_token_ids)
        apply_banned(logits, metadata.banned_token_ids)
        apply_logit_bias(logits, metadata.logit_bias)
        logits = apply_penalties(logits, metadata)

        if metadata.all_greedy:
            sampled = logits.argmax(dim=-1)
        else:
            # Taken before _sample_random, which scales and masks `logits` in place.
            greedy_ids = None if metadata.all_random else logits.argmax(dim=-1)
            sampled = self._sample_random(logits, metadata)
            if greedy_ids is not None:
                sampled = torch.where(metadata.temperature < _GREEDY_EPS, greedy_ids, sampled)

        if need_logprobs:
            assert metadata.max_num_logprobs is not None
            logprobs, ranks, top_ids, top_logprobs = compute_logprobs(
                raw_logits, sampled, metadata.max_num_logprobs)
        return SamplerOutput(sampled_token_ids=sampled.long(), logprobs=logprobs, ranks=ranks,
                             top_token_ids=top_ids, top_logprobs=top_logprobs)

    @staticmethod
    def _sample_random(logits: torch.Tensor, metadata: SamplingMetadata) -> torch.Tensor:
        """Temperature, min_p, top-k, top-p, then the exponential race; greedy rows' results are junk."""
        temperature = metadata.temperature
        if not metadata.all_random:
            # Greedy rows' temperature is 0; divide them by 1 to keep the row finite.
            temperature = torch.where(temperature < _GREEDY_EPS, torch.ones_like(temperature), temperature)
        logits = logits.div_(temperature.unsqueeze(1))
        if not metadata.no_min_p:
            logits = apply_min_p(logits, metadata.min_p)
        logits = apply_top_k_top_p(
            logits,
            None if metadata.no_top_k else metadata.top_k,
            None if metadata.no_top_p else metadata.top_p,
        )
        probs = torch.softmax(logits, dim=-1)
        return random_sample(probs, metadata.generators)
