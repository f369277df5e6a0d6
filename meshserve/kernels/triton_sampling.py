"""Fused sampling for the common case (temperature only): one pass over the logits, no fp32 copies.

sample_gumbel(logits, temperature, seed) draws, per row, argmax(logits / T + Gumbel noise), which is a
sample from softmax(logits / T) (the Gumbel-max trick; the torch sampler's exponential race draws from the
same distribution). Rows with T below the greedy threshold take the plain argmax. The Triton kernel reads
each row once in its own dtype; the unfused path (an fp32 copy, a division, a softmax, noise, a division
and an argmax: about six passes over [B, V] fp32) costs ~1.4 ms per step at batch 256 over 152k ids.

A row is split into chunks (chunk_plan) so that a small batch still fills the GPU, and a second small kernel
takes each row's best chunk. One program per row took 110 us at batch 16 and 193 us at batch 256 on an H200
(Qwen3-0.6B, 152k ids; tools/profile_kernels.py, 2026-12-02): the noise, not the bytes, was the cost (tl.rand
runs a Philox round for each number, tl.rand4x keeps all four; tl.log2 is libdevice's exact log2f, the GPU path
takes lg2.approx). Now 4.2 us at 1 row, 9.6 at 16, 75 at 256 (tools/bench_sampling.py; BENCHMARKS.md).

sample_gumbel_ref is the torch reference with the same signature: the same distribution, other noise.
Ties (equal scores) go to the lowest token id in both.

greedy_argmax(logits) is the same two launches with no noise and no temperatures (GREEDY): an all-greedy step's
token ids (the Sampler's argmax, up to GREEDY_MAX_ROWS rows), equal to torch's argmax.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

GREEDY_EPS = 1e-5  # temperatures below this are greedy (the Sampler's threshold)


def sample_gumbel_ref(logits: torch.Tensor, temperature: torch.Tensor, seed: int) -> torch.Tensor:
    """logits [B, V]; temperature [B] float32 -> sampled ids [B] int64."""
    gen = torch.Generator(device=logits.device).manual_seed(seed)
    x = logits.float()
    greedy = temperature < GREEDY_EPS
    t = torch.where(greedy, torch.ones_like(temperature), temperature).unsqueeze(1)
    u = torch.rand(x.shape, generator=gen, device=x.device).clamp_(min=1e-20)
    gumbel = -torch.log(-torch.log(u))
    scores = torch.where(greedy.unsqueeze(1), x, x / t + gumbel)
    return scores.argmax(dim=-1)


# the seed changes every step and the chunk width with the batch: unspecialized, or each value that is 1 or a
# multiple of 16 compiles its own copy (a cold Triton cache then pays ~0.5 s inside serving)
@triton.jit(do_not_specialize=["seed", "chunk_cols", "num_chunks"])
def _sample_gumbel_kernel(logits_ptr, temp_ptr, best_ptr, idx_ptr, seed, vocab, stride_row, chunk_cols, num_chunks,
                          GREEDY_EPS_C: tl.constexpr, BLOCK: tl.constexpr, FAST_LOG: tl.constexpr,
                          GREEDY: tl.constexpr = False):
    """One (row, chunk of chunk_cols ids) per program: the chunk's best score and its id into best / idx
    [rows, num_chunks]. GREEDY: every row greedy (greedy_argmax): no temperatures read, no noise drawn."""
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    QUARTER: tl.constexpr = BLOCK // 4
    best = tl.full([QUARTER], float("-inf"), dtype=tl.float32)
    best_idx = tl.zeros([QUARTER], dtype=tl.int32)
    base = logits_ptr + row.to(tl.int64) * stride_row
    lanes = tl.arange(0, QUARTER)
    lo = chunk * chunk_cols
    hi = tl.minimum(lo + chunk_cols, vocab)
    if GREEDY:
        inv_t = 1.0
        noise_scale = 0.0
    else:
        t = tl.load(temp_ptr + row)
        greedy = t < GREEDY_EPS_C
        # log2(e) / T: sampled scores in base 2 (_fold_quarter); greedy rows compare the logits themselves
        inv_t = tl.where(greedy, 1.0, 1.4426950408889634 / tl.where(greedy, 1.0, t))
        noise_scale = tl.where(greedy, 0.0, 1.0)
    # Philox makes four numbers per offset (tl.rand keeps one of them, and Philox was most of this kernel's
    # time): a block's four quarters share its offsets, and a row's offsets are spaced by its padded width, so
    # every (row, id) has its own (offset, quarter)
    row_offset = row * (tl.cdiv(vocab, BLOCK) * QUARTER)
    for start in range(lo, hi, BLOCK):
        if GREEDY:  # no noise: the quarters' u are never read
            u0, u1, u2, u3 = lanes, lanes, lanes, lanes
        else:
            u0, u1, u2, u3 = tl.rand4x(seed, row_offset + start // 4 + lanes)
        # quarters in id order, compared strictly: of equal scores in a lane the lowest id stays
        cols = start + lanes
        best, best_idx = _fold_quarter(base, cols, hi, u0, inv_t, noise_scale, best, best_idx, FAST_LOG, GREEDY)
        best, best_idx = _fold_quarter(base, cols + QUARTER, hi, u1, inv_t, noise_scale, best, best_idx, FAST_LOG,
                                       GREEDY)
        best, best_idx = _fold_quarter(base, cols + 2 * QUARTER, hi, u2, inv_t, noise_scale, best, best_idx,
                                       FAST_LOG, GREEDY)
        best, best_idx = _fold_quarter(base, cols + 3 * QUARTER, hi, u3, inv_t, noise_scale, best, best_idx,
                                       FAST_LOG, GREEDY)
    top = tl.max(best, 0)
    # lowest id among the lanes holding the maximum (a chunk of -inf scores gives id 0: see the reduce)
    tl.store(best_ptr + row * num_chunks + chunk, top)
    tl.store(idx_ptr + row * num_chunks + chunk, tl.min(tl.where(best == top, best_idx, vocab), 0))


@triton.jit
def _fold_quarter(base, cols, hi, u, inv_t, noise_scale, best, best_idx, FAST_LOG: tl.constexpr,
                  GREEDY: tl.constexpr):
    """Scores of ids cols (below hi) folded into the lanes' running best. GREEDY: the logits themselves, NaN
    counted as the largest, as in torch's argmax."""
    x = tl.load(base + cols, mask=cols < hi, other=float("-inf")).to(tl.float32)
    if GREEDY:
        score = tl.where(x != x, float("inf"), x)
    else:
        # base 2: log2(e) * (x / T - ln(-ln u)) less a constant, so the same argmax without the ln(2) scalings
        u = tl.maximum(u, 1e-20)
        if FAST_LOG:  # the GPU's lg2.approx (tl.log2 is libdevice's exact log2f, ~20 instructions, twice an id)
            noise = libdevice.fast_log2f(-libdevice.fast_log2f(u))
        else:  # the interpreter
            noise = tl.log2(-tl.log2(u))
        score = x * inv_t - noise_scale * noise
    better = score > best
    return tl.where(better, score, best), tl.where(better, cols, best_idx)


