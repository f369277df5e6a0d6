"""`meshserve bench latency` (W1) and `meshserve bench throughput` (W2), each with its baseline in the same run.

Both run dummy weights at real architecture sizes in bf16 on one GPU, then HF transformers on the same GPU
(after meshserve released its memory), and the roofline from the copy bandwidth measured on the spot.
With -tp / -pp they run split over that many GPUs (no HF baseline there: the baseline of a layout is the
same command at TP = PP = 1, and vLLM at the same layout); the roofline is then per GPU: one rank's
weight bytes per step at TP, every stage's bytes in turn at PP.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import os
import shlex
import statistics
import subprocess
import sys
import time

from meshserve.bench.report import append_benchmarks_row, print_table, write_json
from meshserve.bench.workloads import W1_NEW_TOKENS, W2_TEMPERATURE, w1_prompt, w2_requests
from meshserve.cli_paths import check_output_file
from meshserve.cli_types import positive_int, positive_int_list
from meshserve.config import EngineArgs
from meshserve.serve.vllm_compat_args import JsonDict, json_dict

logger = logging.getLogger(__name__)


def _llm(ns):
    from meshserve import LLM

    return LLM(model=ns.model, load_format="dummy", dtype="bfloat16", max_model_len=ns.max_model_len,
               enforce_eager=ns.enforce_eager, max_cudagraph_tokens=ns.max_cudagraph_tokens,
               gpu_memory_utilization=ns.gpu_memory_utilization,
               max_num_seqs=ns.max_num_seqs, max_num_batched_tokens=ns.max_num_batched_tokens,
               enable_prefix_caching=not ns.no_prefix_caching, tensor_parallel_size=ns.tensor_parallel_size,
               pipeline_parallel_size=ns.pipeline_parallel_size, pipeline_depth=getattr(ns, "pipeline_depth", 0),
               pp_token_handoff=getattr(ns, "pp_token_handoff", False),
               pp_layer_partition=getattr(ns, "pp_layer_partition", None),
               disable_custom_all_reduce=ns.disable_custom_all_reduce,
               enable_expert_parallel=getattr(ns, "enable_expert_parallel", False),
               quantization=getattr(ns, "quantization", None), kv_cache_dtype=getattr(ns, "kv_cache_dtype", "auto"),
               hf_overrides=dict(getattr(ns, "hf_overrides", None) or {}),
               step_trace=getattr(ns, "step_trace", None))


def _layers_per_stage(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected layers per stage like 17,15, got {text!r}") from None


def _layout(ns) -> dict:
    return {"tp": ns.tensor_parallel_size, "pp": ns.pipeline_parallel_size,
            **({"pipeline_depth": ns.pipeline_depth} if getattr(ns, "pipeline_depth", 0) else {}),
            **({"pp_layer_partition": ns.pp_layer_partition} if getattr(ns, "pp_layer_partition", None) else {}),
            **({"pp_token_handoff": True} if getattr(ns, "pp_token_handoff", False) else {}),
            **({"ep": ns.tensor_parallel_size} if getattr(ns, "enable_expert_parallel", False) else {}),
            "all_reduce": ("-" if ns.tensor_parallel_size == 1 else
                           "nccl" if ns.disable_custom_all_reduce else "one-shot up to 2 MiB, nccl above")}


def _split(ns) -> bool:
    return ns.tensor_parallel_size * ns.pipeline_parallel_size > 1


def _free_gpu(*owners) -> None:
    """Shut engines down and hand freed GPU memory back, so the next contender (HF) starts clean."""
    import torch

    for owner in owners:
        if hasattr(owner, "shutdown"):
            owner.shutdown()
    gc.collect()
    torch.cuda.empty_cache()


def _times(fn, repeats: int) -> list[float]:
    """Seconds of each of `repeats` synchronized runs of fn."""
    import torch

    seconds = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        seconds.append(time.perf_counter() - t)
    return seconds


def _timed(fn, repeats: int = 3) -> float:
    return min(_times(fn, repeats))


@contextlib.contextmanager
def _sm_clock_samples(period_ms: int = 50, power: list[float] | None = None):
    """The GPU's SM clock (MHz) sampled by nvidia-smi every period_ms while the block runs, into the list it
    yields (and its power draw, W, into `power` when given); empty where there is no nvidia-smi. A batch-1 step
    of a small model barely loads the GPU, and a clock below its maximum there would read as a slower kernel;
    W2 loads it fully, where a power cap would lower the clock."""
    samples: list[float] = []
    # the GPU this process calls cuda:0: the first of CUDA_VISIBLE_DEVICES (an index or a UUID, as nvidia-smi
    # --id takes them), else nvidia-smi's 0
    gpu = (os.environ.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0].strip() or "0"
    query = "clocks.sm,power.draw" if power is not None else "clocks.sm"
    try:
        proc = subprocess.Popen(["nvidia-smi", f"--id={gpu}", f"--query-gpu={query}", "--format=csv,noheader,nounits",
                                 f"-lms={period_ms}"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    except OSError:
        yield samples
        return
    try:
        yield samples
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=10)
        for line in out.splitlines():
            values = [v.strip() for v in line.split(",")]
            if not values or not _is_number(values[0]):
                continue
            samples.append(float(values[0]))
            if power is not None and len(values) > 1 and _is_number(values[1]):
                power.append(float(values[1]))


def _is_number(text: str) -> bool:
    return text.replace(".", "", 1).isdigit()


def _decode_graph_ms(llm, context: int, replays: int = 200) -> float | None:
    """Milliseconds of one replay of the batch-1 decode graph a W1 step replays, back to back
    with no host work between replays; None without decode graphs. Beside W1's wall time per token it splits
    a token into the graph's device time and the rest (host work, sampling, the gap between steps): W1 on
    Qwen3-0.6B varied 680-1,073 tok/s from one process to the next on one H200 (2026-12-02), and this says
    on which side the time moves. The replays rerun the last step's inputs and rewrite that step's KV slot:
    run it after the timed generations."""
    holder = getattr(getattr(llm.engine, "runner", None), "graphs", None)
    # the graph a greedy W1 step replays: the one with the LM head and the argmax when captured (the plain
    # decode graph's forward alone before 2026-12-02, twenty-second session)
    graph = holder.greedy_step_graph(1, context) if holder is not None and holder.graphs else None
    if graph is None:
        return None
    from meshserve.engine.cuda_graph import replay_ms

    return replay_ms(graph, replays)


def _decode_graph_ms_by_bound(llm, contexts: list[int], replays: int = 200) -> dict[int, float]:
    """Context bound -> milliseconds of one replay of each batch-1 graph that a step at one of `contexts` (W1's:
    129..383) replays, timed at the longest of its steps' contexts; {} without decode graphs. _decode_graph_ms
    times only the last step's graph, but on a small dense model W1's first half replays the 256-token bound's
    graph (one KV split) and its second half the 1,024 one (four splits): a change that moves only one of them
    (the fused decode prologue, 2026-12) shows in the wall time per token and not in that one number. The
    static buffers' context length is set for each graph and restored (run after the timed generations, as
    _decode_graph_ms: the replays rewrite the last step's KV slot)."""
    holder = getattr(getattr(llm.engine, "runner", None), "graphs", None)
    if holder is None or not holder.graphs:
        return {}
    from meshserve.engine.cuda_graph import replay_ms

    longest: dict[tuple[int, int], int] = {}
    for c in contexts:
        key = holder.variant(1, c)
        longest[key] = max(longest.get(key, 0), c)
    saved = holder.seq_lens[:1].clone()
    out = {}
    try:
        for (_, bound), context in sorted(longest.items()):
            graph = holder.greedy_step_graph(1, context)
            if graph is not None:
                holder.seq_lens[:1].fill_(context)
                out[bound] = replay_ms(graph, replays)
    finally:
        holder.seq_lens[:1].copy_(saved)
    return out


