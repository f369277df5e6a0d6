"""Batch-1 decode's fixed cost per layer, kernel by kernel (issue 29), inside CUDA graphs on the GPU.

usage: python tools/bench_decode_fixed_cost.py [--quick] [--pdl-only]

1. residual add + RMSNorm, then the QKV / gate_up GEMV (two kernels) vs rms_norm_gemv (one), for the W1
   models' shapes, at programs of 4 / 8 / 16 weight rows (BLOCK_N; the layers use 4).
2. decode attention at batch 1 (Llama-3.1-8B / Qwen3-0.6B heads: 8 KV heads, 128 dims) over W1's contexts, at
   the split counts the decode-graph variants bake in (1 = DIRECT_OUT, no reduce kernel): which bounds pay.
3. PDL (kernels/pdl.py) off vs on, kernel by kernel: each decode-path kernel launched 32 times back to back in
   one graph (us per launch: the gap PDL hides shows as the difference), then a whole decoder layer's chain
   (norm, QKV, prologue, attention, o_proj, norm, gate_up, down) over distinct per-layer weights, with the
   norm fold off and on: us per layer and the implied tok/s of the layers alone. The prologue + decode
   attention pair against the decode attention with the prologue inside (MESHSERVE_DECODE_FUSED_PROLOGUE=1,
   kernels/triton_decode_fused.py) is in the per-kernel list.

The end-to-end A/B is `meshserve bench latency` with the switches (layers/backend_selection.py):
  meshserve bench latency --no-baseline                                          (all off: the default)
  MESHSERVE_PDL=1 meshserve bench latency --no-baseline
  MESHSERVE_PDL=1 MESHSERVE_NORM_GEMV=1 MESHSERVE_DECODE_CONTEXT_BOUNDS=256,1024 meshserve bench latency --no-baseline
"""

import argparse

import torch
import triton.testing

from meshserve.bench.roofline import measure_copy_bandwidth
from meshserve.kernels import pdl
from meshserve.kernels.triton_attention import decode_attention, reshape_and_cache
from meshserve.kernels.triton_decode_fused import decode_attention_fused
from meshserve.kernels.triton_gemv import gemv, rms_norm_gemv
from meshserve.kernels.triton_ops import qkv_rope_cache, rms_norm, silu_and_mul

SHAPES = {
    "8b qkv": (6144, 4096),
    "8b gate_up": (28672, 4096),
    "qwen qkv": (4096, 1024),
    "qwen gate_up": (6144, 1024),
}


def _us(fn) -> float:
    return triton.testing.do_bench_cudagraph(fn) * 1e3


