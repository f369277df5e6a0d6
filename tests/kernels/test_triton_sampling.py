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
    from meshserve.kernels.triton_sampling import greedy_argmax, sample_gumbel, sample_gumbel_ref

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


@pytest.mark.parametrize("rows,vocab,dtype", [(1, 5000, torch.float32), (3, 4097, torch.float16), (64, 700, torch.float32),
                                              (1, 8, torch.float32)])
def test_greedy_argmax_is_torchs_argmax(rows, vocab, dtype):
    # chunk_plan splits a few rows into chunks of whole BLOCKs: 5,000 ids at one row are three chunks
    logits = _logits(rows, vocab, dtype, seed=rows)
    assert greedy_argmax(logits).tolist() == logits.argmax(-1).tolist()


def test_greedy_argmax_ties_masks_and_nan():
    logits = torch.zeros(5, 5000, device=DEVICE)
    logits[0, [100, 4100]] = 1.0  # equal maxima in chunks 0 and 2: the lowest id
    logits[1, [2049, 2050]] = 3.0  # equal maxima side by side in one chunk (one lane each)
    logits[2, :] = float("-inf")  # nothing allowed: id 0, as torch's argmax
    logits[3, :] = float("-inf")
    logits[3, 4999] = -3.0  # the only allowed id, the row's last
    logits[4, 3000] = float("nan")  # NaN is the largest, as in torch's argmax
    logits[4, 10] = 5.0
    assert greedy_argmax(logits).tolist() == logits.argmax(-1).tolist() == [100, 2049, 0, 4999, 3000]
    assert greedy_argmax(logits[:0]).shape == (0,)


def test_greedy_argmax_takes_up_to_64_rows():
    from meshserve.kernels.triton_sampling import GREEDY_MAX_ROWS, greedy_argmax_fits

    assert GREEDY_MAX_ROWS == 64
    assert greedy_argmax_fits(torch.zeros(64, 10)) and not greedy_argmax_fits(torch.zeros(65, 10))
    assert not greedy_argmax_fits(torch.zeros(10))


@pytest.mark.gpu
@pytest.mark.skipif(not _HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("vocab", [128256, 151936])
def test_greedy_argmax_bf16_on_gpu(vocab):
    # bf16 logits of N(0, 4): equal maxima within a row are common at 8 bits of mantissa (the lowest id wins)
    for rows in (1, 4, 64):
        logits = _logits(rows, vocab, torch.bfloat16, seed=rows)
        assert torch.equal(greedy_argmax(logits), logits.argmax(-1))
    # and inside a CUDA graph, as the decode graphs' greedy head replays it
    logits = _logits(2, vocab, torch.bfloat16, seed=7)
    greedy_argmax(logits)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ids = greedy_argmax(logits)
    logits.copy_(_logits(2, vocab, torch.bfloat16, seed=8))
    graph.replay()
    assert torch.equal(ids, logits.argmax(-1))


def test_the_kernels_compile_for_sm90():
    from tests.kernels.sm90 import COMPILE_SM90_PRELUDE, assert_compiles_for_sm90

    assert_compiles_for_sm90(COMPILE_SM90_PRELUDE + """
from meshserve.kernels.triton_sampling import _sample_gumbel_kernel, _gumbel_reduce_kernel
for dtype in ("*bf16", "*fp16"):
    sig = {"logits_ptr": dtype, "temp_ptr": "*fp32", "best_ptr": "*fp32", "idx_ptr": "*i32"}
    for greedy in (True, False):
        compile_sm90(_sample_gumbel_kernel, sig, {"GREEDY_EPS_C": 1e-5, "BLOCK": 2048, "FAST_LOG": not greedy,
                                                  "GREEDY": greedy}, 8, 3)
compile_sm90(_gumbel_reduce_kernel, {"best_ptr": "*fp32", "idx_ptr": "*i32", "out_ptr": "*i64"},
             {"MAX_CHUNKS": 128}, 1, 3)
print("compiled")
""")
