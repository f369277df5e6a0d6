"""The fused Gumbel-max sampler vs its torch reference: greedy rows exact, sampled rows from softmax(x / T).

Without CUDA the kernel runs in the Triton CPU interpreter. The distribution check draws many samples of
a small vocabulary and compares frequencies with softmax(logits / T): with N draws a frequency's standard
error is <= 0.5 / sqrt(N), so the tolerance of 5 standard errors fails a wrong distribution (off by a
temperature factor, or missing noise) by far while a right one passes all but ~1e-6 of the time.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

_HAS_CUDA = torch.cuda.is_available()

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")

if importlib.util.find_spec("triton") is not None:
    from meshserve.kernels.triton_sampling import sample_gumbel, sample_gumbel_ref

DEVICE = "cuda" if _HAS_CUDA else "cpu"


def _logits(rows: int, vocab: int, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (2 * torch.randn(rows, vocab, generator=g)).to(dtype).to(DEVICE)


@pytest.mark.parametrize("fn", ["kernel", "ref"])
def test_greedy_rows_take_the_argmax(fn):
    logits = _logits(5, 3000)
    temps = torch.zeros(5, device=DEVICE)
    sample = sample_gumbel if fn == "kernel" else sample_gumbel_ref
    assert sample(logits, temps, seed=3).tolist() == logits.argmax(-1).tolist()


@pytest.mark.parametrize("fn", ["kernel", "ref"])
@pytest.mark.parametrize("temperature", [0.6] if not _HAS_CUDA else [0.6, 1.5])
def test_samples_follow_softmax_over_temperature(fn, temperature):
    # the interpreter runs ~5 ms per program: fewer draws there (the tolerance, 0.125 at 400 draws, is still
    # well below the 0.2 by which the top id's probability moves between T = 0.6 and T = 1)
    draws = 4000 if _HAS_CUDA else 400
    row = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -0.5, 0.25, -2.0], device=DEVICE)
    vocab = row.shape[0]
    logits = row.unsqueeze(0).expand(draws, vocab).contiguous()  # every row an independent draw
    temps = torch.full((draws,), temperature, device=DEVICE)
    sample = sample_gumbel if fn == "kernel" else sample_gumbel_ref
    ids = sample(logits, temps, seed=11)
    freq = torch.bincount(ids.cpu(), minlength=vocab).double() / draws
    expected = torch.softmax(row.double().cpu() / temperature, -1)
    assert (freq - expected).abs().max() < 5 * 0.5 / draws**0.5
    # and a different seed gives different draws (64 of them: equal by chance with a probability < 0.8^64)
    assert not torch.equal(sample(logits[:64], temps[:64], seed=12), ids[:64])


def test_mixed_greedy_and_sampled_rows_and_masked_ids():
    logits = _logits(4, 5000)
    logits[2, :] = float("-inf")
    logits[2, 77] = 0.0  # only one allowed id
    temps = torch.tensor([0.0, 1.0, 0.8, 0.0], device=DEVICE)
    ids = sample_gumbel(logits, temps, seed=5).tolist()
    assert ids[0] == logits[0].argmax().item() and ids[3] == logits[3].argmax().item()
    assert ids[2] == 77
    assert 0 <= ids[1] < 5000


@pytest.mark.gpu
@pytest.mark.skipif(not _HAS_CUDA, reason="needs a CUDA GPU")
def test_bf16_vocab_152k_batch_256_on_gpu():
    logits = _logits(256, 151936, torch.bfloat16)
    temps = torch.cat([torch.zeros(8), torch.full((248,), 0.6)]).to(DEVICE)
    ids = sample_gumbel(logits, temps, seed=1)
    assert ids[:8].tolist() == logits[:8].float().argmax(-1).tolist()
    # sampled ids sit in the top of their rows (T = 0.6 over N(0, 4) logits: the mass is in the top few %)
    ranks = (logits[8:].float() > logits[8:].float().gather(1, ids[8:, None])).sum(-1)
    assert ranks.float().median().item() < 0.05 * 151936


def test_chunk_plan_covers_the_row_and_fills_the_gpu():
    from meshserve.kernels.triton_sampling import BLOCK, MAX_CHUNKS, chunk_plan

    for rows in (1, 3, 16, 100, 256, 1024):
        for vocab in (8, 5000, 151936, 262144 * 2):
            width, chunks = chunk_plan(rows, vocab, 132)
            assert width % BLOCK == 0 and 1 <= chunks <= MAX_CHUNKS
            assert (chunks - 1) * width < vocab <= chunks * width  # every id in one chunk, no empty chunk
            blocks = -(-vocab // BLOCK)
            # at least half the programs the GPU wants (4 per SM; chunks are whole blocks), unless the row has
            # fewer blocks or the cap binds
            assert 2 * rows * chunks >= min(4 * 132, rows * blocks, rows * MAX_CHUNKS)


def test_ties_across_chunks_go_to_the_lowest_id():
    # 5,000 ids in three chunks at 4 rows (chunk_plan): greedy rows, so scores are the logits themselves
    logits = torch.zeros(4, 5000, device=DEVICE)
    logits[0, [100, 4100]] = 1.0  # equal maxima in chunks 0 and 2
    logits[1, :] = float("-inf")
    logits[1, 4999] = -3.0  # the only allowed id, the row's last
    logits[2, :] = float("-inf")  # nothing allowed: id 0, as the argmax of a single pass gives
    logits[3, [2048, 4095]] = 2.0  # both in chunk 1
    ids = sample_gumbel(logits, torch.zeros(4, device=DEVICE), seed=2).tolist()
    assert ids == [100, 4999, 0, 2048]
