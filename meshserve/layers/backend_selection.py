"""The one place that chooses kernels: decided once per model runner from the EngineConfig, handed down.

`select_kernels(config)` reads the device, enforce_eager, the model dtype and the cache dtype and returns a
KernelSelection; `bind_kernels(model, selection)` hands it to every layer that has a choice to make. The
runner reads the rest (CUDA graphs, KV cache dtype) and gives the Sampler its switch. Nothing else reads the
environment or decides a backend; layers only check what a call alone can know (a tensor's shape or dtype).

What is chosen, by default:
  on a CUDA device   Triton attention, the fused Triton ops (RMSNorm+residual, rotary, SiLU-and-mul), the
                     fused q/k-norm + rotary + KV-write prologue, the batch-1 GEMV, the one-pass sampler, and
                     decode and mixed-step CUDA graphs unless enforce_eager
  elsewhere          the plain torch path throughout (the reference)

Overrides (environment, read only here, for debugging and references):
  MESHSERVE_ATTENTION_BACKEND=torch|triton  the attention backend. torch on a GPU is the reference attention:
                                            no CUDA graphs and no fused prologue (which writes the cache
                                            through the Triton backend)
  MESHSERVE_DISABLE_FUSED_OPS=1             no fused Triton op: norm, rotary, SiLU, prologue, GEMV, sampler
  MESHSERVE_NORM_GEMV=1                     fold the residual add + RMSNorm into the QKV and gate/up GEMVs
                                            (opt-in until measured on the H200: issue 29)
  MESHSERVE_NORM_ROW_GEMV=0                 batch 1, rows of <= 2,048 features: the residual add + RMSNorm and
                                            the next GEMV in one launch (kernels/triton_norm_row_gemv.py), the
                                            QKV's and an MoE block's router's (models/moe.py); on by default
                                            (H200 W1 Qwen3-30B-A3B 353.5 -> 362.2 tok/s, 2026-12-04), 0 off
  MESHSERVE_GREEDY_ARGMAX=0                 all-greedy steps of up to 64 rows take the token ids from the
                                            sampler's chunked Triton pass without noise (kernels/triton_sampling.
                                            greedy_argmax) by default, not torch's argmax, which reduces a row in
                                            one block (one 128k-id row 29-37 us of an H200's decode step; W1 on
                                            an H200 2026-12-06: 8B 233.2 -> 234.9 tok/s, Qwen3-0.6B 1,104.7 ->
                                            1,113.6); 0: torch's argmax
  MESHSERVE_GEMV_ACT_OUT=0                  batch 1: the gate/up GEMV writes silu(gate) * up from its epilogue
                                            (kernels/triton_gemv.gemv act_out: no SiLU launch, no gate/up row
                                            in memory) wherever the separate SiLU kernel would run; on by
                                            default, 0 off
  MESHSERVE_FP8_V_LAYOUT=rows              fp8 KV caches hold each block's V in K's order [block_size, Hkv, D]
                                            instead of the default transposed [Hkv, D, block_size] (tokens
                                            contiguous: the P.V dot's operand order; kernels/kv_layout.py; H200
                                            W2 8B fp8 + fp8 KV 11.86 -> 11.54 s, Qwen3-0.6B 5.85 -> 5.54 s)
  MESHSERVE_TP_FUSED_NORM=1|pull|push       tensor parallel: each row-parallel projection's all-reduce, the
                                            residual add and the next RMSNorm in one kernel over symmetric
                                            memory (layers/all_reduce_norm.py); 1 = pull (read the peers'
                                            buffers), push (write into them); opt-in until measured (issue 21)
  MESHSERVE_SKINNY_GEMV=1                   2-16 rows of 16-bit activations (a speculative verify step at small
                                            batch) through the Triton skinny GEMV (kernels/triton_skinny_gemv.py)
                                            instead of cuBLAS; opt-in until measured on the H200 (issue 22)
  MESHSERVE_NORM_FOLD=1|0                   batch 1: both RMSNorms into the GEMVs around them (layers/norm_fold.py);
                                            by default on where the batch-1 step is launch-bound (the PDL auto
                                            rule: H200 Qwen3-0.6B decode graph -1.3% and -1.5% on 2026-12-02; it
                                            cost the 8B 3.2%), 0 off, 1 on for any model
  MESHSERVE_DECODE_LAYER=1|phases[:P,W[,V]] batch 1: each decoder layer of a Llama-family model (dense: 16-bit,
                                            fp8 with a scale a row or group-wise INT4 weights; sparse: 16-bit,
                                            softmax top-k routing) in one persistent launch, grid barriers
                                            between its phases (layers/decode_layer.py,
                                            kernels/triton_decode_layer.py); phases: one launch a phase (the A/B
                                            of the barriers); P programs of W warps an SM (default 1,8), V 16-bit
                                            weight values a thread streams a trip (default 32: the bytes in
                                            flight, one program an SM); opt-in until measured (issues 29, 23,
                                            20)
  MESHSERVE_PDL=1|auto                      programmatic dependent launch of the decode-path Triton kernels on
                                            sm_90+ (GEMV, norm, SiLU, prologue, KV write, decode attention:
                                            kernels/pdl.py); auto (the default): only for models whose hidden
                                            size is at most 2,048 (pdl.auto_enables; H200 Qwen3-0.6B W1 +26% on
                                            2026-11-30, -28% on 2026-12-01, +25% twice on 2026-12-02; MoE models
                                            since 2026-12-03: Qwen3-30B-A3B W1 +10.7%, DeepSeek-V2-Lite +3.1%);
                                            larger dense 16-bit models on one GPU in one-row decode steps, without the
                                            partial-row preload (pdl.auto_policy: Llama-3.1-8B W1 +3.7%,
                                            2026-12-04); 0 off, 1 on for any model (issues 29, 23)
  MESHSERVE_PDL_TRIGGER=early|late          PDL variants under A/B (kernels/pdl.py, tools/pdl_device.sh): where
  MESHSERVE_PDL_ONE_WAVE=1                  the next kernel may launch; PDL only for one-wave grids; when the
  MESHSERVE_PDL_PRELOAD=all|none|row        GEMV preloads weights before the wait
  MESHSERVE_PDL_STEPS=decode|all            PDL in decode-only steps (default: steps carrying prompt tokens ran
                                            ~15% slower with it, W3 Qwen3-0.6B 2026-12-02) or in every step
  MESHSERVE_PDL_MOE=preload|launch|0       under PDL, the MoE layer's routing and MoE GEMV launches with PDL,
                                            the down GEMV preloading its experts' tiles (preload, the default),
                                            without the preload (launch) or plain (0; kernels/pdl.py, issue 23)
  MESHSERVE_GEMV_PREFETCH=dense,moe        which batch-1 GEMV loops load the next K tile of weights before a
                                            trip's math (kernels/triton_gemv.gemv_prefetch; same bits): default
                                            dense (H200 W1 Llama-3.1-8B 214.3 -> 222.7 tok/s, 2026-12-03); moe
                                            (the MoE GEMV's gate_up: Qwen3-30B-A3B -0.8%) opt-in; all; 0 or
                                            none: off
  MESHSERVE_DECODE_CONTEXT_BOUNDS=256,1024  small batches' decode graphs also for these context bounds, with
                                            fewer attention splits; default 256,1024 for models of hidden size
                                            <= 2,048 (pdl.auto_enables' rule) without MLA (H200 W1 Qwen3-0.6B
                                            decode graph 0.904 -> 0.877 ms, 2026-12-02; Qwen3-30B-A3B W1 348.7 ->
                                            351.0 tok/s, 2026-12-03), none for larger ones; 0 or none: off
  MESHSERVE_DECODE_SAMPLE_GRAPHS=N|0       decode graphs of batch sizes up to N (default 8) also captured with the
                                            LM head and the argmax after the forward: an all-greedy decode step
                                            of exactly such a size replays one graph for its tokens instead of
                                            launching the head and its index work from Python (engine/cuda_graph.py;
                                            W1 Qwen3-0.6B launched its next graph after the last one ended,
                                            2026-12-02); 0 off
  MESHSERVE_PDL_HEAD=0                      the greedy head of those graphs (LM head GEMV) launched without PDL:
                                            an A/B of the 12-25 us the sampled graph takes above the plain graph
                                            plus the head outside it (H200, 2026-12-02); default with the switch
  MESHSERVE_DECODE_REDUCE=kernel|inline     decode attention's split-K partials combined by a reduce launch
                                            (kernel, the default) or by each group's last split (inline:
                                            kernels/triton_attention.py, one launch fewer a layer; opt-in until
                                            measured on the H200: issue 29)
  MESHSERVE_DECODE_TILE=auto|grid|legacy    decode attention's tile: grid: launches of at least two (sequence,
                                            KV head) programs per SM use 64-token tiles, 2 warps and 2 stages
                                            (kernels/triton_attention.decode_tile; H200 kernel time at batch
                                            256: bf16 -3.7%, fp8 cache -19%); legacy: 128 tokens, 4 warps, 3
                                            stages for every launch; auto (the default): grid over an fp8 cache,
                                            legacy over a 16-bit one (H200 W2 Qwen3-0.6B, 2026-12-03: fp8 cache
                                            -5% with grid, bf16 +2%)
  MESHSERVE_DECODE_GRID_TILE=128,4,5        the grid launches' tile (BLOCK_N,num_warps,num_stages) instead of
                                            64,2,2, for A/Bs (H200, batch 256 x 800, one split, fp8 cache:
                                            128,4,5 180.8 us against 64,2,2 ~207; not measured end to end yet)
  MESHSERVE_DECODE_FP8_PATH=words|convert|auto  how the decode attention kernel reads an fp8 (e4m3) KV cache:
                                            words (the default: 32-bit words widened to fp16 before the dot's
                                            shared-memory trip, kernels/triton_e4m3_words.py; the plain and
                                            fused-prologue decode launches; H200 W2 with V transposed, 2026-12-04,
                                            two processes each: Llama-3.1-8B fp8 + fp8 KV 11.23 / 11.35 s against
                                            11.52 / 11.48 with convert, Qwen3-0.6B fp8 KV 5.15 / 5.38 against
                                            6.04 / 5.86), convert (Triton converts after its shared-memory load)
                                            or auto (words with the one tile, convert with the grid tile)
  MESHSERVE_DECODE_SPLIT_TOKENS=N           the decode split heuristic's shortest KV split (a power of two;
                                            default 256; the tile's 128 tokens bound it from below): small
                                            batches' short contexts in more, shorter splits (H100 2026-12-06,
                                            128: W1 Qwen3-30B-A3B +0.9%, Qwen3-0.6B +1.0%, Llama-3.1-8B -1.7%)
  MESHSERVE_DECODE_MIN_SPLITS=1|2|4|8       the least KV splits of a context of as many 128-token tiles or more
                                            where the batch leaves SMs idle (default 2: the short-context
                                            graph's one split, whose prologue runs apart, becomes two; 1: the
                                            rule before)
  MESHSERVE_DECODE_BALANCED=N               decode grids of >= 2 (sequence, KV head) programs an SM (any cache,
                                            no sliding window) through the balanced kernel at the grid tile: N
                                            programs an SM over all KV heads, one wave, each streaming an equal
                                            share of the batch's KV tiles (kernels/triton_decode_balanced.py;
                                            W2's contexts left the split kernel's 2.6 waves uneven); 0: the split
                                            kernel; unset, on Hopper: 6 over an fp8 cache, 4 over a 16-bit one
                                            (elsewhere 0 until measured; H200 W2, two processes each:
                                            Llama-3.1-8B fp8 + fp8 KV 11.46 -> 11.00 s, bf16 13.99 -> 13.59 s;
                                            Qwen3-0.6B bf16 5.67 -> 5.44 s, fp8 KV within its noise, +1%)
  MESHSERVE_DECODE_FUSED_PROLOGUE=0|1|split decode-only steps: the fused prologue (q/k norm, rotary, K/V write)
                                            inside the decode attention launch (kernels/triton_decode_fused.py,
                                            one launch fewer a layer; with the fused prologue only); split (the
                                            default): only launches with more than one KV split (small batch,
                                            long context; H200: W1 +0.9% Qwen3-0.6B, +1.5% Llama-3.1-8B, W2
                                            unchanged); 1: every decode launch (W1 Qwen's wall +1.8% and W2
                                            -4.7%: one-split launches pay the prologue per program); 0: off
  MESHSERVE_PREFILL_TILE_LEGACY=1           prompt rows' attention (prefill and unified kernels) with the launch
                                            before 2026-12-01 (grid, every tile masked, 64 keys) instead of the
                                            timed default (kernels/attention_tile_config.py: persistent, diagonal
                                            masks; 2.1-2.3x on W3's mixed steps); MESHSERVE_UNIFIED_TILE=<name>
                                            picks one bench variant
  MESHSERVE_MLA_PREFILL_REF=1               MLA prefill chunks one sequence at a time (mla_prefill_ref) even on
                                            the Triton path: the A/B baseline of the batched prefill
  MESHSERVE_MLA_LEGACY=1                    MLA decode as before 2026-11-30: unfused norm + rotary + latent
                                            write (~20 kernels a layer), absorbed matmuls through transposed
                                            copies, the generic split rule (the A/B baseline of the new path)
  MESHSERVE_MLA_BALANCED=1|0                MLA decode through the balanced kernel (kernels/triton_mla_balanced.py:
                                            equal work per program whatever the context lengths) always (1) or
                                            never (0, the split kernel); default by batch size: balanced from 64
                                            rows (kernels/mla_decode_choice.py, measured tools/bench_mla_decode.py)
  MESHSERVE_MLA_PREFETCH=1                  MLA decode kernels with the tile loop that loads a tile ahead in
                                            registers (kernels/triton_mla_prefetch.py: the pipeliner gives the
                                            plain loop one buffer); opt-in until measured (tools/bench_mla_decode.py)
  MESHSERVE_MLA_TRANSPOSED=1                MLA decode kernels with the transposed tile loop (kernels/
                                            triton_mla_transposed.py: the KV tile as the dots' M side, wgmma from
                                            shared memory, BLOCK_N 64); over PREFETCH; opt-in until measured
  MESHSERVE_MLA_DECODE_KERNEL=auto|default|pipelined  the MLA decode kernels' tile loop: pipelined reads
                                            the block ids a tile ahead, so Triton's pipeliner keeps num_stages - 1
                                            latent tiles in flight (kernels/triton_mla_pipelined.py), default the
                                            plain loop; auto (default) pipelined in the balanced kernel (from 64
                                            rows: 1.18-1.23x the kernel at batch 96-256 on the H200, 2026-12-02),
                                            plain in the split kernel (batch 1 not measured pipelined)
  MESHSERVE_MLA_DECODE_TILE=32,8,2          the MLA decode kernel's BLOCK_N, num_warps, num_stages (default:
                                            kernels/triton_mla._decode_config, the balanced kernel (32, 4, 2);
                                            pipelined: triton_mla_pipelined.PIPELINED_TILE (32, 4, 3))
  MESHSERVE_MOE_LEGACY=1                    the first Triton MoE (torch routing and align, pair GEMV, first tile
                                            configs) instead of the default one-launch routing, MoE GEMV (one
                                            token) and tuned configs (kernels/moe.py; 1.4-2.3x per layer on the
                                            H200, issues 23/24)
  MESHSERVE_MOE_CONFIGS=tuned|stream|legacy the grouped MoE GEMM's tile table (kernels/moe_configs.py); stream:
                                            the weight-streaming tiles for 3-24 rows per expert (BLOCK_M 64,
                                            wgmma, 4 stages); default tuned until stream is measured
  MESHSERVE_MOE_FUSE_SHARED=1|0|N           DeepSeek's shared experts as S more experts of the routed ones'
                                            launches at every batch (1) or at batches of up to N tokens
                                            (kernels/moe.folds_shared_mlp; the MoE GEMV folds them at one token
                                            regardless); 16-bit experts, no expert parallelism; off: no gain on
                                            the H200 (2026-12-02, tools/bench_moe.py --paths new,fold; issue 24)
  MESHSERVE_MOE_ROUTE_ALIGN=chain|fused    a softmax top-k MoE's routing, load count and align for the grouped
                                            GEMM at decode (<= 512 tokens): chain (the routing launch, then the
                                            align's zero + count + plan + scatter) or fused (one launch:
                                            kernels/triton_moe_route_align.py; H200 2026-12-02: 17.0 -> 8.4 us a
                                            layer at 256 tokens, W2 Qwen3-30B-A3B 1.019x); default fused (its GPU
                                            tests passed on the H200, 2026-12-02)
  MESHSERVE_MOE_ROUTER_FUSED=1              a softmax top-k MoE layer's router GEMV and routing in one launch at
                                            batch 1 (kernels/triton_moe_router_topk.py; the GEMV's last program
                                            routes); off until measured on the H200
  MESHSERVE_FP8_GEMV=cvt|half|local|words|scaled_mm  the batch-1 fp8-weight projection
                                            (kernels/triton_fp8_gemv.py; half: fp16 products of x scaled per
                                            step; local: per 8 features; words: per weight word, the loop
                                            rotated, the first weights before the PDL wait; scaled_mm:
                                            torch._scaled_mm, the activation quantized per token); default words (H200, 2026-12-04, W1 8B: 361.7 tok/s with
                                            PDL in one-row steps, half 356.9; without PDL 337.8 / 338.3);
                                            MESHSERVE_FP8_WORDS_TILE=block_n,block_k,warps: the words tile
                                            for every shape (A/B; default by shape)
  MESHSERVE_FP8_GEMM=scaled_mm|triton|auto   fp8-weight projections of more than one row (per-token activation
                                            scales): torch._scaled_mm, the Triton rowwise GEMM
                                            (kernels/triton_decode_gemm.py: tiles by M, K split while the tiles
                                            fill less than a wave) or auto (the default): Triton up to 16 rows,
                                            _scaled_mm above (H200 2026-12-06, the 8B's fp8 decode by batch:
                                            2 rows 398 -> 547 tok/s, 4: 791 -> 1,094, 8: 1,638 -> 2,155, 16:
                                            3,190 -> 4,183; 1 and 32 rows unchanged)
  MESHSERVE_DECODE_GEMM=1                   16-bit projections and LM head of 2-512 rows (decode steps) through
                                            the Triton GEMM of kernels/triton_decode_gemm.py instead of cuBLAS:
                                            tiles by M, split K, PDL with the decode kernels around it (W2
                                            Qwen3-0.6B's ~0.8 ms of cuBLAS launches a step; not measured yet)
  MESHSERVE_PARALLEL_COMPILE=1|N|0          start-up: the warm-ups' Triton kernels compiled first, in parallel on N
                                            threads (1: one per core; kernels/parallel_compile.py,
                                            engine/parallel_warmup.py); a CUDA device and one rank only; on by
                                            default since its GPU tests passed on the H200 (2026-12-02, issue 29)
  MESHSERVE_PARALLEL_COMPILE=procs|procs:N  the same pre-compile with each compile in one of N worker processes
                                            (procs: one per core; kernels/process_compile_pool.py, compile_job.py:
                                            threads reach ~2.1x as a compile mostly holds the GIL); a kernel that
                                            cannot go to a process compiles on its thread; opt-in until measured
                                            (tools/parallel_compile_device.sh, switch procs)
  MESHSERVE_INT4_GEMV=half|matmul          the int4 projection of <= 4 rows (kernels/triton_int4_gemv.py;
                                            half: fp16x2 decode, split-K summed in the GEMV; matmul: the
                                            dequant-GEMM of larger batches); default half (H200, 2026-11-30:
                                            W1 8B AWQ 354 tok/s on its first tiles, magic_fused 285)

This module sits in layers/ because the layers consume the choice (and may not import the engine); it
imports only the config and the layers/kernels it chooses between.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass

import torch
from torch import nn

from meshserve.config import EngineConfig
from meshserve.errors import InvalidArgumentError
from meshserve.kernels import kv_layout, parallel_compile, pdl
from meshserve.kernels.attention_tile_config import DECODE_SPLIT_TOKENS
from meshserve.kernels.fused import fused_ops_importable, gemv_importable
from meshserve.kernels.mla_decode_choice import DECODE_KERNELS as MLA_DECODE_KERNELS
from meshserve.kernels.moe_configs import TABLES as MOE_CONFIG_TABLES
from meshserve.kernels.pdl import PdlPolicy
from meshserve.layers.attention import Attention, make_attention_backend
from meshserve.models.moe_config import num_experts

logger = logging.getLogger(__name__)

ATTENTION_BACKEND_ENV = "MESHSERVE_ATTENTION_BACKEND"
DISABLE_FUSED_OPS_ENV = "MESHSERVE_DISABLE_FUSED_OPS"
NORM_GEMV_ENV = "MESHSERVE_NORM_GEMV"
NORM_ROW_GEMV_ENV = "MESHSERVE_NORM_ROW_GEMV"
GEMV_ACT_OUT_ENV = "MESHSERVE_GEMV_ACT_OUT"
GREEDY_ARGMAX_ENV = "MESHSERVE_GREEDY_ARGMAX"
TP_FUSED_NORM_ENV = "MESHSERVE_TP_FUSED_NORM"
TP_FUSED_NORM_CHOICES = ("", "pull", "push")
NORM_FOLD_ENV = "MESHSERVE_NORM_FOLD"
DECODE_LAYER_ENV = "MESHSERVE_DECODE_LAYER"
SKINNY_GEMV_ENV = "MESHSERVE_SKINNY_GEMV"
DECODE_CONTEXT_BOUNDS_ENV = "MESHSERVE_DECODE_CONTEXT_BOUNDS"
# small dense models' batch-1 decode graph on the H200, 2026-12-02: 0.904 -> 0.877 ms (Qwen3-0.6B, W1 1,072 ->
# 1,094 tok/s); Llama-3.1-8B +0.5% on 2026-11-30 (no default there: more captures for nothing measurable)
DECODE_CONTEXT_BOUNDS_DEFAULT = (256, 1024)
DECODE_SAMPLE_GRAPHS_ENV = "MESHSERVE_DECODE_SAMPLE_GRAPHS"
DECODE_SAMPLE_GRAPHS_DEFAULT = 8  # batch sizes 1, 2, 4, 8: four more small graphs per context variant
PDL_HEAD_ENV = "MESHSERVE_PDL_HEAD"
DECODE_REDUCE_ENV = "MESHSERVE_DECODE_REDUCE"
DECODE_REDUCE_CHOICES = ("kernel", "inline")
DECODE_FP8_PATH_ENV = "MESHSERVE_DECODE_FP8_PATH"
DECODE_FP8_PATH_CHOICES = ("convert", "words", "auto")  # kernels/triton_e4m3_words.FP8_PATHS + "auto"
DECODE_FUSED_PROLOGUE_ENV = "MESHSERVE_DECODE_FUSED_PROLOGUE"
DECODE_TILE_ENV = "MESHSERVE_DECODE_TILE"
DECODE_TILE_CHOICES = ("auto", "grid", "legacy")
MLA_PREFILL_REF_ENV = "MESHSERVE_MLA_PREFILL_REF"
MLA_LEGACY_ENV = "MESHSERVE_MLA_LEGACY"
MLA_DECODE_TILE_ENV = "MESHSERVE_MLA_DECODE_TILE"
DECODE_GRID_TILE_ENV = "MESHSERVE_DECODE_GRID_TILE"
DECODE_BALANCED_ENV = "MESHSERVE_DECODE_BALANCED"
DECODE_SPLIT_TOKENS_ENV = "MESHSERVE_DECODE_SPLIT_TOKENS"
DECODE_MIN_SPLITS_ENV = "MESHSERVE_DECODE_MIN_SPLITS"
DECODE_MIN_SPLITS_DEFAULT = 2
MLA_BALANCED_ENV = "MESHSERVE_MLA_BALANCED"
MLA_PREFETCH_ENV = "MESHSERVE_MLA_PREFETCH"
MLA_TRANSPOSED_ENV = "MESHSERVE_MLA_TRANSPOSED"
MLA_DECODE_KERNEL_ENV = "MESHSERVE_MLA_DECODE_KERNEL"
PDL_ENV = "MESHSERVE_PDL"
PDL_TRIGGER_ENV = "MESHSERVE_PDL_TRIGGER"
PDL_ONE_WAVE_ENV = "MESHSERVE_PDL_ONE_WAVE"
PDL_PRELOAD_ENV = "MESHSERVE_PDL_PRELOAD"
PDL_STEPS_ENV = "MESHSERVE_PDL_STEPS"
PDL_MOE_ENV = "MESHSERVE_PDL_MOE"
MOE_LEGACY_ENV = "MESHSERVE_MOE_LEGACY"
MOE_CONFIGS_ENV = "MESHSERVE_MOE_CONFIGS"
MOE_FUSE_SHARED_ENV = "MESHSERVE_MOE_FUSE_SHARED"
MOE_ROUTE_ALIGN_ENV = "MESHSERVE_MOE_ROUTE_ALIGN"
MOE_ROUTE_ALIGN_CHOICES = ("chain", "fused")
MOE_ROUTER_FUSED_ENV = "MESHSERVE_MOE_ROUTER_FUSED"
FP8_GEMV_ENV = "MESHSERVE_FP8_GEMV"
FP8_GEMM_ENV = "MESHSERVE_FP8_GEMM"
FP8_GEMM_CHOICES = ("scaled_mm", "triton", "auto")  # torch._scaled_mm, kernels/triton_decode_gemm.py, by rows
DECODE_GEMM_ENV = "MESHSERVE_DECODE_GEMM"
INT4_GEMV_ENV = "MESHSERVE_INT4_GEMV"
PARALLEL_COMPILE_ENV = "MESHSERVE_PARALLEL_COMPILE"
FP8_GEMV_CHOICES = ("cvt", "half", "local", "words", "scaled_mm")  # triton_fp8_gemv.FP8_GEMV_VARIANTS + cuBLASLt
INT4_GEMV_CHOICES = ("half", "matmul")  # triton_int4_gemv.int4_gemv + the dequant-GEMM
# decode graphs for these context lengths beside the max_model_len ones: at W1's 128-384 tokens a graph
# sized for 4,096 runs 16 KV splits (most of them empty) and a reduce; <= 256 tokens needs one split at small
# batch (no reduce), <= 1,024 four. The suggested bounds when turned on (none by default until measured)
SUGGESTED_DECODE_CONTEXT_BOUNDS = (256, 1024)

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class KernelSelection:
    """Which implementation each hot operation uses in one model runner."""

    attention_backend: str = "torch"  # "triton" | "torch"
    fused_ops: bool = False  # Triton RMSNorm (+ residual), rotary and SiLU-and-mul
    fused_prologue: bool = False  # q/k norm + rotary + KV write in one kernel, through the Triton backend
    gemv: bool = False  # Triton GEMV for single 16-bit rows (batch-1 decode), SiLU fused into down_proj
    skinny_gemv: bool = False  # Triton GEMV for 2-16 16-bit rows (speculative verify at small batch)
    decode_gemm: bool = False  # Triton GEMM for 2-512 16-bit rows (kernels/triton_decode_gemm.py)
    norm_gemv: bool = False  # residual add + RMSNorm inside the QKV / gate_up GEMV (layers/norm_linear.py)
    # ... in one launch where the GEMV holds whole rows (<= 2,048 features), the MoE router's GEMV too
    # (kernels/triton_norm_row_gemv.py; whether or not norm_gemv is on)
    norm_row_gemv: bool = False
    # the gate/up GEMV with SiLU-and-mul in its epilogue (batch 1:
    # layers/linear.MergedColumnParallelLinear.act_forward)
    gemv_act_out: bool = False
    # TP all-reduce + residual add + RMSNorm in one kernel after o_proj / down_proj (layers/all_reduce_norm.py):
    # "" off, "pull" or "push" (TP_FUSED_NORM_CHOICES)
    tp_fused_norm: str = ""
    norm_fold: bool = False  # both residual norms folded into the GEMVs around them (layers/norm_fold.py)
    # batch 1: a decoder layer a launch (layers/decode_layer.py): None off, else (one launch, programs an SM,
    # warps, weight values a thread streams a trip)
    decode_layer: tuple[bool, int, int, int] | None = None
    fused_sampler: bool = False  # one Gumbel-max pass for batches that only ask for temperatures
    greedy_argmax: bool = False  # all-greedy steps' ids from the same pass without noise (Sampler.argmax)
    cuda_graphs: bool = False  # capture decode steps in CUDA graphs
    # small batches' decode graphs also captured for contexts up to each bound (fewer attention splits)
    decode_context_bounds: tuple[int, ...] = ()
    # decode graphs of batch sizes up to this also captured with the greedy head (engine/cuda_graph.py); 0: none
    decode_sample_graph_max_bs: int = 0
    sample_head_pdl: bool = True  # False: the sampled graphs' greedy head launches its kernels without PDL
    # decode attention's split partials combined by the last split of each group (no reduce launch)
    decode_inline_reduce: bool = False
    # decode attention: which caches' large grids take smaller CTAs (TritonAttentionBackend.takes_grid_tile)
    decode_grid_tile: str = "auto"
    decode_grid_tile_shape: tuple[int, int, int] | None = None  # those grids' tile; None: kernels' GRID_TILE
    # large decode grids through the balanced kernel, this many programs an SM (kernels/triton_decode_balanced.py)
    decode_balanced: int = 0
    # the decode split heuristic's shortest split in KV tokens (kernels/triton_attention.decode_num_splits)
    decode_split_tokens: int = DECODE_SPLIT_TOKENS
    # ... and its least splits of a context of that many tiles or more in a grid that leaves SMs idle
    decode_min_splits: int = 1
    # how decode attention reads an fp8 KV cache (DECODE_FP8_PATH_CHOICES)
    decode_fp8_path: str = "words"
    # decode-only steps: fused_prologue's work inside the decode attention launch (kernels/triton_decode_fused.py)
    decode_fused_prologue: bool = False
    # ... only in launches with at least this many KV splits (2: MESHSERVE_DECODE_FUSED_PROLOGUE=split;
    # Attention._fuses_decode_prologue says why)
    decode_fused_min_splits: int = 2
    kv_cache_dtype: torch.dtype | None = None  # the KV pool's element type (None only in PLAIN)
    # MLA prefill chunks through the per-sequence reference even on the Triton path (layers/mla_attention.py)
    mla_prefill_ref: bool = False
    # MLA decode as before 2026-11-30 (layers/mla_attention.py): the A/B baseline of the fused prologue,
    # the copy-free absorbed matmuls and the MLA split rule
    mla_legacy: bool = False
    # MLA decode with the batch's KV work balanced over a fixed program count (kernels/triton_mla_balanced.py):
    # True always, False never (the split kernel), None by batch size (kernels/mla_decode_choice.py)
    mla_balanced: bool | None = None
    # the MLA decode kernels' tile loop that loads a tile ahead (kernels/triton_mla_prefetch.py)
    mla_prefetch: bool = False
    # the MLA decode kernels' transposed tile loop (kernels/triton_mla_transposed.py)
    mla_transposed: bool = False
    # the MLA decode kernels' tile loop (kernels/mla_decode_choice.DECODE_KERNELS): "default" the plain loop,
    # "pipelined" the block ids a tile ahead (kernels/triton_mla_pipelined.py), over prefetch and transposed;
    # "auto" pipelined in the balanced kernel (from 64 rows), plain in the split kernel
    mla_decode_kernel: str = "auto"
    # (BLOCK_N, num_warps, num_stages) of the MLA decode kernel; None: its default
    mla_decode_tile: tuple[int, int, int] | None = None
    fp8_gemv: str = "words"  # the batch-1 fp8-weight projection when gemv is on (FP8_GEMV_CHOICES)
    fp8_gemm: str = "auto"  # fp8-weight projections of more rows, per-token scales (FP8_GEMM_CHOICES)
    int4_gemv: str = "half"  # the int4 projection of <= 4 rows when gemv is on (INT4_GEMV_CHOICES)
    # programmatic dependent launch of the Triton kernels (kernels/pdl.py; a process-wide policy, bound below)
    pdl_policy: PdlPolicy = PdlPolicy()  # noqa: RUF009 (frozen: one shared default is safe)
    # the first Triton MoE path instead of the fused routing, MoE GEMV and tuned configs (kernels/moe.py)
    moe_legacy: bool = False
    moe_configs: str = "tuned"  # the grouped MoE GEMM's tile table (kernels/moe_configs.TABLES)
    # a shared MLP (DeepSeek's shared experts) as more experts of the routed ones' launches, at batches of up
    # to moe_fuse_shared_max_tokens tokens (None: every batch)
    moe_fuse_shared: bool = False
    moe_fuse_shared_max_tokens: int | None = None
    # decode routing + align: "chain" (five launches) or "fused" (one: kernels/triton_moe_route_align.py)
    moe_route_align: str = "fused"
    # batch 1: the router's GEMV and the softmax top-k in one launch (kernels/triton_moe_router_topk.py)
    moe_router_fused: bool = False
    # threads compiling the warm-ups' Triton kernels ahead of them (engine/parallel_warmup.py); 0: off
    parallel_compile_workers: int = 0
    # those compiles each in one of parallel_compile_workers processes (kernels/process_compile_pool.py)
    parallel_compile_processes: bool = False

    @property
    def pdl(self) -> bool:
        return self.pdl_policy.enabled

    @property
    def fuse_shared_tokens(self) -> int:
        """The largest batch whose shared MLP folds into the routed experts (kernels/moe.folds_shared_mlp);
        0: none."""
        if not self.moe_fuse_shared:
            return 0
        return self.moe_fuse_shared_max_tokens or sys.maxsize


# what a layer uses until a runner binds its selection: the plain torch path
PLAIN = KernelSelection()


FP8_CACHE_DTYPES = ("fp8", "fp8_e4m3")


def resolve_cache_dtype(cache_dtype: str, model_dtype: str) -> torch.dtype:
    """The KV cache's torch dtype: "auto" means the model dtype, fp8 float8_e4m3fn."""
    if cache_dtype in FP8_CACHE_DTYPES:
        return torch.float8_e4m3fn
    name = model_dtype if cache_dtype == "auto" else cache_dtype
    if name not in TORCH_DTYPES:
        raise InvalidArgumentError(f"cache_dtype must be auto or one of {', '.join(TORCH_DTYPES)}, "
                                   f"got {cache_dtype!r}", param="cache_dtype")
    return TORCH_DTYPES[name]