def _steps_mean_ms(by_bound: dict[int, float], contexts: list[int], variant) -> float | None:
    """The graph time per step averaged over the steps (each its variant's time): comparable with the wall time
    of a token, unlike one graph's."""
    times = [by_bound.get(variant(1, c)[1]) for c in contexts]
    return None if not times or None in times else sum(times) / len(times)


def _decode_curve(llm, batch_sizes: list[int]) -> dict[int, float]:
    import random

    from meshserve import SamplingParams

    random.seed(2)
    curve = {}
    for bs in batch_sizes:
        prompts = [{"prompt_token_ids": [random.randint(0, 10000) for _ in range(128)]} for _ in range(bs)]

        def run(n):
            return llm.generate(prompts, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True),
                                use_tqdm=False)

        run(4)  # first use of this batch size compiles its prefill kernels
        t1, t128 = _timed(lambda: run(1), 2), _timed(lambda: run(128), 2)
        curve[bs] = bs * 127 / (t128 - t1)
    return curve


def _need_gpu(bench: str) -> None:
    import torch

    if not torch.cuda.is_available():
        from meshserve.errors import InvalidArgumentError

        raise InvalidArgumentError(f"bench {bench} measures a GPU and none is visible (W1/W2 are GPU workloads; "
                                   "`meshserve bench host` and `bench channel` run on the CPU)")


