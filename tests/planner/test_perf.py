"""Predictions: the decode roofline, claims above it, and sane shapes of TTFT/ITL/throughput/cost."""

import pytest

from meshserve.planner.claim import check_claim
from meshserve.planner.cost import deployment_cost
from meshserve.planner.hardware import get_gpu
from meshserve.planner.model import load_model
from meshserve.planner.moe_comm import ep_traffic
from meshserve.planner.parallel import Layout
from meshserve.planner.perf import (Workload, allreduce_s, decode_stage_time, expected_experts_touched, itl_s,
                                   pp_hop_s, predict, prefill_s, roofline)
from meshserve.planner.plan import PlanRequest, make_plan


def test_70b_tp4_batch32_decode_roofline():
    m, gpu = load_model("llama-3.1-70b"), get_gpu("H100-SXM")
    p = predict(m, Layout(tp=4), gpu, 32, Workload())
    assert round(p.roofline_bytes_per_gpu / 1e9, 1) == 35.3
    assert p.roofline_tok_per_s == pytest.approx(32 / (p.roofline_bytes_per_gpu / 3.35e12))
    assert 2_950 < p.roofline_tok_per_s < 3_100  # "at most ~3,000 tok/s"
    assert p.decode_tok_per_s <= p.roofline_tok_per_s and p.output_tok_per_s <= p.decode_tok_per_s
    assert p.decode_tok_per_s <= 3_100


def test_claim_above_roofline_is_impossible():
    result = make_plan(PlanRequest(model=load_model("llama-3.1-70b"), gpu=get_gpu("H100-SXM"), num_gpus=4,
                                   concurrency=32))
    bad = check_claim(result.best, 5_000, 3350)
    assert bad.impossible and bad.message.startswith("IMPOSSIBLE") and "35.3 GB per GPU" in bad.message
    fine = check_claim(result.best, 2_000, 3350)
    assert not fine.impossible


def test_a_claim_just_above_the_roofline_shows_the_difference():
    """8B at batch 1 on one H100: 3,350 / 16.06 GB = 208.6 tok/s; a claim of 209 read "209 tok/s exceeds the
    roofline 209 tok/s"."""
    result = make_plan(PlanRequest(model=load_model("llama-3.1-8b"), gpu=get_gpu("H100-SXM"), num_gpus=1,
                                   concurrency=1))
    bad = check_claim(result.best, 209, 3350)
    assert bad.impossible and "209.0 tok/s exceeds the roofline 208.6 tok/s" in bad.message, bad.message
    assert "3,039 tok/s" in check_claim(make_plan(PlanRequest(
        model=load_model("llama-3.1-70b"), gpu=get_gpu("H100-SXM"), num_gpus=4, concurrency=32)).best,
        5_000, 3350).message  # whole numbers when they differ already


def test_efficiency_scales_predictions():
    m, gpu = load_model("llama-3.1-8b"), get_gpu("H100-SXM")
    full = predict(m, Layout(), gpu, 1, Workload(128, 256), efficiency=1.0)
    half = predict(m, Layout(), gpu, 1, Workload(128, 256), efficiency=0.5)
    assert half.itl_s == pytest.approx(2 * full.itl_s)
    # batch 1 on H100: 16.06 GB / 3.35 TB/s ≈ 4.8 ms per token, ~209 tok/s ceiling
    assert full.roofline_tok_per_s == pytest.approx(3.35e12 / 16.06e9, rel=0.01)


def test_tensor_parallel_lowers_itl_but_adds_communication():
    m, gpu = load_model("llama-3.1-8b"), get_gpu("H100-SXM")
    one = predict(m, Layout(tp=1), gpu, 1, Workload())
    eight = predict(m, Layout(tp=8), gpu, 1, Workload())
    assert eight.itl_s < one.itl_s and eight.step.comm_s > 0 and one.step.comm_s == 0
    assert eight.ttft_s < one.ttft_s


def test_pipeline_parallel_does_not_cut_decode_latency():
    m, gpu = load_model("llama-3.1-405b"), get_gpu("H100-SXM")
    p = predict(m, Layout(tp=8, pp=2), gpu, 1, Workload())
    assert p.itl_s > 811e9 / 8 / 3.35e12  # each token still passes both stages


def _stage_times(m, layout, gpu, micro, context):
    return [decode_stage_time(m, layout, gpu, s, micro, context, weight_dtype="bf16", kv_dtype="bf16",
                              gpus_per_node=8, efficiency=0.8).total_s for s in range(layout.pp)]


