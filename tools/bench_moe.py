"""Time the MoE layer alone, old path vs new, at Qwen3-30B-A3B's and DeepSeek-V2-Lite's expert shapes (issues
23/24), in one call on one GPU (< 2 minutes on an H200, Triton compiles included).

For each model and each batch (1, 8, 64, 256 decode tokens and a 2,048-token prefill chunk) it times the MoE
block as the model builds it (router, routing + load count, routed experts, and DeepSeek's shared MLP) with
  legacy   MESHSERVE_MOE_LEGACY's path: torch routing and align, the pair GEMV, the first tile table, the
           shared MLP beside the experts
  new      the default: one-launch routing, the MoE GEMV for small batches (the shared MLP folded into it),
           Triton align + tuned tiles past it
  stream   new with MESHSERVE_MOE_CONFIGS=stream's tiles
  fused    new with MESHSERVE_MOE_ROUTE_ALIGN=fused (routing + load count + align in one launch)
  fold     new with MESHSERVE_MOE_FUSE_SHARED=1: DeepSeek's shared MLP as S more experts of the routed ones'
           launches at every batch (no gate_up GEMM, SiLU, down GEMM and add beside them; models with shared
           experts only)
  router   new with MESHSERVE_MOE_ROUTER_FUSED=1: at 1 token the router's GEMV and the softmax top-k in one
           launch (Qwen3-MoE's blocks; DeepSeek's router is its own module, unchanged)
inside a CUDA graph over LAYERS blocks of distinct weights (so a layer's experts are not in L2 from the
replay before: one decode step reads 48 different layers), and reports per block: kernel launches (one eager
call, profiler), microseconds, the bytes of the weights read (the experts actually routed to, once each, plus
router and shared MLP) as GB/s and % of the copy bandwidth measured in the same run, and TFLOP/s (2 x pairs x
3 x hidden x width). Every output is checked against the plain torch block.
Then the decode routing + align alone (--route-align-only runs just this): the chain (triton_moe_routing's
launch, then triton_moe_align's zero + count + plan + scatter) against triton_moe_route_align's one launch, per
layer at 8-2,048 tokens (the serving limit is 512: what lies past it says whether to raise it), launches and
microseconds, outputs checked against the chain. Then it sweeps the tile configs
(unless --no-sweep): MoeGemvConfig candidates at batch 1 and 8, grouped-GEMM StageConfigs (the tuned,
legacy and stream tables of kernels/moe_configs.py, and alternatives) at 8-256 and 2,048 tokens, on the routed
experts alone, each checked too, so one run says which to make the default.

What one layer launches (Qwen3-30B-A3B, TP 1; the router's F.linear, 512 KB, is outside and the same):
  batch 1    legacy: routing 6 (cast, softmax, topk, sum, divide, id cast) + load count 3 + pair GEMV 2
             (gate_up 50.3 MB, down 25.2 MB: the 8 experts) + top-k sum and cast 2 = 13 launches
             new: routing with the count 1 + gate_up GEMV 1 + down GEMV with the weighted sum 1 = 3, same bytes
  batch 256  legacy: routing 6 + count 3 + torch align ~30 (scatter_add, cumsums, argsort, gathers,
             searchsorted, casts) + zero 1 + grouped GEMMs 2 (~all 128 experts, 1.2 GB; BLOCK_M 64 over ~16
             rows per expert) + sum and cast 2 = ~44 launches
             new: routing 1 + workspace zero 1 + Triton align 3 + grouped GEMMs 2 (BLOCK_M 32) + combine 1 = 8
             fused (MESHSERVE_MOE_ROUTE_ALIGN=fused): routing + load count + align in 1 launch, so 5 a layer
  (DeepSeek-V2-Lite alike, top-6 of 64 experts of 17.3 MB, plus its shared MLP of 2 experts' width: at batch
  1 a gate_up and a down GEMV and an add beside the experts on the legacy path, folded into the MoE GEMV's
  two launches on the new one; the router is fp32: a cast and an F.linear on both.)

usage: python tools/bench_moe.py [--json bench_moe.json] [--no-sweep | --gemv-sweep-only] [--route-align-only] [--no-route-align]
                                 [--models qwen3-30b-a3b,deepseek-v2-lite]
                                 [--paths legacy,new,stream,fused,fold] [--batches 1,8,64,256,2048]
  the shared-experts fold alone (issue 24; speedups are over the first path listed):
  python tools/bench_moe.py --models deepseek-v2-lite --paths new,fold --batches 8,64,256,2048 --no-sweep \
      --no-route-align
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass

import torch
from triton.runtime.errors import OutOfResources

from meshserve.engine.cuda_graph import captured_us
from meshserve.kernels import triton_moe
from meshserve.kernels.moe_configs import (
    GroupedGemmConfig,
    StageConfigs,
    legacy_configs,
    stream_configs,
    tuned_configs,
)
from meshserve.kernels.moe_ref import fused_experts_ref
from meshserve.kernels.triton_moe_gemv import MoeGemvConfig, default_config, moe_gemv
from meshserve.layers.backend_selection import KernelSelection
from meshserve.layers.moe_routing import GroupedTopK, SoftmaxTopK

LAYERS = 4
DEVICE = "cuda"  # (a CPU smoke run of this script sets "cpu": Triton interpreter, no timing)
BATCHES = (1, 8, 64, 256, 2048)
# the layer's paths: MESHSERVE_MOE_LEGACY=1, the default, MESHSERVE_MOE_CONFIGS=stream,
# MESHSERVE_MOE_ROUTE_ALIGN=fused, MESHSERVE_MOE_FUSE_SHARED=1
LAYER_PATHS = ("legacy", "new", "stream", "fused", "fold", "router")
# decode batches (the fused launch's range), and past it (1,024-2,048: where its serial plan would stand)
ROUTE_ALIGN_TOKENS = (8, 64, 128, 256, 512, 1024, 2048)
# 8 both ways: where the GEMV stops; 16-256: DeepSeek-V2-Lite's decode batches (1.5-24 rows per expert)
SWEEP_GEMV_TOKENS, SWEEP_GROUPED_TOKENS = (1, 8), (8, 16, 32, 64, 128, 256, 2048)


@dataclass(frozen=True)
class MoeShape:
    experts: int
    top_k: int
    hidden: int
    width: int
    renormalize: bool
    shared: int = 0  # DeepSeek's always-on shared experts (one MLP shared x width wide)

    def routing(self):
        if self.renormalize:  # Qwen3-MoE: norm_topk_prob
            return SoftmaxTopK(self.top_k, renormalize=True)
        return GroupedTopK(
            self.top_k, 1, 1, "softmax", "max", renormalize=False, scaling_factor=1.0
        )  # V2-Lite


MODELS = {
    "qwen3-30b-a3b": MoeShape(128, 8, 2048, 768, True),
    "deepseek-v2-lite": MoeShape(64, 6, 2048, 1408, False, shared=2),
}


def copy_bandwidth() -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    return 2 * src.numel() / (time_graph(lambda: dst.copy_(src), repeats=20) * 1e-6)


def time_graph(fn, repeats: int = 50) -> float:
    """Microseconds per call of fn replayed in a CUDA graph (engine/cuda_graph.captured_us; a name of its own so
    the tests can stub the timing)."""
    return captured_us(fn, repeats)


def count_launches(fn) -> int:
    """GPU kernels (and memsets / copies) one eager call of fn launches, by the profiler."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
    except RuntimeError:  # no CUPTI here: the timings still stand
        return -1
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def make_blocks(shape: MoeShape) -> list[torch.nn.Module]:
    """LAYERS MoE blocks as the models build them (router, routed experts, DeepSeek's shared MLP), random."""
    from transformers import AutoConfig

    from meshserve.models.deepseek import DeepseekMoE, _RoutingFactory
    from meshserve.models.moe import SparseMoeBlock

    torch.manual_seed(0)
    blocks = []
    for _ in range(LAYERS):
        if shape.shared:  # DeepSeek-V2-Lite: greedy softmax routing, fp32 router, shared MLP
            cfg = AutoConfig.for_model(
                "deepseek_v2",
                hidden_size=shape.hidden,
                moe_intermediate_size=shape.width,
                n_routed_experts=shape.experts,
                num_experts_per_tok=shape.top_k,
                n_shared_experts=shape.shared,
                topk_method="greedy",
                n_group=1,
                topk_group=1,
                norm_topk_prob=False,
                routed_scaling_factor=1.0,
            )
            block = DeepseekMoE(cfg, _RoutingFactory(cfg, 2))
        else:
            block = SparseMoeBlock(shape.hidden, shape.experts, shape.width, shape.routing())
        block = block.to(DEVICE)
        for param in block.parameters():
            param.data.normal_(0, param.shape[-1] ** -0.5)
        blocks.append(block)
    return blocks