def _text_config(config: EngineConfig):
    hf_config = config.model_config.hf_config
    # a multimodal config keeps the language model's sizes in text_config
    return getattr(hf_config, "text_config", None) or hf_config


def _small(config: EngineConfig) -> bool:
    """pdl.auto_enables' rule for this model: hidden size <= 2,048 (a batch-1 step launch-bound), dense or MoE."""
    return pdl.auto_enables(getattr(_text_config(config), "hidden_size", None))


def _small_dense(config: EngineConfig) -> bool:
    """_small and dense: the norm fold's rule (not measured on MoE models)."""
    return _small(config) and num_experts(_text_config(config)) == 0


def _small_gqa(config: EngineConfig) -> bool:
    """_small, dense or MoE, attention without MLA's latent cache: the short-context graphs' rule (H200 W1
    Qwen3-30B-A3B 348.7 -> 351.0 tok/s with them, 2026-12-03; not measured on MLA, whose decode splits differ)."""
    return _small(config) and not getattr(_text_config(config), "kv_lora_rank", None)


def _norm_fold(config: EngineConfig) -> bool:
    """MESHSERVE_NORM_FOLD (1 on, 0 off), else on for the models whose batch-1 step is launch-bound
    (_small_dense)."""
    raw = os.environ.get(NORM_FOLD_ENV, "").strip()
    return _small_dense(config) if raw == "" else raw != "0"