W1_REPEATS = 5  # timed W1 generations per process; the best is reported, every one in tok_s_runs


def run_latency(ns) -> dict:
    _need_gpu("latency")
    import torch

    from meshserve import SamplingParams
    from meshserve.bench.roofline import measure_copy_bandwidth
    from meshserve.models.loader import active_weight_bytes

    gpu = torch.cuda.get_device_name(0)
    bw = measure_copy_bandwidth()
    t0 = time.perf_counter()
    llm = _llm(ns)
    start_s = time.perf_counter() - t0
    # rank 0's shard; a batch-1 step reads every stage's shard in turn
    # MoE: a batch-1 step reads only the top-k experts' share of the expert weights
    wbytes = active_weight_bytes(llm.engine.runner.model) * ns.pipeline_parallel_size
    prompt = [{"prompt_token_ids": w1_prompt()}]

    def gen(n):
        return llm.generate(prompt, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True), use_tqdm=False)

    gen(8)  # warm-up
    t1 = _timed(lambda: gen(1))
    with _sm_clock_samples() as clocks:
        runs = _times(lambda: gen(W1_NEW_TOKENS), W1_REPEATS)
    tn = min(runs)
    res = {"bench": "latency (W1)", "gpu": gpu, "model": ns.model, **_layout(ns), "copy_TBps": bw / 1e12,
           "weight_GB_per_gpu_step": wbytes / 1e9, "start_s": start_s,
           "gpu_mem_GB": torch.cuda.max_memory_reserved() / 1e9,
           "tok_s": W1_NEW_TOKENS / tn, "decode_tok_s": (W1_NEW_TOKENS - 1) / (tn - t1),
           "roofline_tok_s": bw / wbytes, "tok_s_runs": [round(W1_NEW_TOKENS / t, 1) for t in runs]}
    res["pct_roofline"] = 100 * res["decode_tok_s"] / res["roofline_tok_s"]
    graph_ms = _decode_graph_ms(llm, len(w1_prompt()) + W1_NEW_TOKENS)
    if graph_ms is not None:  # the best run's wall per decode token against the graph's device time
        res["decode_graph_ms"] = graph_ms
        res["decode_token_ms"] = 1e3 * (tn - t1) / (W1_NEW_TOKENS - 1)
        # every graph W1's decode steps replay (contexts prompt + 1 .. prompt + new - 1), and their step mean
        contexts = list(range(len(w1_prompt()) + 1, len(w1_prompt()) + W1_NEW_TOKENS))
        by_bound = _decode_graph_ms_by_bound(llm, contexts)
        res["decode_graph_ms_by_bound"] = by_bound
        mean = _steps_mean_ms(by_bound, contexts, llm.engine.runner.graphs.variant)
        if mean is not None:
            res["decode_graph_ms_steps"] = mean
    if clocks:
        res["sm_clock_mhz_min_median"] = [min(clocks), statistics.median(clocks)]
    if ns.curve:
        res["decode_tok_s_by_batch"] = _decode_curve(llm, [int(b) for b in ns.curve.split(",")])
    hf_config = llm.engine.config.model_config.hf_config
    _free_gpu(llm)
    if not ns.no_baseline and not _split(ns):
        from meshserve.bench.hf_baseline import hf_model_from_config, hf_w1_tok_per_s

        hf = hf_model_from_config(hf_config)
        res["hf_static_tok_s"] = hf_w1_tok_per_s(hf, w1_prompt(), W1_NEW_TOKENS)
        res["ratio_vs_hf"] = res["tok_s"] / res["hf_static_tok_s"]
        del hf
        _free_gpu()
    return res