@triton.jit(do_not_specialize=["num_chunks"])
def _gumbel_reduce_kernel(best_ptr, idx_ptr, out_ptr, vocab, num_chunks, MAX_CHUNKS: tl.constexpr):
    """Per row: the id of its best chunk. Chunks hold ascending ids, so the lowest id among equal best scores
    is the row's answer, as one pass over the row would give (an all -inf row: id 0)."""
    row = tl.program_id(0)
    c = tl.arange(0, MAX_CHUNKS)
    mask = c < num_chunks
    best = tl.load(best_ptr + row * num_chunks + c, mask=mask, other=float("-inf"))
    idx = tl.load(idx_ptr + row * num_chunks + c, mask=mask, other=vocab)
    top = tl.max(best, 0)
    idx = tl.min(tl.where((best == top) & mask, idx, vocab), 0)
    tl.store(out_ptr + row, tl.minimum(idx, vocab - 1).to(tl.int64))


BLOCK = 2048
MAX_CHUNKS = 128  # the reduce's width: one compile for every chunk count
# greedy_argmax's rows at most: where torch's argmax, a block a row, leaves most SMs idle (one row: 29-37 us on an
# H200); from ~132 rows it fills the GPU as well (the crossover is not measured: tools/bench_sampling.py --greedy)
GREEDY_MAX_ROWS = 64
_PROGRAMS_PER_SM = 4