def _decode_layer() -> tuple[bool, int, int, int] | None:
    """MESHSERVE_DECODE_LAYER: "1" or "phases", optionally ":P,W[,V]" (programs an SM, warps, 16-bit weight values
    a thread streams a trip: 32 by default); unset or 0: None."""
    raw = os.environ.get(DECODE_LAYER_ENV, "").strip().lower()
    if raw in ("", "0"):
        return None
    mode, _, tile = raw.partition(":")
    try:
        values = [int(v) for v in tile.split(",")] if tile else [1, 8]
        programs, warps, stream = (*values, 32) if len(values) == 2 else values
    except ValueError:
        programs = warps = stream = 0
    if (mode not in ("1", "phases") or programs < 1 or warps not in (1, 2, 4, 8, 16, 32)
            or stream not in (8, 16, 32, 64, 128)):
        raise InvalidArgumentError(f"{DECODE_LAYER_ENV} takes 1 or phases, optionally :P,W[,V] (programs an SM, "
                                   f"warps a program and weight values a thread streams a trip, 8-128, e.g. "
                                   f"1:1,8 or 1:1,8,64), got {raw!r}")
    return mode == "1", programs, warps, stream


def _decode_context_bounds(config: EngineConfig) -> tuple[int, ...]:
    """MESHSERVE_DECODE_CONTEXT_BOUNDS, else the default: DECODE_CONTEXT_BOUNDS_DEFAULT for the models whose
    batch-1 step is launch-bound (_small_gqa), none for larger ones."""
    raw = os.environ.get(DECODE_CONTEXT_BOUNDS_ENV)
    if raw is None:
        return DECODE_CONTEXT_BOUNDS_DEFAULT if _small_gqa(config) else ()
    if raw.strip().lower() in ("", "0", "none"):
        return ()
    try:
        bounds = tuple(sorted({int(b) for b in raw.split(",")}))
    except ValueError:
        raise InvalidArgumentError(f"{DECODE_CONTEXT_BOUNDS_ENV} takes token counts (256,1024), got {raw!r}") from None
    if bounds[0] <= 0:
        raise InvalidArgumentError(f"{DECODE_CONTEXT_BOUNDS_ENV}: bounds must be positive, got {raw!r}")
    return bounds