def run_throughput(ns) -> dict:
    _need_gpu("throughput")
    import torch

    from meshserve import SamplingParams

    gpu = torch.cuda.get_device_name(0)
    reqs = w2_requests()
    t0 = time.perf_counter()
    llm = _llm(ns)
    start_s = time.perf_counter() - t0
    prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in reqs]
    params = [SamplingParams(temperature=W2_TEMPERATURE, max_tokens=r.max_tokens, ignore_eos=True) for r in reqs]
    llm.generate(prompts[:4], SamplingParams(max_tokens=8), use_tqdm=False)  # warm-up
    runs, gpu_runs = [], []
    for _ in range(ns.repeat):
        # each run from a cold prefix cache: a repeat would otherwise skip its prompts' prefill
        if not llm.reset_prefix_cache():
            raise RuntimeError("W2 repeat: sequences still hold KV blocks after the previous run")
        torch.cuda.synchronize()
        power: list[float] = []
        with _sm_clock_samples(power=power) as clocks:
            t = time.perf_counter()
            outs = llm.generate(prompts, params, use_tqdm=False)
            torch.cuda.synchronize()
            runs.append(time.perf_counter() - t)
        if clocks:  # was a slower run a lower clock (a power cap)? W2 moved 3-6% between processes
            gpu_runs.append({"sm_mhz_min_median": [min(clocks), statistics.median(clocks)],
                             "power_w_median_max": [statistics.median(power), max(power)] if power else None})
    dt = statistics.median(runs)
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    n_in = sum(len(r.prompt_token_ids) for r in reqs)
    stats = llm.engine.stats()
    res = {"bench": "throughput (W2)", "gpu": gpu, "model": ns.model, **_layout(ns), "start_s": start_s,
           "seconds": dt,
           "output_tokens": n_out, "output_tok_s": n_out / dt, "total_tok_s": (n_out + n_in) / dt,
           "preemptions": stats["num_preemptions"], "kv_blocks": stats["num_blocks"]}
    if ns.repeat > 1:  # "seconds" is then the median run's
        res["seconds_runs"] = [round(x, 4) for x in runs]
    if gpu_runs:  # one entry a timed run
        res["gpu_clock_runs"] = gpu_runs
    if ns.pipeline_parallel_size > 1:
        # the engine keeps one step per stage in flight, so stages fill and drain once per run, not per step:
        # the ideal bubble is ~0 and what is measured is the stages' imbalance and host time
        res["pp_bubble"] = stats["pp_bubble"]
    hf_config = llm.engine.config.model_config.hf_config
    _free_gpu(llm)
    print_table({k: v for k, v in res.items() if not isinstance(v, dict)})  # before the baseline runs
    if not ns.no_baseline and not _split(ns):
        from meshserve.bench.hf_baseline import (
            hf_continuous_batching_tok_per_s,
            hf_model_from_config,
            hf_padded_batches_tok_per_s,
        )

        prompts = [r.prompt_token_ids for r in reqs]
        res["hf_max_new_tokens"] = ns.hf_max_new_tokens
        try:
            hf = hf_model_from_config(hf_config, attn_implementation="paged|sdpa")
            res["hf_output_tok_s"] = hf_continuous_batching_tok_per_s(hf, prompts, ns.hf_max_new_tokens)
            res["hf_mode"] = "generate_batch (continuous batching, paged attention)"
        except Exception as e:  # an HF API change must not lose our own numbers
            logger.warning("HF continuous batching failed (%s); measuring padded batches", e)
            hf = None
            _free_gpu()
            hf = hf_model_from_config(hf_config)
            res["hf_output_tok_s"] = hf_padded_batches_tok_per_s(hf, prompts, ns.hf_max_new_tokens)
            res["hf_mode"] = "generate, left-padded batches of 64"
        res["ratio_vs_hf"] = res["output_tok_s"] / res["hf_output_tok_s"]
        del hf
        _free_gpu()
    return res