@pytest.mark.parametrize("depth", [0, 2, 3, 5])
def test_pipeline_itl_follows_the_engines_steps_in_flight(depth):
    """The engine keeps d steps in flight (--pipeline-depth, 0: one per stage), each over ceil(B / d) sequences;
    a token waits for its step to pass every stage and hop, and for d steps' turns on the slowest stage."""
    m, gpu, layout, batch, ctx = load_model("llama-3.1-8b"), get_gpu("H200"), Layout(pp=2), 256, 1000
    d = depth or 2
    micro = -(-batch // d)
    stages = _stage_times(m, layout, gpu, micro, ctx)
    itl, _ = itl_s(m, layout, gpu, batch, ctx, weight_dtype="bf16", kv_dtype="bf16", gpus_per_node=8,
                   efficiency=0.8, pipeline_depth=depth)
    assert itl == pytest.approx(max(sum(stages) + pp_hop_s(m, gpu, micro), d * max(stages)))
    p = predict(m, layout, gpu, batch, Workload(), efficiency=0.8, gpus_per_node=8, pipeline_depth=depth)
    assert p.decode_tok_per_s == pytest.approx(batch / p.itl_s)


def test_pipeline_depth_of_one_per_stage_is_the_default_and_deeper_reads_weights_more_often():
    """d = pp (the default): ITL is the pass through the stages (the slowest stage times pp when they are equal);
    one more step in flight splits the batch thinner, so each token reads the weights more often: without a host
    to hide (the planner has none), decode tok/s drops and the weight roofline with it."""
    m, gpu = load_model("llama-3.1-8b"), get_gpu("H200")
    default = predict(m, Layout(pp=2), gpu, 256, Workload())
    assert default == predict(m, Layout(pp=2), gpu, 256, Workload(), pipeline_depth=2)
    deeper = predict(m, Layout(pp=2), gpu, 256, Workload(), pipeline_depth=3)
    assert deeper.decode_tok_per_s < default.decode_tok_per_s
    assert deeper.roofline_tok_per_s == pytest.approx(default.roofline_tok_per_s * 2 / 3)
    # without PP the depth means nothing
    assert predict(m, Layout(), gpu, 64, Workload(), pipeline_depth=3) == predict(m, Layout(), gpu, 64, Workload())


def test_fewer_sequences_than_steps_pay_every_stage():
    """One sequence: one step in flight, its token passes both stages and the hop (the bubble the engine has)."""
    m, gpu = load_model("llama-3.1-8b"), get_gpu("H200")
    stages = _stage_times(m, Layout(pp=2), gpu, 1, 1000)
    itl, _ = itl_s(m, Layout(pp=2), gpu, 1, 1000, weight_dtype="bf16", kv_dtype="bf16", gpus_per_node=8,
                   efficiency=0.8)
    assert itl == pytest.approx(sum(stages) + pp_hop_s(m, gpu, 1))


def test_prefill_is_compute_bound_for_long_prompts():
    m, gpu = load_model("llama-3.1-8b"), get_gpu("H100-SXM")
    p = predict(m, Layout(), gpu, 1, Workload(8192, 16), efficiency=1.0)
    flops = 2 * (m.active_params - m.embedding_params) * 8192
    assert p.ttft_s >= flops / 989e12


def test_moe_reads_only_routed_experts():
    assert expected_experts_touched(8, 2, 1) == pytest.approx(2)
    assert expected_experts_touched(128, 8, 1000) == pytest.approx(128, rel=1e-3)
    m, gpu = load_model("qwen3-30b-a3b"), get_gpu("H100-SXM")
    p1 = predict(m, Layout(), gpu, 1, Workload(), efficiency=1.0)
    assert p1.roofline_bytes_per_gpu < 0.2 * m.total_params * 2  # ~3.3 B active of 30.5 B


def test_allreduce_and_cost():
    assert allreduce_s(1e6, 1, 450, 8) == 0
    assert allreduce_s(450e9, 2, 450, 0) == pytest.approx(1.0)
    cost = deployment_cost(get_gpu("H100-SXM"), 8, 10_000)
    assert cost.usd_per_hour == 24 and cost.usd_per_million_output_tokens == pytest.approx(24 / 36e6 * 1e6)


def test_dp_ep_all_to_all_counts_each_gpus_share_of_the_tokens():
    """DP attention with experts over all dp x tp GPUs: each GPU dispatches (and gets back) the top-k rows of
    its share of the dp replicas' tokens, batch x dp / ep, of which (ep - 1) / ep leave the GPU."""
    m, gpu, batch = load_model("deepseek-v3"), get_gpu("H200"), 256
    step = {layout: decode_stage_time(m, layout, gpu, 0, batch, 1024, weight_dtype="fp8", kv_dtype="bf16",
                                      gpus_per_node=8, efficiency=1.0)
            for layout in (Layout(tp=1, dp=8, ep=8), Layout(tp=2, dp=4, ep=8))}
    row_bytes = m.hidden_size * 2 * m.experts_per_token
    one_gpu_per_replica = step[Layout(tp=1, dp=8, ep=8)].ep_bytes
    assert one_gpu_per_replica == pytest.approx(m.num_moe_layers * 2 * 7 / 8 * batch * row_bytes)
    # two GPUs per replica hold the same batch per replica: each sends half as many rows
    assert step[Layout(tp=2, dp=4, ep=8)].ep_bytes == pytest.approx(one_gpu_per_replica / 2)


def test_prefill_floor_reads_the_weights_each_gpu_holds():
    """A short prompt is bound by reading the weights; with experts spread over DP x EP GPUs each GPU streams
    its own quarter of them, not 1/TP of the whole model."""
    m, gpu = load_model("qwen3-30b-a3b"), get_gpu("H100-SXM")
    # per layer per GPU at TP=1, EP=4: q and o 2 x 2048 x 32 x 128, k and v 2 x 2048 x 4 x 128, 128 / 4 experts
    # of 3 x 2048 x 768; 48 layers, 2 B each
    held = 48 * (2 * 2048 * 32 * 128 + 2 * 2048 * 4 * 128 + 32 * 3 * 2048 * 768) * 2
    ep = prefill_s(m, Layout(dp=4, ep=4), gpu, 1, 16, weight_dtype="bf16", efficiency=1.0)
    exchange = 48 * 2 * (8e-6 + 3 / 4 * 16 * 8 * 2048 * 2 / 450e9)  # its 16 tokens' top-8 rows, out and back
    assert ep == pytest.approx(held / 3350e9 + exchange)  # 4.9 ms; the whole model's 59.8 GB would be 17.8 ms
    # without EP every GPU holds (and a prompt touches) all experts
    whole = prefill_s(m, Layout(dp=4), gpu, 1, 16, weight_dtype="bf16", efficiency=1.0)
    assert whole == pytest.approx(m.linear_params * 2 / 3350e9)


def test_a_batch_of_prompts_keeps_every_pipeline_stage_busy():
    """A replica's prompts ride different steps in flight, so its PP stages prefill them at once: the cycle pays
    the most loaded stage's half of the work (70B, 40 + 40 layers), not both stages' in a row; one prompt (TTFT)
    still passes the stages one after another."""
    m, gpu, lay = load_model("llama-3.1-70b"), get_gpu("H100-SXM"), Layout(tp=4, pp=2)
    seqs, prompt, eff = 512, 1024, 0.8
    tokens = seqs * prompt
    body = m.active_params - 2 * 128256 * 8192  # the layers; the head runs on each prompt's last token
    flops = 2 * (body * tokens + 128256 * 8192 * seqs) + seqs * 2 * 80 * 64 * 128 * prompt ** 2
    compute = flops / (4 * 989e12 * eff)
    reduce = 8e-6 + 2 * 3 / 4 * tokens * 8192 * 2 / 450e9  # one ring all-reduce of the tokens' hidden states
    hop = 15e-6 + 2 * tokens * 8192 * 2 / 50e9  # hidden states and residual to the other node, once
    batch = prefill_s(m, lay, gpu, seqs, prompt, weight_dtype="bf16", efficiency=eff, pipelined=True)
    assert batch == pytest.approx(compute / 2 + 2 * 40 * reduce + hop)
    in_a_row = prefill_s(m, lay, gpu, seqs, prompt, weight_dtype="bf16", efficiency=eff)
    assert in_a_row == pytest.approx(compute + 2 * 80 * reduce + hop)
    one = dict(weight_dtype="bf16", efficiency=eff)
    assert prefill_s(m, lay, gpu, 1, prompt, pipelined=True, **one) == prefill_s(m, lay, gpu, 1, prompt, **one)


def test_the_lm_head_multiplies_sampled_tokens_only():
    """The head's GEMM (V x h) runs for each sampled token: every decoded one, but only a prompt's last in
    prefill; a tied head multiplies as much as an untied one (the embedding itself is a lookup, no FLOPs)."""
    gpu, v8, h8 = get_gpu("H100-SXM"), 128256, 4096
    m = load_model("llama-3.1-8b")  # untied
    body = m.total_params - 2 * v8 * h8  # 32 layers and the final norm
    prompt = 4096
    ttft = prefill_s(m, Layout(), gpu, 1, prompt, weight_dtype="bf16", efficiency=1.0)
    assert ttft == pytest.approx((2 * (body * prompt + v8 * h8) + 2 * 32 * 32 * 128 * prompt ** 2) / 989e12)
    # the decode ceiling's FLOP cap: 2 x (layers + head) per token, not the embedding's V x h besides
    roof, _ = roofline(m, Layout(), gpu, 1024, weight_dtype="bf16")  # 1,024 tokens a step: compute-bound
    assert roof == pytest.approx(989e12 / (2 * (body + v8 * h8)))
    tied = load_model("qwen3-0.6b")  # tie_word_embeddings: its head is the embedding table
    v, h, batch, ctx = 151936, 1024, 64, 1000
    step = decode_stage_time(tied, Layout(), gpu, 0, batch, ctx, weight_dtype="bf16", kv_dtype="bf16",
                             gpus_per_node=8, efficiency=1.0)
    body = tied.total_params - v * h  # less the (one, shared) table
    per_token = 2 * (body + v * h) + 4 * 28 * 16 * 128 * ctx  # its head multiplies all the same
    assert step.compute_s == pytest.approx(batch * per_token / 989e12)


def test_prefill_pays_the_expert_exchange_of_its_tokens():
    """A prompt's tokens go through the same per-layer exchange as a decode step's: DP x EP sends each token's
    top-k rows to the experts' owners and back (over the network once EP spans nodes); EP inside the TP group
    replaces the MoE all-reduce by dispatch, combine and all-gather (moe_comm.py)."""
    v3, gpu, prompt = load_model("deepseek-v3"), get_gpu("H200"), 1024
    lay = Layout(dp=16, ep=16)
    kw = dict(weight_dtype="fp8", efficiency=1.0)
    rows = prompt * 8 * 7168 * 2  # bytes of its top-8 rows, one GPU per replica

    def exchange(bw, lat_us):
        return 58 * 2 * (lat_us * 1e-6 + 15 / 16 * rows / bw)

    two_nodes = prefill_s(v3, lay, gpu, 1, prompt, gpus_per_node=8, **kw)
    one_node = prefill_s(v3, lay, gpu, 1, prompt, gpus_per_node=16, **kw)  # a 16-GPU NVLink domain
    assert two_nodes - one_node == pytest.approx(exchange(50e9, 15) - exchange(450e9, 8))
    assert two_nodes - one_node > 0.2  # ~0.26 s of network for a 1,024-token prompt: more than its FLOPs

    q, h100, tokens = load_model("qwen3-30b-a3b"), get_gpu("H100-SXM"), 2048
    kw = dict(weight_dtype="bf16", efficiency=1.0)
    sliced = prefill_s(q, Layout(tp=2), h100, 1, tokens, **kw)
    spread = prefill_s(q, Layout(tp=2, ep=2), h100, 1, tokens, **kw)  # same bytes and FLOPs per GPU
    t = ep_traffic(q, 2, tokens, 48)
    ep_s = 48 * 3 * 8e-6 + t.total / 450e9
    reduce_s = 48 * allreduce_s(tokens * 2048 * 2, 2, 450, 8)
    assert spread - sliced == pytest.approx(ep_s - reduce_s)


def test_pdl_overhead_applies_at_batch_one_to_the_models_the_engine_chains_with_pdl():
    import dataclasses

    from meshserve.kernels import pdl
    from meshserve.planner.perf import PDL_MAX_HIDDEN, layer_overhead_s

    assert PDL_MAX_HIDDEN == pdl.AUTO_MAX_HIDDEN  # the planner's copy of the engine's rule
    gpu = dataclasses.replace(get_gpu("H200"), layer_overhead_us=40.0, layer_overhead_pdl_us=24.0)
    small, moe, large = load_model("qwen3-0.6b"), load_model("qwen3-30b-a3b"), load_model("llama-3.1-8b")
    assert layer_overhead_s(small, gpu, 1) == layer_overhead_s(moe, gpu, 1) == pytest.approx(24e-6)
    # the 8B: PDL in its one-row steps with 16-bit, fp8 or int4 weights on one GPU (pdl.auto_policy: formats
    # whose GEMV waits under PDL), not over two
    assert layer_overhead_s(large, gpu, 1) == layer_overhead_s(large, gpu, 1, "fp8") == pytest.approx(24e-6)
    assert layer_overhead_s(large, gpu, 1, "int4") == pytest.approx(24e-6)
    assert pdl.auto_policy(large.hidden_size, moe=False, quantized=False) is not None
    assert pdl.auto_policy(large.hidden_size, moe=False, quantized=True, waiting_weights=True) is not None
    assert pdl.auto_policy(large.hidden_size, moe=False, quantized=True) is None
    assert pdl.auto_policy(large.hidden_size, moe=True, quantized=False) is None
    assert pdl.auto_policy(large.hidden_size, moe=False, quantized=False, world_size=2) is None
    plain_overhead = pytest.approx(40e-6)
    assert layer_overhead_s(large, gpu, 1, "bf16", ranks=2) == plain_overhead
    assert layer_overhead_s(large, gpu, 8) == layer_overhead_s(small, gpu, 8) == pytest.approx(40e-6)
    mixtral = dataclasses.replace(large, num_experts=8)  # a large MoE model: not chained
    assert layer_overhead_s(mixtral, gpu, 1) == pytest.approx(40e-6)
    # no PDL figure in the catalog: the one overhead everywhere
    plain = dataclasses.replace(gpu, layer_overhead_pdl_us=None)
    assert layer_overhead_s(small, plain, 1) == pytest.approx(40e-6)
    # and a step's overhead is the layers' sum of it: a smaller one, a faster batch-1 decode
    w1 = Workload(128, 256)
    fast = predict(small, Layout(1, 1, 1), gpu, 1, w1).decode_tok_per_s
    slow = predict(small, Layout(1, 1, 1), plain, 1, w1).decode_tok_per_s
    assert fast > slow
    assert predict(large, Layout(1, 1, 1), gpu, 1, w1).decode_tok_per_s > predict(
        large, Layout(1, 1, 1), plain, 1, w1).decode_tok_per_s
    assert predict(large, Layout(2, 1, 1), gpu, 1, w1).decode_tok_per_s == pytest.approx(
        predict(large, Layout(2, 1, 1), plain, 1, w1).decode_tok_per_s)


def test_quantized_batch1_gemvs_cost_their_own_shortfall():
    # the per-layer figure was fitted on 16-bit weights (it holds the bf16 GEMV's shortfall below the fitted rate);
    # a quantized GEMV's own shortfall replaces it: int4's half GEMV streams at about half the fitted rate, fp8's
    # words GEMV about as far below it as bf16's on half the bytes
    from meshserve.planner.memory import stage_shard
    from meshserve.planner.perf import quantized_gemv_extra_s

    gpu, model = get_gpu("H200"), load_model("llama-3.1-8b")
    layout = Layout(tp=1, pp=1, dp=1)

    def extra(dtype, batch=1, m=model):
        shard = stage_shard(m, layout, 0, dtype)
        return quantized_gemv_extra_s(m, shard, gpu, batch, dtype, gpu.efficiency) / m.num_layers

    assert extra("bf16") == 0.0
    assert 8e-6 < extra("int4") < 15e-6  # ~11.4 us a layer on the 8B
    assert abs(extra("fp8")) < 3e-6
    assert extra("int4", batch=4) == extra("int4") and extra("int4", batch=5) == 0.0  # the GEMV's rows only
    assert extra("fp8", batch=2) == 0.0
    assert extra("int4", m=load_model("qwen3-30b-a3b")) == 0.0  # MoE layers run their own kernels


def test_fewer_sequences_than_replicas_decode_as_fast_as_one_replica():
    """One sequence on DP=8 decodes on one replica: 1 / ITL tok/s, never above one GPU's weight roofline (it was
    8 / ITL, 1,833 tok/s for the 8B on 8 H200s at batch 1, and a roofline of 2,391 where one GPU streaming 16.06
    GB at 4.8 TB/s caps it at 299); 3 sequences on DP=8 are three replicas' tokens, not eight."""
    m, gpu = load_model("llama-3.1-8b"), get_gpu("H200")
    one = predict(m, Layout(dp=8), gpu, 1, Workload())
    single = predict(m, Layout(), gpu, 1, Workload())
    assert one.decode_tok_per_s == pytest.approx(1 / one.itl_s) == pytest.approx(single.decode_tok_per_s)
    assert one.output_tok_per_s == pytest.approx(single.output_tok_per_s)
    assert one.roofline_tok_per_s == pytest.approx(4.8e12 / one.roofline_bytes_per_gpu)
    assert one.roofline_tok_per_s < 300 and one.decode_tok_per_s <= one.roofline_tok_per_s
    three = predict(m, Layout(dp=8), gpu, 3, Workload())
    assert three.decode_tok_per_s == pytest.approx(3 / three.itl_s)
    assert three.roofline_tok_per_s == pytest.approx(3 * 4.8e12 / three.roofline_bytes_per_gpu)
    # dp dividing the concurrency is unchanged: dp x batch sequences
    full = predict(m, Layout(dp=2), gpu, 64, Workload())
    assert full.decode_tok_per_s == pytest.approx(64 / full.itl_s)