def _decode_sample_graph_max_bs() -> int:
    raw = os.environ.get(DECODE_SAMPLE_GRAPHS_ENV, "").strip()
    if not raw:
        return DECODE_SAMPLE_GRAPHS_DEFAULT
    try:
        max_bs = int(raw)
    except ValueError:
        raise InvalidArgumentError(f"{DECODE_SAMPLE_GRAPHS_ENV} takes the largest batch size (8) or 0, got {raw!r}") from None
    if max_bs < 0:
        raise InvalidArgumentError(f"{DECODE_SAMPLE_GRAPHS_ENV} must be >= 0, got {raw!r}")
    return max_bs


def _decode_split_tokens() -> int:
    """MESHSERVE_DECODE_SPLIT_TOKENS (a power of two, 16-4096), else the rule's DECODE_SPLIT_TOKENS."""
    raw = os.environ.get(DECODE_SPLIT_TOKENS_ENV, "").strip()
    if not raw:
        return KernelSelection.decode_split_tokens
    try:
        tokens = int(raw)
    except ValueError:
        tokens = 0
    if not (16 <= tokens <= 4096 and tokens & (tokens - 1) == 0):
        raise InvalidArgumentError(f"{DECODE_SPLIT_TOKENS_ENV} takes a power of two from 16 to 4096 (KV tokens), "
                                   f"got {raw!r}")
    return tokens