def calibration_rows(res: dict) -> list[dict]:
    """The result as rows in the planner's calibration schema (meshserve plan --calibrate)."""
    base = {"gpu": res["gpu"], "model": res["model"], "tp": res.get("tp", 1), "pp": res.get("pp", 1), "dp": 1}
    if res["bench"].startswith("latency"):
        rows = [dict(base, workload="W1", batch=1, output_tok_per_s=res["tok_s"])]
        for batch, tok_s in res.get("decode_tok_s_by_batch", {}).items():
            rows.append(dict(base, workload=f"decode-b{batch}", batch=int(batch), input_len=128,
                             output_len=128, output_tok_per_s=tok_s))
        return rows
    return [dict(base, workload="W2", batch=min(256, res.get("max_num_seqs", 256)),
                 output_tok_per_s=res["output_tok_s"])]


def _finish(ns, res: dict) -> int:
    print_table({k: v for k, v in res.items() if not isinstance(v, dict)})
    for k, v in res.items():
        if isinstance(v, dict):
            print(k, {b: round(x, 1 if abs(x) >= 10 else 4) for b, x in v.items()})  # tok/s, or ms
    res["max_num_seqs"] = ns.max_num_seqs
    write_json(ns.output_json, {"results": calibration_rows(res), **res})
    if getattr(ns, "plot", None) and "decode_tok_s_by_batch" in res:
        from meshserve.bench.plots import plot_decode_curves

        print("plot:", plot_decode_curves(ns.plot, {res["model"]: res["decode_tok_s_by_batch"]}))
    if ns.benchmarks_md:
        # the command as typed, from the subcommand on, without where its own outputs were written
        args = sys.argv[sys.argv.index(ns.bench_command) + 1:] if ns.bench_command in sys.argv else []
        skip = {"--output-json", "--benchmarks-md"}
        kept = [a for i, a in enumerate(args) if a not in skip and (i == 0 or args[i - 1] not in skip)]
        cmd = " ".join(shlex.quote(a) for a in kept)
        if res["bench"].startswith("latency"):
            result = f"{res['tok_s']:,.1f} tok/s (decode {res['decode_tok_s']:,.1f})"
            base = f"HF static cache {res['hf_static_tok_s']:,.1f} tok/s" if "hf_static_tok_s" in res else "-"
            roof = f"{res['pct_roofline']:.0f}% of {res['roofline_tok_s']:,.0f} tok/s"
        else:
            result = f"{res['output_tok_s']:,.0f} output tok/s ({res['total_tok_s']:,.0f} total)"
            base = (f"HF {res['hf_mode']}: {res['hf_output_tok_s']:,.0f} output tok/s "
                    f"(max_new_tokens {res['hf_max_new_tokens']})") if "hf_output_tok_s" in res else "-"
            roof = "-"
        ratio = f"{res['ratio_vs_hf']:.2f}x" if "ratio_vs_hf" in res else "-"
        append_benchmarks_row(ns.benchmarks_md, res["gpu"], f"meshserve bench {ns.bench_command} {cmd}", result,
                              base, ratio, roof)
    return 0


def _batch_sizes_text(text: str) -> str:
    """--curve 1,8,32: checked as whole numbers >= 1, kept as the text run_latency splits."""
    positive_int_list(text)
    return text


