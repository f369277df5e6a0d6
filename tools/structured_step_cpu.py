"""The engine's host time per decode step with grammars, on the CPU (issue 27): a tiny Llama (2 layers, hidden
64) with SmolLM2's vocabulary (49,152) and tokenizer, dummy weights, async scheduling, B requests at once,
greedy, answers of the schema's length: free, then under the person schema. Reports the mean wall time of an
engine step while all B decode, and inside it the grammar parts: the masks' fill (core), the masks' apply
(sampler), the matchers' accept (scheduler's update, with the rest of the update). With
--tensor-parallel-size 2 (a worker process, gloo) also rank 0's send of each step to the worker (pickle and
broadcast) and its pickled bytes. Run it on main and on a branch to compare (the same file: it patches names
both versions have).

    PYTHONPATH=<checkout> python tools/structured_step_cpu.py --model-dir .smodel/llama-3.1-8b-smol [--batch 64]
        [--tensor-parallel-size 2]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "torch_dtype": "float32"}


def timed(obj, name: str, acc: dict[str, float], label: str | None = None):
    """Accumulate the wall time (acc[label]) and this thread's CPU time (acc[label + "_cpu"]) of obj.name: on a
    shared machine the CPU time is what the call costs, the wall time also what other processes took."""
    fn, label = getattr(obj, name), label or name

    def wrapped(*a, **kw):
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            return fn(*a, **kw)
        finally:
            acc[label] = acc.get(label, 0.0) + time.perf_counter() - t0
            acc[label + "_cpu"] = acc.get(label + "_cpu", 0.0) + time.thread_time() - c0
    setattr(obj, name, wrapped)


def sent_bytes(channel, acc: dict[str, float]) -> None:
    """Count the pickled bytes of what rank 0 sends the workers (the size ObjectChannel._pack frames)."""
    pack = channel._pack

    def wrapped(obj):
        rest = pack(obj)
        acc["sent_bytes"] = acc.get("sent_bytes", 0.0) + channel._size()
        return rest
    channel._pack = wrapped


def run(model: str, batch: int, out_len: int, schema: dict | None, warm: int, tp: int = 1) -> dict[str, float]:
    from meshserve import LLM, SamplingParams
    from meshserve.engine import step_sampler

    llm = LLM(model=model, load_format="dummy", max_model_len=512, max_num_seqs=batch, async_scheduling=True,
              seed=0, tensor_parallel_size=tp)
    try:
        engine, core = llm.engine, llm.engine.core
        tok = llm.get_tokenizer()
        prompts = [tok.apply_chat_template([{"role": "user", "content": f"Extract person {i}: Ann, 3{i % 10}, Oslo."}],
                                           add_generation_prompt=True, tokenize=False) for i in range(batch)]
        params = SamplingParams(temperature=0, max_tokens=out_len, ignore_eos=schema is None,
                                structured_outputs={"json": schema} if schema else None)
        llm.generate(prompts[:4], params, use_tqdm=False)  # compile the grammar, warm the paths
        acc: dict[str, float] = {}
        timed(core, "_fill_grammar_bitmasks", acc)
        timed(core.scheduler, "update_after_step", acc)
        timed(step_sampler, "apply_bitmask", acc)
        keys = ["_fill_grammar_bitmasks", "apply_bitmask", "update_after_step"]
        # the rest of the step's host work, and the work a GPU would do (forward, logits, argmax: on this CPU)
        runner = core.executor.runner
        timed(core, "_schedule", acc)
        timed(core, "_process", acc)
        timed(core, "_outputs", acc)
        timed(runner, "_prepare", acc)
        timed(runner, "_run_forward", acc)
        timed(runner.sampling.model, "compute_logits", acc)
        timed(step_sampler, "sample_rows", acc)
        timed(engine, "step", acc, "engine_step")
        keys += ["_schedule", "_process", "_outputs", "_prepare", "_run_forward", "compute_logits", "sample_rows",
                 "engine_step"]
        if tp > 1:  # rank 0's send of each step (and every other call) to the worker
            timed(core.executor, "_broadcast", acc)
            sent_bytes(core.executor._calls, acc)
            keys += ["_broadcast", "sent_bytes"]
        for i, p in enumerate(prompts):
            engine.add_request(f"r{i}", p, params)
        steps, walls, tokens = 0, [], 0
        while engine.has_unfinished_requests():
            decoding = core.scheduler.num_running == batch and core.scheduler.num_waiting == 0
            before = dict(acc)
            t0 = time.perf_counter()
            outs = engine.step()
            wall = time.perf_counter() - t0
            steps += 1
            tokens += sum(1 for _ in outs)
            if decoding and steps > warm:
                walls.append((wall, {k: acc.get(k, 0.0) - before.get(k, 0.0) for k in acc}))
        n = max(1, len(walls))
        res = {"steps_measured": len(walls), "step_ms": statistics.mean(w for w, _ in walls) * 1e3 if walls else 0.0}
        for key in keys:
            per_step = sum(parts.get(key, 0.0) for _, parts in walls) / n
            res[key if key == "sent_bytes" else f"{key}_ms"] = per_step if key == "sent_bytes" else per_step * 1e3
            if key != "sent_bytes":
                res[f"{key}_cpu_ms"] = sum(parts.get(key + "_cpu", 0.0) for _, parts in walls) / n * 1e3
        return res
    finally:
        llm.shutdown()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model-dir", required=True, help="a folder with SmolLM2's tokenizer (make_structured_model.py)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--output-len", type=int, default=47, help="the free answers' length (the schema's mean)")
    p.add_argument("--warm", type=int, default=3, help="decode steps skipped before measuring")
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--output-json", default=None)
    ns = p.parse_args()
    from meshserve.bench.serve_structured import data_path

    schema = json.loads(Path(data_path("person_schema.json")).read_text())
    work = Path(tempfile.mkdtemp(prefix="structcpu-"))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(ns.model_dir) / name, work / name)
    config = json.loads((Path(ns.model_dir) / "config.json").read_text())
    (work / "config.json").write_text(json.dumps({**config, **TINY}))
    results = {}
    for label, sch in (("free", None), ("schema", schema)):
        results[label] = run(str(work), ns.batch, ns.output_len if sch is None else 128, sch, ns.warm,
                             ns.tensor_parallel_size)
        r = results[label]
        sends = (f"; send to the worker {r['_broadcast_ms']:.3f} ms, {r['sent_bytes'] / 1e3:.1f} KB"
                 if ns.tensor_parallel_size > 1 else "")
        print(f"{label}: {r['steps_measured']} decode steps of {ns.batch}: step {r['step_ms']:.2f} ms; fill "
              f"{r['_fill_grammar_bitmasks_ms']:.3f}, apply {r['apply_bitmask_ms']:.3f}, scheduler update "
              f"{r['update_after_step_ms']:.3f} ms{sends}", flush=True)
    print("CPU ms per decode step (this thread's): " + " ".join(f"{k[:-7]} {results['free'].get(k, 0):.3f}/"
          f"{results['schema'][k]:.3f}" for k in results["schema"] if k.endswith("_cpu_ms")) + " (free/schema)")
    if ns.output_json:
        Path(ns.output_json).write_text(json.dumps(results, indent=2))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