def _decode_min_splits() -> int:
    """MESHSERVE_DECODE_MIN_SPLITS (1-8; 1: the split rule before), else DECODE_MIN_SPLITS_DEFAULT."""
    raw = os.environ.get(DECODE_MIN_SPLITS_ENV, "").strip()
    if not raw:
        return DECODE_MIN_SPLITS_DEFAULT
    if raw not in ("1", "2", "4", "8"):
        raise InvalidArgumentError(f"{DECODE_MIN_SPLITS_ENV} takes 1, 2, 4 or 8, got {raw!r}")
    return int(raw)


def _mla_decode_tile() -> tuple[int, int, int] | None:
    return _tile_env(MLA_DECODE_TILE_ENV)


def _tile_env(env: str) -> tuple[int, int, int] | None:
    """A kernel tile from the environment: BLOCK_N,num_warps,num_stages (e.g. 32,8,2); None when unset."""
    raw = os.environ.get(env, "").strip()
    if not raw:
        return None
    try:
        block_n, warps, stages = (int(v) for v in raw.split(","))
    except ValueError:
        raise InvalidArgumentError(f"{env} takes BLOCK_N,num_warps,num_stages (32,8,2), got {raw!r}") from None
    if block_n < 16 or block_n & (block_n - 1) or warps not in (1, 2, 4, 8, 16) or stages < 1:
        raise InvalidArgumentError(f"{env}: BLOCK_N a power of two >= 16, num_warps 1-16, stages >= 1: {raw!r}")
    return block_n, warps, stages