def _report_paths_checked(ns: argparse.Namespace) -> argparse.Namespace:
    """The report files can be written: checked before the model loads, not after the run is measured."""
    for flag in ("--output-json", "--benchmarks-md", "--plot"):
        check_output_file(getattr(ns, flag[2:].replace("-", "_"), None), flag)
    return ns


def add_offline_parsers(bench_sub: argparse._SubParsersAction) -> None:
    for name, fn, help_ in (("latency", run_latency, "W1: batch-1 decode vs HF and the roofline"),
                            ("throughput", run_throughput, "W2: offline throughput vs HF continuous batching")):
        p = bench_sub.add_parser(name, help=help_)
        p.add_argument("--model", default="llama-3.1-8b", help="preset or config (dummy weights)")
        p.add_argument("--max-model-len", type=int, default=4096)
        p.add_argument("--max-num-seqs", type=int, default=256)
        p.add_argument("--max-num-batched-tokens", type=int, default=None)
        p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
        p.add_argument("--enforce-eager", action="store_true")
        p.add_argument("--max-cudagraph-tokens", type=int, default=EngineArgs.max_cudagraph_tokens,
                       help="largest mixed prefill+decode step run as a CUDA graph (0: eager)")
        p.add_argument("--no-prefix-caching", action="store_true")
        p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
        p.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1)
        p.add_argument("--pipeline-depth", type=int, default=0, help="steps in flight with -pp (0: one per stage)")
        p.add_argument("--pp-layer-partition", type=_layers_per_stage, default=None,
                       help="layers per pipeline stage, e.g. 17,15 (the last stage also runs the LM head and sampler)")
        p.add_argument("--pp-token-handoff", action="store_true",
                       help="experimental, -pp > 1 with -tp 1: the last stage's sampled ids go straight to the first")
        p.add_argument("--disable-custom-all-reduce", action="store_true", help="NCCL for every TP all-reduce")
        p.add_argument("--enable-expert-parallel", "-ep", action="store_true",
                       help="MoE: experts spread over the TP ranks (all-to-all)")
        p.add_argument("--quantization", "-q", default=None, choices=("fp8", "awq", "gptq"),
                       help="weights quantized at load from the dummy bf16 ones (the roofline counts their bytes)")
        p.add_argument("--kv-cache-dtype", default="auto", choices=("auto", "fp8"))
        p.add_argument("--hf-overrides", type=json_dict, default=JsonDict(), metavar="JSON",
                       help='fields set on the preset\'s HF config, e.g. {"num_hidden_layers": 4}; with -q gptq, '
                            '{"quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 128, '
                            '"desc_act": true}} quantizes the dummy weights act-order (the sorted int4 path; with --no-baseline)')
        p.add_argument("--no-baseline", action="store_true", help="skip HF transformers")
        p.add_argument("--output-json", default=None)
        p.add_argument("--step-trace", default=None, metavar="FILE",
                       help="a JSON line per engine step (shape, predicted and measured time), as `serve "
                            "--step-trace`: what the simulator's step-time fits read (meshserve/simulator)")
        p.add_argument("--benchmarks-md", default=None, help="append a row to this BENCHMARKS.md")
        if name == "latency":
            p.add_argument("--curve", default=None, type=_batch_sizes_text,
                           help="decode tok/s at these batch sizes, e.g. 1,8,32,64")
            p.add_argument("--plot", default=None,
                           help="with --curve: decode tok/s and step time vs batch (.png needs matplotlib)")
        else:
            p.add_argument("--hf-max-new-tokens", type=positive_int, default=128,
                           help="HF baseline's new tokens per prompt (its full W2 takes minutes)")
            p.add_argument("--repeat", type=positive_int, default=1,
                           help="timed W2 runs in this process, each from a cold prefix cache; the median is "
                                "reported, every run in seconds_runs (W2 moved 3-6%% between processes)")
        p.set_defaults(func=lambda ns, fn=fn: _finish(ns, fn(_report_paths_checked(ns))))