def chunk_plan(num_rows: int, vocab: int, num_sms: int) -> tuple[int, int]:
    """(chunk width in ids, chunk count) of a batch: enough (row, chunk) programs to fill the GPU
    (_PROGRAMS_PER_SM per SM) when the rows alone do not (batch 16 was 16 programs on 132 SMs: 110 us), whole
    BLOCKs per chunk, at most MAX_CHUNKS."""
    blocks = -(-vocab // BLOCK)
    want = min(blocks, MAX_CHUNKS, max(1, -(-_PROGRAMS_PER_SM * num_sms // max(num_rows, 1))))
    chunk_cols = -(-blocks // want) * BLOCK
    return chunk_cols, -(-vocab // chunk_cols)


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 132  # the interpreter: an H100/H200's count, so CPU tests split rows as the GPU does
    return torch.cuda.get_device_properties(device).multi_processor_count


def sample_gumbel(logits: torch.Tensor, temperature: torch.Tensor, seed: int) -> torch.Tensor:
    """Same as sample_gumbel_ref (the same distribution; the noise comes from Triton's Philox)."""
    return _chunked_argmax(logits, temperature, int(seed))


def greedy_argmax_fits(logits: torch.Tensor) -> bool:
    """Whether greedy_argmax serves these logits: [rows, V] with rows <= GREEDY_MAX_ROWS."""
    return logits.dim() == 2 and logits.shape[0] <= GREEDY_MAX_ROWS


def greedy_argmax(logits: torch.Tensor) -> torch.Tensor:
    """logits.argmax(dim=-1) of [rows, V] logits (int64 [rows]; ties to the lowest id, NaN the largest): the
    sampler's chunked pass without noise, so a few rows still spread over the GPU where torch's argmax reduces
    a row in one block (one 128k-id row: 29-37 us on an H200 inside the decode step, BENCHMARKS.md)."""
    return _chunked_argmax(logits, None, 0)


def _chunked_argmax(logits: torch.Tensor, temperature: torch.Tensor | None, seed: int) -> torch.Tensor:
    """Each row's best id over its chunks (chunk_plan), then the best chunk's: scores with noise by temperature,
    or (temperature None: GREEDY) the logits themselves."""
    num_rows, vocab = logits.shape
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    out = torch.empty(num_rows, dtype=torch.int64, device=logits.device)
    if num_rows:
        chunk_cols, num_chunks = chunk_plan(num_rows, vocab, _num_sms(logits.device))
        best = torch.empty(num_rows, num_chunks, dtype=torch.float32, device=logits.device)
        idx = torch.empty(num_rows, num_chunks, dtype=torch.int32, device=logits.device)
        greedy = temperature is None
        _sample_gumbel_kernel[(num_rows, num_chunks)](logits, best if greedy else temperature, best, idx, seed,
                                                      vocab, logits.stride(0), chunk_cols, num_chunks,
                                                      GREEDY_EPS_C=GREEDY_EPS, BLOCK=BLOCK,
                                                      FAST_LOG=logits.device.type == "cuda" and not greedy,
                                                      GREEDY=greedy, num_warps=8)
        _gumbel_reduce_kernel[(num_rows,)](best, idx, out, vocab, num_chunks, MAX_CHUNKS=MAX_CHUNKS, num_warps=1)
    return out