def _programs_per_sm(env: str) -> int:
    """Programs an SM from the environment: unset, empty or 0 is 0 (off); else an integer 1-32."""
    raw = os.environ.get(env, "").strip()
    if not raw:
        return 0
    try:
        value = int(raw)
    except ValueError:
        raise InvalidArgumentError(f"{env} takes programs an SM (0 off, 1-32), got {raw!r}") from None
    if not 0 <= value <= 32:
        raise InvalidArgumentError(f"{env} takes programs an SM (0 off, 1-32), got {raw!r}")
    return value


# the balanced decode kernel's programs an SM by default on Hopper (H200, 2026-12-04, W2 two processes each: fp8
# KV at 6, Llama-3.1-8B fp8 + fp8 KV +4.1%, Qwen3-0.6B +1.0%; 16-bit at 4, Llama-3.1-8B +2.9%, Qwen3-0.6B +4.2%;
# tools/bench_decode_balanced.py at W2's contexts: fp8 at 6 2.83 TB/s against the split kernel's 2.39, bf16 at 4
# 4.10 against 3.97). Each is what fits an H200 SM in one wave: ~38 KB of shared memory a program (228 KB an SM:
# 6 with fp8, 5 with bf16) and the register cap of max_registers (5 an SM ran ~1.5x slower under a cap that
# left 4 resident, since fixed; bf16 at 6 lost as 5 fit). Other GPUs have other shared memory (an A100 164 KB,
# Ada 100 KB): the split kernel there until measured
DECODE_BALANCED_DEFAULT = {"fp8": 6, "16-bit": 4}  # (an fp32 cache, for tests, as 16-bit)


def _hopper(device: str) -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability(torch.device(device))[0] == 9