def bench_norm_gemv(bw: float, block_ns) -> None:
    print("norm + projection at batch 1 (us; weight bandwidth / copy bandwidth)")
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        x, r = (torch.randn(1, k, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        nw = torch.ones(k, device="cuda", dtype=torch.bfloat16)

        def two_kernels(w=w, x=x, r=r, nw=nw):
            normed, _ = rms_norm(x, nw, 1e-5, r)
            return gemv(normed, w)

        row = f"{name:13s} two kernels {_us(two_kernels):6.1f}"
        row += f"  gemv alone {_us(lambda w=w, x=x: gemv(x, w)):6.1f}"
        for bn in block_ns:
            t = _us(lambda w=w, x=x, r=r, nw=nw, bn=bn: rms_norm_gemv(x, r, nw, 1e-5, w, block_n=bn))
            row += f"  fused/{bn} {t:6.1f} ({w.numel() * 2 / (t * 1e-6) / bw:4.0%})"
        print(row)


def bench_decode_attention(contexts, splits_list, block_size: int = 16) -> None:
    print("decode attention, batch 1, 32 heads / 8 KV heads / 128 dims, bf16 (us)")
    kv_heads, heads, dim = 8, 32, 128
    max_ctx = max(contexts)
    blocks = -(-max_ctx // block_size)
    cache = torch.randn(2, blocks + 1, block_size, kv_heads, dim, device="cuda", dtype=torch.bfloat16)
    table = (torch.randperm(blocks, device="cuda") + 1).view(1, blocks)
    q = torch.randn(1, heads, dim, device="cuda", dtype=torch.bfloat16)
    out = torch.empty_like(q)
    qsl = torch.arange(2, device="cuda")
    for ctx in contexts:
        seq_lens = torch.tensor([ctx], device="cuda")
        row = f"context {ctx:5d}"
        for s in splits_list:
            t = _us(
                lambda s=s, seq_lens=seq_lens: decode_attention(
                    q, cache, table, seq_lens, qsl, dim**-0.5, None, out, s
                )
            )
            row += f"  {s:2d} splits {t:5.1f}"
        print(row)


# (hidden, heads, kv heads, head dim, intermediate, layers, q/k norm) of the W1 models
MODELS = {"qwen3-0.6b": (1024, 16, 8, 128, 3072, 28, True), "llama-3.1-8b": (4096, 32, 8, 128, 14336, 32, False)}


def _bf16(*shape, scale=1.0):
    return torch.randn(*shape, device="cuda", dtype=torch.bfloat16) * scale


class _Layer:
    """One decoder layer's weights and its batch-1 decode step through the Triton kernels."""

    def __init__(self, hidden, heads, kv_heads, dim, inter, qk_norm, ctx=256, block_size=16):
        self.heads, self.kv_heads, self.dim, self.qk_norm = heads, kv_heads, dim, qk_norm
        self.w_qkv = _bf16((heads + 2 * kv_heads) * dim, hidden, scale=0.02)
        self.w_o, self.w_gate_up = _bf16(hidden, heads * dim, scale=0.02), _bf16(2 * inter, hidden, scale=0.02)
        self.w_down = _bf16(hidden, inter, scale=0.02)
        self.nw1, self.nw2, self.qw, self.kw = _bf16(hidden), _bf16(hidden), _bf16(dim), _bf16(dim)
        blocks = -(-(ctx + 1) // block_size)
        self.cache = _bf16(2, blocks + 1, block_size, kv_heads, dim)
        self.table = (torch.arange(blocks, device="cuda", dtype=torch.int32) + 1).view(1, blocks)
        self.seq_lens = torch.tensor([ctx + 1], device="cuda", dtype=torch.int32)
        self.pos = torch.tensor([ctx], device="cuda")
        self.slot = torch.tensor([block_size + ctx], device="cuda")
        self.qsl = torch.arange(2, device="cuda", dtype=torch.int32)
        self.cos, self.sin = (torch.randn(ctx + 1, dim, device="cuda") for _ in range(2))
        self.gated_down = inter <= 4096  # as layers/linear.py (_MAX_FUSED_GATED_K): SiLU in the down GEMV if small

    def __call__(self, x, res, fold: bool):
        if fold:
            qkv, res = rms_norm_gemv(x, res, self.nw1, 1e-6, self.w_qkv)
        else:
            h, res = rms_norm(x, self.nw1, 1e-6, res)
            qkv = gemv(h, self.w_qkv)
        q = qkv_rope_cache(qkv, self.pos, self.cos, self.sin, self.qw if self.qk_norm else None,
                           self.kw if self.qk_norm else None, 1e-6, self.cache, self.slot, self.heads,
                           self.kv_heads)
        out = torch.empty_like(q)
        decode_attention(q, self.cache, self.table, self.seq_lens, self.qsl, self.dim**-0.5, None, out, 1)
        x = gemv(out.view(1, -1), self.w_o)
        if fold:
            gate_up, res = rms_norm_gemv(x, res, self.nw2, 1e-6, self.w_gate_up)
        else:
            h, res = rms_norm(x, self.nw2, 1e-6, res)
            gate_up = gemv(h, self.w_gate_up)
        if self.gated_down:
            return gemv(gate_up, self.w_down, gated=True), res
        return gemv(silu_and_mul(gate_up), self.w_down), res


def _us_ab(fn, repeats: int = 32) -> tuple[float, float]:
    """us per call of fn with PDL off and on, `repeats` calls back to back in one graph."""

    def many():
        for _ in range(repeats):
            fn()

    times = []
    for on in (False, True):
        with pdl.enabled(on):
            many()  # compile this variant outside the capture
            times.append(_us(many) / repeats)
    return times[0], times[1]


def bench_pdl_kernels(model: str) -> None:
    hidden, heads, kv_heads, dim, inter, _, qk_norm = MODELS[model]
    lay = _Layer(hidden, heads, kv_heads, dim, inter, qk_norm)
    x, res = _bf16(1, hidden), _bf16(1, hidden)
    qkv, q, out = _bf16(1, lay.w_qkv.shape[0]), _bf16(1, heads, dim), _bf16(1, heads, dim)
    k, v = _bf16(1, kv_heads, dim), _bf16(1, kv_heads, dim)
    gate_up = _bf16(1, 2 * inter)
    qw, kw = (lay.qw, lay.kw) if qk_norm else (None, None)

    def prologue_then_attend(splits):  # the two-step decode path (MESHSERVE_DECODE_FUSED_PROLOGUE off)
        q = qkv_rope_cache(qkv, lay.pos, lay.cos, lay.sin, qw, kw, 1e-6, lay.cache, lay.slot, heads, kv_heads)
        return decode_attention(q, lay.cache, lay.table, lay.seq_lens, lay.qsl, dim**-0.5, None, out, splits)

    def fused(splits):  # one launch (+ the reduce with splits): kernels/triton_decode_fused.py
        return decode_attention_fused(qkv, lay.pos, lay.cos, lay.sin, qw, kw, 1e-6, lay.cache, lay.slot, lay.table,
                                      lay.seq_lens, lay.qsl, dim**-0.5, None, heads, kv_heads, splits)

    kernels = {
        "rms_norm+residual": lambda: rms_norm(x, lay.nw1, 1e-6, res),
        "gemv qkv": lambda: gemv(x, lay.w_qkv),
        "norm fold qkv": lambda: rms_norm_gemv(x, res, lay.nw1, 1e-6, lay.w_qkv),
        "qkv_rope_cache": lambda: qkv_rope_cache(qkv, lay.pos, lay.cos, lay.sin, lay.qw if qk_norm else None,
                                                 lay.kw if qk_norm else None, 1e-6, lay.cache, lay.slot, heads,
                                                 kv_heads),
        "reshape_and_cache": lambda: reshape_and_cache(k, v, lay.cache, lay.slot),
        "decode attn 1 split": lambda: decode_attention(q, lay.cache, lay.table, lay.seq_lens, lay.qsl,
                                                        dim**-0.5, None, out, 1),
        "decode attn 4 splits": lambda: decode_attention(q, lay.cache, lay.table, lay.seq_lens, lay.qsl,
                                                         dim**-0.5, None, out, 4),
        "prologue + attn 1 split": lambda: prologue_then_attend(1),
        "attn, prologue inside, 1": lambda: fused(1),
        "prologue + attn 4 splits": lambda: prologue_then_attend(4),
        "attn, prologue inside, 4": lambda: fused(4),
        "gemv o_proj": lambda: gemv(out.view(1, -1), lay.w_o),
        "gemv gate_up": lambda: gemv(x, lay.w_gate_up),
        "silu_and_mul": lambda: silu_and_mul(gate_up),
        "gemv down": lambda: gemv(gate_up[..., :inter], lay.w_down),
        "gemv down, SiLU inside": lambda: gemv(gate_up, lay.w_down, gated=True),
    }
    print(f"{model}: PDL off / on, us per launch (32 back to back in one graph)")
    for name, fn in kernels.items():
        off, on = _us_ab(fn)
        print(f"  {name:24s} {off:6.2f} {on:6.2f}  ({on - off:+5.2f})")


def bench_pdl_layers(model: str, num_layers: int | None = None) -> None:
    hidden, heads, kv_heads, dim, inter, layers, qk_norm = MODELS[model]
    num_layers = num_layers or layers
    stack = [_Layer(hidden, heads, kv_heads, dim, inter, qk_norm) for _ in range(num_layers)]
    x0, r0 = _bf16(1, hidden), _bf16(1, hidden)
    print(f"{model}: {num_layers} decoder layers, batch 1, context 256 (us per layer; layers-only tok/s "
          f"for {layers} layers)")
    for fold in (False, True):

        def step(fold=fold):
            x, res = x0, r0
            for lay in stack:
                x, res = lay(x, res, fold)

        off, on = _us_ab(step, repeats=1)
        off, on = off / num_layers, on / num_layers
        print(f"  norm fold {'on ' if fold else 'off'}  PDL off {off:6.2f}  PDL on {on:6.2f}  "
              f"({1e6 / (off * layers):7.1f} -> {1e6 / (on * layers):7.1f} tok/s)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="BLOCK_N 4 only; fewer contexts")
    ap.add_argument("--pdl-only", action="store_true", help="only the PDL A/B (section 3)")
    ns = ap.parse_args()
    bw = measure_copy_bandwidth()
    print(f"{torch.cuda.get_device_name(0)}: copy bandwidth {bw / 1e12:.2f} TB/s")
    if not ns.pdl_only:
        bench_norm_gemv(bw, (4,) if ns.quick else (4, 8, 16))
        contexts = (128, 384, 1024) if ns.quick else (128, 256, 384, 512, 768, 1024, 2048)
        bench_decode_attention(contexts, (1, 2, 4, 16))
    if torch.cuda.get_device_capability()[0] < 9:
        print("PDL needs sm_90 or newer: section 3 skipped")
        return
    for model in MODELS:
        bench_pdl_kernels(model)
        bench_pdl_layers(model, 8 if ns.quick else None)


if __name__ == "__main__":
    main()