def bind(block: torch.nn.Module, kernels: KernelSelection) -> None:
    for module in block.modules():
        if isinstance(getattr(module, "kernels", None), KernelSelection):
            module.kernels = kernels


def metrics(shape: MoeShape, ids: torch.Tensor, us: float, copy_bw: float, fixed_bytes: int = 0) -> dict:
    """fixed_bytes: what the block reads besides its routed experts (router, shared MLP)."""
    per_expert = 3 * shape.hidden * shape.width * 2  # bf16 w13 + w2
    experts_read = torch.unique(ids[ids >= 0]).numel()
    read = experts_read * per_expert + fixed_bytes
    flops = 2 * (ids.numel() + ids.shape[0] * shape.shared) * 3 * shape.hidden * shape.width
    gbps = read / (us * 1e-6) / 1e9
    return {
        "us": round(us, 2),
        "weight_GB_per_s": round(gbps, 1),
        "pct_copy_bw": round(100 * gbps * 1e9 / copy_bw, 1),
        "TFLOP_per_s": round(flops / (us * 1e-6) / 1e12, 2),
        "experts_read": experts_read,
    }


def check(got: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest error relative to the output's scale; a wrong expert or weight lands near 1."""
    return float((got.float() - ref.float()).abs().max() / ref.float().abs().max().clamp(min=1e-6))


def bench_layer(
    shape: MoeShape, blocks: list[torch.nn.Module], tokens: int, path: str, copy_bw: float
) -> dict:
    """The whole MoE block (router, routing, experts, shared MLP) on one path, checked against the plain one."""
    gen = torch.Generator(device=DEVICE).manual_seed(tokens)
    x = torch.randn(tokens, shape.hidden, device=DEVICE, generator=gen).to(torch.bfloat16)
    for block in blocks:
        bind(block, KernelSelection(fused_ops=True, gemv=True, moe_legacy=path == "legacy",
                                    moe_configs="stream" if path == "stream" else "tuned",
                                    moe_route_align="fused" if path == "fused" else "chain",
                                    moe_fuse_shared=path == "fold", moe_router_fused=path == "router"))
    outs = [None] * LAYERS

    def run():
        for i, block in enumerate(blocks):
            outs[i] = block(x)

    us = time_graph(run) / LAYERS
    launches = count_launches(lambda: blocks[0](x))
    bind(blocks[0], KernelSelection())
    ref = blocks[0](x)
    _, ids = blocks[0].experts.routing(blocks[0].gate(x))
    err = check(outs[0], ref)
    fixed = sum(p.numel() * p.element_size() for p in blocks[0].parameters()) - sum(
        p.numel() * p.element_size() for p in blocks[0].experts.parameters()
    )
    return {
        "tokens": tokens,
        "path": path,
        "launches": launches,
        **metrics(shape, ids, us, copy_bw, fixed),
        "max_rel_err": round(err, 5),
        "ok": err < 0.03,
    }


def time_shared_mlp(blocks: list[torch.nn.Module], tokens: int, hidden: int) -> float:
    """Microseconds of DeepSeek's separate shared MLP alone (gate_up GEMM, SiLU-and-mul, down GEMM) on the
    Triton path: what the fold takes out of the block, less the add and what its S experts cost in the
    grouped GEMMs."""
    x = torch.randn(tokens, hidden, device=DEVICE, dtype=torch.bfloat16)
    for block in blocks:
        bind(block, KernelSelection(fused_ops=True, gemv=True))
    outs = [None] * LAYERS

    def run():
        for i, block in enumerate(blocks):
            outs[i] = block.shared_experts(x)

    return time_graph(run) / LAYERS


def bench_route_align(shape: MoeShape, tokens: int) -> list[dict]:
    """The routing + load count + align of LAYERS layers (distinct logits) in one graph, chain vs one launch,
    at the tuned table's BLOCK_M; each path's launches (one eager call) and microseconds per layer."""
    from meshserve.kernels import triton_moe_align, triton_moe_route_align, triton_moe_routing

    top_k, renormalize, scaling = shape.routing().as_softmax_topk()
    block_m = tuned_configs(tokens * top_k, shape.experts).gate_up.BLOCK_M
    gen = torch.Generator(device=DEVICE).manual_seed(tokens)
    logits = [torch.randn(tokens, shape.experts, device=DEVICE, generator=gen).to(torch.bfloat16)
              for _ in range(LAYERS)]
    load = torch.zeros(shape.experts, dtype=torch.int64, device=DEVICE)

    def chain(lg):
        weights, ids = triton_moe_routing.softmax_topk(lg, top_k, renormalize, scaling, load)
        return weights, ids, triton_moe_align.align_by_expert(ids, shape.experts, block_m)

    def fused(lg):
        return triton_moe_route_align.route_and_align(lg, top_k, renormalize, scaling, load, block_m)

    limit = triton_moe_route_align.MAX_TOKENS
    triton_moe_route_align.MAX_TOKENS = max(limit, tokens)  # timed past the serving limit too
    rows = []
    try:
        for label, fn in (("chain", chain), ("fused", fused)):
            us = time_graph(lambda f=fn: [f(lg) for lg in logits]) / LAYERS
            rows.append({"tokens": tokens, "path": label, "block_m": block_m,
                         "launches": count_launches(lambda f=fn: f(logits[0])), "us": round(us, 2)})
        # the same weights, ids and loads (the shared routing math), the same runs (order free inside a run)
        load.zero_()
        w, i, (rows_c, blocks_c, used_c) = chain(logits[0])
        load_c = load.clone()
        load.zero_()
        fw, fi, (rows_f, blocks_f, used_f) = fused(logits[0])
    finally:
        triton_moe_route_align.MAX_TOKENS = limit
    n = int(used_c)
    same = (torch.equal(w, fw) and torch.equal(i, fi) and torch.equal(load, load_c) and int(used_f) == n
            and torch.equal(blocks_c, blocks_f) and torch.equal(rows_c[n:], rows_f[n:]))
    # pairs inside each expert's run: sorted by (block's expert, pair) both sides
    key_c = blocks_c.repeat_interleave(block_m)[:n].long() * (1 << 20) + rows_c[:n].long()
    key_f = blocks_f.repeat_interleave(block_m)[:n].long() * (1 << 20) + rows_f[:n].long()
    same = same and torch.equal(key_c.sort().values, key_f.sort().values)
    for r in rows:
        r["ok"] = same
    return rows


def bench_experts(shape, layers, tokens, label, call, copy_bw) -> dict:
    """One candidate config: the experts alone (routing fixed), over the layers in one graph."""
    gen = torch.Generator(device=DEVICE).manual_seed(tokens)
    x = torch.randn(tokens, shape.hidden, device=DEVICE, generator=gen).to(torch.bfloat16)
    weights, ids = shape.routing()(torch.randn(tokens, shape.experts, device=DEVICE, generator=gen))
    outs = [None] * LAYERS

    def run():
        for i, layer in enumerate(layers):
            outs[i] = call(x, layer.experts.w13_weight, layer.experts.w2_weight, weights, ids)

    try:
        us = time_graph(run) / LAYERS
    except OutOfResources as exc:  # a tile shape past the SM's shared memory: reported, not fatal
        return {"tokens": tokens, "config": label, "error": str(exc)[:200]}
    experts = layers[0].experts
    err = check(outs[0], fused_experts_ref(x, experts.w13_weight, experts.w2_weight, weights, ids))
    return {
        "tokens": tokens,
        "config": label,
        **metrics(shape, ids, us, copy_bw),
        "max_rel_err": round(err, 5),
        "ok": err < 0.03,
    }


def gemv_candidates(shape: MoeShape) -> dict[str, MoeGemvConfig]:
    base = default_config(shape.hidden, shape.width)
    wide_down = 2048 if shape.width > 1024 else base.down_block_k
    return {
        "default": base,
        "n2": MoeGemvConfig(2, base.gate_up_block_k, 2, base.down_block_k, base.num_warps),
        "n8": MoeGemvConfig(8, base.gate_up_block_k, 8, base.down_block_k, base.num_warps),
        "k256-w4": MoeGemvConfig(4, 256, 4, min(base.down_block_k, 512), 4),
        "k1024": MoeGemvConfig(4, 1024, 4, wide_down, base.num_warps),
        # around k256-w4 (the fastest on Qwen3-30B-A3B's experts at 1 token, 2026-11-30)
        "k256-w4-d1024": MoeGemvConfig(4, 256, 4, base.down_block_k, 4),
        "k256-w2": MoeGemvConfig(4, 256, 4, min(base.down_block_k, 512), 2),
        "k128-w4": MoeGemvConfig(4, 128, 4, min(base.down_block_k, 512), 4),
        "n2-k256-w4": MoeGemvConfig(2, 256, 2, min(base.down_block_k, 512), 4),
        "n8-k256-w4": MoeGemvConfig(8, 256, 8, min(base.down_block_k, 512), 4),
        "k512-w4": MoeGemvConfig(4, 512, 4, min(base.down_block_k, 512), 4),
        "n2-k512-w4": MoeGemvConfig(2, 512, 2, min(base.down_block_k, 512), 4),
        "k256-w4-d256": MoeGemvConfig(4, 256, 4, 256, 4),
        # the down kernel's rows per program, and its slots' tiles in a loop (down_one_tile off: as before)
        "k256-w4-d1024-loop": MoeGemvConfig(4, 256, 4, base.down_block_k, 4, False),
        "k256-w4-d1024-dn1": MoeGemvConfig(4, 256, 1, base.down_block_k, 4),
        "k256-w4-d1024-dn2": MoeGemvConfig(4, 256, 2, base.down_block_k, 4),
        "k256-w4-d1024-dn8": MoeGemvConfig(4, 256, 8, base.down_block_k, 4),
        "k256-w8-d1024": MoeGemvConfig(4, 256, 4, base.down_block_k, 8),
    }


def grouped_candidates(pairs: int, experts: int) -> dict[str, StageConfigs]:
    """The two tables and two alternatives for the bucket (decode: BLOCK_M 16-32; prefill: 64-128)."""

    def cfg(m, n_gate_up, n_down, k, group, warps, stages):
        return StageConfigs(
            GroupedGemmConfig(m, n_gate_up, k, group, warps, stages),
            GroupedGemmConfig(m, n_down, k, group, warps, stages),
        )

    tables = {"tuned": tuned_configs(pairs, experts), "legacy-table": legacy_configs(pairs, experts, False),
              "stream": stream_configs(pairs, experts)}
    if pairs <= 24 * experts:
        # decode: weight-read bound. BLOCK_M 16-32 (mma.sync) vs 64 (one block per expert up to 64 rows, and
        # the wgmma path with num_stages buffers); wide K or N tiles; 1-2 programs an SM by shared memory
        return {
            **tables,
            "m16-n64/128-k128-s4": cfg(16, 64, 128, 128, 1, 4, 4),
            "m16-n64/128-k256-s3": cfg(16, 64, 128, 256, 1, 4, 3),
            "m32-n64/128-k128-s3": cfg(32, 64, 128, 128, 8, 4, 3),
            "m64-n64/128-k128-s4": cfg(64, 64, 128, 128, 1, 4, 4),
            "m64-n64/128-k64-s4-w8": cfg(64, 64, 128, 64, 1, 8, 4),
            "m64-n128/256-k64-s3": cfg(64, 128, 256, 64, 1, 4, 3),
            # vLLM 0.26's fused_moe default without a tuned JSON when M > E (DeepSeek-V2-Lite's E=64, N=1408 on the
            # H200 has none): BLOCK_M 64, N 64 over the fused gate/up output (32 per half here), K 32, GROUP_M 8
            "vllm-default": cfg(64, 32, 64, 32, 8, 4, 3),
        }
    return {
        **tables,
        "m64-n128/256-k64-w8": cfg(64, 128, 256, 64, 8, 8, 3),
        "m128-n128/128-k64-w8-s4": cfg(128, 128, 128, 64, 8, 8, 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", default="bench_moe.json")
    parser.add_argument("--no-sweep", action="store_true")
    parser.add_argument("--gemv-sweep-only", action="store_true",
                        help="sweep the MoE GEMV's candidates at 1 token only (no grouped-GEMM tiles)")
    parser.add_argument("--route-align-only", action="store_true", help="only the routing + align comparison")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--no-route-align", action="store_true", help="skip the routing + align comparison")
    parser.add_argument("--paths", default=",".join(p for p in LAYER_PATHS if p not in ("fold", "router")),
                        help=f"layer paths, the first the speedups' baseline ({', '.join(LAYER_PATHS)})")
    parser.add_argument("--batches", default=",".join(map(str, BATCHES)), help="token counts")
    args = parser.parse_args()
    paths = args.paths.split(",")
    if not set(paths) <= set(LAYER_PATHS):
        parser.error(f"--paths: {', '.join(LAYER_PATHS)}")
    batches = [int(b) for b in args.batches.split(",")]
    torch.set_default_dtype(torch.bfloat16)
    began = time.time()
    copy_bw = copy_bandwidth()
    report = {
        "gpu": torch.cuda.get_device_name(),
        "date": time.strftime("%Y-%m-%d"),
        "layers_per_graph": LAYERS,
        "copy_TB_per_s": round(copy_bw / 1e12, 3),
        "models": {},
    }
    print(f"{report['gpu']}: copy {copy_bw / 1e12:.2f} TB/s; per-layer times, {LAYERS} layers per graph")
    for name in args.models.split(","):
        shape = MODELS[name]
        print(f"\n{name} (E={shape.experts}, top-{shape.top_k}, H={shape.hidden}, I={shape.width})")
        if not args.no_route_align:
            print("  routing + load count + align per layer (chain: 5 launches; fused: 1)")
        route_align = []
        for tokens in () if args.no_route_align else ROUTE_ALIGN_TOKENS:
            chain, fused = bench_route_align(shape, tokens)
            route_align += [chain, fused]
            print(f"  {tokens:>6} BLOCK_M {chain['block_m']:>3}  chain {chain['launches']:>2} launches "
                  f"{chain['us']:>6.2f} us   fused {fused['launches']:>2} launches {fused['us']:>6.2f} us   "
                  f"saves {chain['us'] - fused['us']:>5.2f} us{'' if fused['ok'] else '  MISMATCH'}")
        if args.route_align_only:
            report["models"][name] = {"shape": asdict(shape), "route_align": route_align}
            continue
        layers = make_blocks(shape)
        rows = []
        print(
            f"{'tokens':>6} {'path':>6} {'launch':>6} {'us':>9} {'GB/s':>7} {'%copy':>6} {'TFLOP/s':>8} {'err':>8}"
        )
        model_paths = [p for p in paths if p != "fold" or shape.shared]  # fold: shared experts only
        for tokens in batches:
            pair = [bench_layer(shape, layers, tokens, path, copy_bw) for path in model_paths]
            for r in pair:
                print(
                    f"{tokens:>6} {r['path']:>6} {r['launches']:>6} {r['us']:>9.1f} {r['weight_GB_per_s']:>7.0f} "
                    f"{r['pct_copy_bw']:>6.1f} {r['TFLOP_per_s']:>8.2f} {r['max_rel_err']:>8.4f}"
                    f"{'' if r['ok'] else '  MISMATCH'}"
                )
            if "fold" in model_paths:
                shared_us = time_shared_mlp(layers, tokens, shape.hidden)
                pair[model_paths.index("fold")]["separate_shared_mlp_us"] = round(shared_us, 2)
                print(f"{'':>6} the separate shared MLP alone: {shared_us:.1f} us")
            if len(pair) > 1:
                print(f"{'':>6} over {pair[0]['path']}: " + ", ".join(
                    f"{r['path']} {pair[0]['us'] / r['us']:.2f}x ({r['us'] - pair[0]['us']:+.1f} us)"
                    for r in pair[1:]))
            rows += pair
        sweeps = []
        if not args.no_sweep:
            print("  sweep (experts alone, routing fixed):")
            for tokens in (1,) if args.gemv_sweep_only else SWEEP_GEMV_TOKENS:
                for label, cfg in gemv_candidates(shape).items():
                    sweeps.append(
                        bench_experts(
                            shape,
                            layers,
                            tokens,
                            f"gemv:{label}",
                            lambda *a, c=cfg: moe_gemv(*a, config=c),
                            copy_bw,
                        )
                    )
                    sweeps[-1]["tile"] = ",".join(str(v) for v in asdict(cfg).values())  # (MESHSERVE_MOE_GEMV_TILE)
            for tokens in () if args.gemv_sweep_only else SWEEP_GROUPED_TOKENS:
                for label, cfg in grouped_candidates(tokens * shape.top_k, shape.experts).items():
                    sweeps.append(
                        bench_experts(
                            shape,
                            layers,
                            tokens,
                            f"grouped:{label}",
                            lambda *a, c=cfg: triton_moe.fused_experts(*a, configs=c),
                            copy_bw,
                        )
                    )
            for r in sweeps:
                if "error" in r:
                    print(f"  {r['tokens']:>6} {r['config']:<32} {r['error'][:60]}")
                else:
                    print(
                        f"  {r['tokens']:>6} {r['config']:<32} {r['us']:>9.1f} us {r['pct_copy_bw']:>6.1f}% "
                        f"{r['TFLOP_per_s']:>7.2f} TF{'' if r['ok'] else '  MISMATCH'}"
                    )
        report["models"][name] = {"shape": asdict(shape), "layer": rows, "sweep": sweeps, "route_align": route_align}
        del layers
        torch.cuda.empty_cache()
    report["wall_s"] = round(time.time() - began, 1)
    with open(args.json, "w") as f:
        json.dump(report, f, indent=1)
    print(f"\nwrote {args.json} ({report['wall_s']} s)")


if __name__ == "__main__":
    main()