def _decode_balanced(fp8_cache: bool, triton_on_cuda: bool, device: str) -> int:
    """MESHSERVE_DECODE_BALANCED when set (0: the split kernel everywhere), else the measured default on a Hopper
    GPU (elsewhere, and off the GPU where the interpreter keeps its decode tiles, the split kernel)."""
    if os.environ.get(DECODE_BALANCED_ENV, "").strip():
        return _programs_per_sm(DECODE_BALANCED_ENV)
    return DECODE_BALANCED_DEFAULT["fp8" if fp8_cache else "16-bit"] if triton_on_cuda and _hopper(device) else 0


def _forced_switch(env: str) -> bool | None:
    """An A/B override: unset (or empty) None (the default rule decides), 0 False, anything else True."""
    raw = os.environ.get(env, "").strip()
    return None if not raw else raw != "0"


def _pdl_policy(config: EngineConfig, on_cuda: bool) -> PdlPolicy:
    """MESHSERVE_PDL (0 / 1 / auto, the default: pdl.auto_policy, by the model's hidden size, MoE or dense, weight
    format and GPU count) and the variants' switches (each overrides what auto chose)."""
    mode = os.environ.get(PDL_ENV, "").strip().lower() or "auto"
    auto: dict = {}
    if mode == "auto":
        text = _text_config(config)
        quantized = bool(config.model_config.quantization or getattr(text, "quantization_config", None)
                         or getattr(config.model_config.hf_config, "quantization_config", None))
        chosen = pdl.auto_policy(getattr(text, "hidden_size", None), num_experts(text) > 0, quantized,
                                 config.parallel_config.world_size,
                                 waiting_weights=quantized and _gemv_waits_under_pdl(config))
        enabled, auto = chosen is not None, chosen or {}
    else:
        enabled = mode != "0"
    moe = os.environ.get(PDL_MOE_ENV, "").strip().lower() or "preload"
    moe = "off" if moe == "0" else moe
    return PdlPolicy(
        enabled=on_cuda and enabled,
        trigger=os.environ.get(PDL_TRIGGER_ENV, "").strip().lower() or "early",
        one_wave_only=os.environ.get(PDL_ONE_WAVE_ENV, "") not in ("", "0"),
        preload=os.environ.get(PDL_PRELOAD_ENV, "").strip().lower() or auto.get("preload", "all"),
        steps=os.environ.get(PDL_STEPS_ENV, "").strip().lower() or auto.get("steps", "decode"),
        moe=moe,
    )


def _gemv_waits_under_pdl(config) -> bool:
    """Whether the model's linear layers hold a weight format whose batch-1 GEMV waits under PDL after requesting
    its first weights: per-channel fp8 (Fp8Config: triton_fp8_gemv's words variant) or AWQ / GPTQ int4
    (Int4Config: triton_int4_gemv's half kernel; act-order weights not sorted by group at load take the grouped
    kernel, a plain launch, which a PDL chain waits on whole); False for fp8 blocks (not measured) and where the
    format does not resolve (the loader reports that one)."""
    from meshserve.layers.quantization import resolve_quant_config
    from meshserve.layers.quantization.fp8 import Fp8Config
    from meshserve.layers.quantization.int4 import Int4Config

    mc = config.model_config
    try:
        qc = resolve_quant_config(mc.hf_config, mc.quantization, mc.load_format)
    except (ValueError, TypeError, KeyError, AttributeError):
        return False
    return isinstance(qc, Fp8Config | Int4Config)


def _tp_fused_norm() -> str:
    value = os.environ.get(TP_FUSED_NORM_ENV, "").strip().lower()
    value = {"0": "", "1": "pull"}.get(value, value)
    if value not in TP_FUSED_NORM_CHOICES:
        raise InvalidArgumentError(f"{TP_FUSED_NORM_ENV} takes 0, 1 (pull) or push, got {value!r}")
    return value


def _fuse_shared() -> dict:
    """MESHSERVE_MOE_FUSE_SHARED: 0 / unset (off), 1 (every batch) or N >= 2 (batches of up to N tokens)."""
    raw = os.environ.get(MOE_FUSE_SHARED_ENV, "").strip()
    if raw in ("", "0"):
        return {"moe_fuse_shared": False}
    if not raw.isdigit():
        raise InvalidArgumentError(f"{MOE_FUSE_SHARED_ENV} takes 0, 1 or a largest token count, got {raw!r}")
    return {"moe_fuse_shared": True, "moe_fuse_shared_max_tokens": None if raw == "1" else int(raw)}


def _variant(env: str, choices: tuple[str, ...], default: str) -> str:
    value = os.environ.get(env, "").strip().lower() or default
    if value not in choices:
        raise InvalidArgumentError(f"{env} takes one of {', '.join(choices)}, got {value!r}")
    return value


MAX_COMPILE_PROCESSES = 16  # procs without N: a start-up pass compiles ~5-20 kernels (Llama-3.1-8B: 5 and 15)


def _parallel_compile_processes() -> bool:
    """MESHSERVE_PARALLEL_COMPILE=procs or procs:N: the compiles in worker processes."""
    return os.environ.get(PARALLEL_COMPILE_ENV, "").strip().lower().partition(":")[0] == "procs"


def _parallel_compile_workers(on_cuda: bool) -> int:
    """MESHSERVE_PARALLEL_COMPILE: 1 / unset (on: one thread per core), 0 (off) or a thread count, or procs /
    procs:N (one process per core, or N); a CUDA device only (elsewhere Triton compiles nothing: the torch
    path, or the interpreter)."""
    value = os.environ.get(PARALLEL_COMPILE_ENV, "").strip().lower()
    processes = value.startswith("procs")
    if processes:
        value = value.partition(":")[2] or "1"
    if value in ("0", "off"):
        return 0
    if value in ("", "1", "on"):
        workers = parallel_compile.default_workers()
        if processes:  # each process imports torch and the kernels (~0.4 GB): no more than a pass has kernels
            workers = min(workers, MAX_COMPILE_PROCESSES)
    elif value.isdigit():
        workers = int(value)
    else:
        raise InvalidArgumentError(f"{PARALLEL_COMPILE_ENV} takes 0, 1, a thread count or procs[:N], got {value!r}")
    return workers if on_cuda and parallel_compile.async_compile_available() else 0


def select_kernels(config: EngineConfig) -> KernelSelection:
    """Decide every kernel switch for a runner of this config (environment overrides included)."""
    on_cuda = torch.device(config.device).type == "cuda"
    attention = os.environ.get(ATTENTION_BACKEND_ENV) or ("triton" if on_cuda else "torch")
    if attention not in ("torch", "triton"):
        raise InvalidArgumentError(f"unknown attention backend {attention!r} (torch, triton)")
    fused_allowed = on_cuda and not os.environ.get(DISABLE_FUSED_OPS_ENV)
    fused_ops = fused_allowed and fused_ops_importable()
    model_dtype = TORCH_DTYPES[config.model_config.dtype]
    kv_cache_dtype = resolve_cache_dtype(config.cache_config.cache_dtype, config.model_config.dtype)
    fp8_cache = kv_cache_dtype == torch.float8_e4m3fn
    kv_layout.fp8_v_transposed()  # a bad MESHSERVE_FP8_V_LAYOUT is an error now, not in the first cache write
    if kv_cache_dtype != model_dtype and attention == "triton" and not fp8_cache:
        raise InvalidArgumentError(
            f"cache_dtype {config.cache_config.cache_dtype!r}: the Triton kernels keep the KV cache in the "
            f"model dtype ({config.model_config.dtype}); use auto", param="cache_dtype")
    gemv = fused_allowed and gemv_importable()
    cuda_graphs = on_cuda and not config.enforce_eager and attention == "triton"
    selection = KernelSelection(
        attention_backend=attention,
        fused_ops=fused_ops,
        # an fp8 cache too: the prologue scales and saturates K/V as the reshape-and-cache write does
        fused_prologue=fused_ops and attention == "triton",
        gemv=gemv,
        skinny_gemv=gemv and os.environ.get(SKINNY_GEMV_ENV, "") not in ("", "0"),
        decode_gemm=gemv and os.environ.get(DECODE_GEMM_ENV, "").strip() not in ("", "0"),
        norm_gemv=gemv and fused_ops and os.environ.get(NORM_GEMV_ENV, "") not in ("", "0"),
        # on unless "0" (H200 W1 Qwen3-30B-A3B 353.5 -> 362.2 tok/s, 2026-12-04): rows of <= 2,048 only
        norm_row_gemv=gemv and fused_ops and os.environ.get(NORM_ROW_GEMV_ENV, "").strip() != "0",
        gemv_act_out=gemv and os.environ.get(GEMV_ACT_OUT_ENV, "").strip() != "0",
        # off a GPU the layers take the same order with the all-reduce and the norm apart (tests the wiring)
        tp_fused_norm=_tp_fused_norm(),
        norm_fold=gemv and fused_ops and _norm_fold(config),
        decode_layer=_decode_layer() if gemv and fused_ops and attention == "triton" else None,
        fused_sampler=fused_ops,
        greedy_argmax=fused_ops and os.environ.get(GREEDY_ARGMAX_ENV, "").strip() != "0",
        cuda_graphs=cuda_graphs,
        decode_context_bounds=_decode_context_bounds(config) if cuda_graphs else (),
        decode_sample_graph_max_bs=_decode_sample_graph_max_bs() if cuda_graphs else 0,
        sample_head_pdl=os.environ.get(PDL_HEAD_ENV, "").strip() != "0",
        decode_inline_reduce=_variant(DECODE_REDUCE_ENV, DECODE_REDUCE_CHOICES, "kernel") == "inline",
        decode_grid_tile=_variant(DECODE_TILE_ENV, DECODE_TILE_CHOICES, KernelSelection.decode_grid_tile),
        decode_grid_tile_shape=_tile_env(DECODE_GRID_TILE_ENV),
        decode_balanced=_decode_balanced(fp8_cache, on_cuda and attention == "triton", config.device),
        decode_split_tokens=_decode_split_tokens(),
        # 2 by default (H100, 2026-12-06: the 256-token graph's one split became two, with the fused prologue)
        decode_min_splits=_decode_min_splits() if on_cuda and attention == "triton" else 1,
        decode_fp8_path=_variant(DECODE_FP8_PATH_ENV, DECODE_FP8_PATH_CHOICES, KernelSelection.decode_fp8_path),
        # "split" by default (H200, 2026-12-02: W1 +0.9% Qwen3-0.6B, +1.5% Llama-3.1-8B; W2 unchanged, where
        # "1" lost 4.7%): tools/w1_ab_device.sh
        decode_fused_prologue=(fused_ops and attention == "triton"
                               and os.environ.get(DECODE_FUSED_PROLOGUE_ENV, "split").strip() != "0"),
        decode_fused_min_splits=1 if os.environ.get(DECODE_FUSED_PROLOGUE_ENV, "split").strip() == "1" else 2,
        kv_cache_dtype=kv_cache_dtype,
        mla_prefill_ref=os.environ.get(MLA_PREFILL_REF_ENV, "") not in ("", "0"),
        mla_legacy=os.environ.get(MLA_LEGACY_ENV, "") not in ("", "0"),
        mla_decode_tile=_mla_decode_tile(),
        mla_balanced=_forced_switch(MLA_BALANCED_ENV),
        mla_prefetch=os.environ.get(MLA_PREFETCH_ENV, "") not in ("", "0"),
        mla_transposed=os.environ.get(MLA_TRANSPOSED_ENV, "") not in ("", "0"),
        mla_decode_kernel=_variant(MLA_DECODE_KERNEL_ENV, MLA_DECODE_KERNELS, KernelSelection.mla_decode_kernel),
        pdl_policy=_pdl_policy(config, on_cuda),
        # the first Triton MoE on request only (MESHSERVE_MOE_LEGACY=1): the new path passed its GPU tests and
        # is faster at every batch measured (tools/bench_moe.py, 2026-11-30)
        moe_legacy=on_cuda and os.environ.get(MOE_LEGACY_ENV, "") not in ("", "0"),
        moe_configs=_variant(MOE_CONFIGS_ENV, MOE_CONFIG_TABLES, KernelSelection.moe_configs),
        moe_route_align=_variant(MOE_ROUTE_ALIGN_ENV, MOE_ROUTE_ALIGN_CHOICES, KernelSelection.moe_route_align),
        # off until measured; when asked for, the reference path takes the same wiring (the CPU tests' check)
        moe_router_fused=os.environ.get(MOE_ROUTER_FUSED_ENV, "") not in ("", "0"),
        # off unless asked for until tools/bench_moe.py measures it on the H200 (issue 24); when asked for it
        # folds on the reference path too (the CPU tests' check of the wiring)
        **_fuse_shared(),
        fp8_gemv=_variant(FP8_GEMV_ENV, FP8_GEMV_CHOICES, KernelSelection.fp8_gemv),
        fp8_gemm=_variant(FP8_GEMM_ENV, FP8_GEMM_CHOICES, KernelSelection.fp8_gemm),
        int4_gemv=_variant(INT4_GEMV_ENV, INT4_GEMV_CHOICES, KernelSelection.int4_gemv),
        # nothing to pre-compile where no Triton kernel serves
        parallel_compile_workers=_parallel_compile_workers(on_cuda and (fused_ops or attention == "triton")),
        parallel_compile_processes=_parallel_compile_processes(),
    )
    logger.info("kernels: %s", selection)
    return selection


def bind_kernels(model: nn.Module, selection: KernelSelection) -> None:
    """Hand the selection to the model's layers: attention layers get the backend (one instance, shared)
    and the prologue switches; every other layer with a `kernels` attribute gets the selection itself. PDL is
    a launch mode of the kernel wrappers, set for the process (kernels/pdl.py)."""
    pdl.set_policy(selection.pdl_policy)
    backend = make_attention_backend(selection.attention_backend, selection.decode_inline_reduce,
                                     selection.decode_grid_tile, selection.decode_fp8_path,
                                     selection.decode_grid_tile_shape, selection.decode_balanced,
                                     selection.decode_split_tokens, selection.decode_min_splits)
    for module in model.modules():
        if isinstance(module, Attention):
            module.backend = backend
            module.fused_prologue = selection.fused_prologue
            module.decode_fused_prologue = selection.decode_fused_prologue
            module.decode_fused_min_splits = selection.decode_fused_min_splits
        elif isinstance(getattr(module, "kernels", None), KernelSelection):
            module.kernels = selection
