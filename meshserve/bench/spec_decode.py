"""`meshserve bench spec`: acceptance and batch-1 speedup of speculative decoding on real text, or of the
mechanism alone with a proposer of controlled acceptance (--replay).

Real text (default: the embedded SmolLM2 on whatever device): input-grounded tasks (editing given code,
summarising a given passage) where prompt lookup pays, and open chat where it should not. Each workload runs
greedy at batch 1 without speculation, then with it; the outputs must be identical.

--replay P,P,...: dummy weights at real sizes (e.g. llama-3.1-8b on a GPU); the proposer replays the target's
own greedy continuation, each proposed token wrong with probability 1 - P; tok/s at batch 1 against the
acceptance this gives, beside no speculation (and --batch-size for the large-batch cost).

--w1: W1's token-id prompt (no tokenizer needed: dummy weights at real sizes) greedy at --batch-size, without
and with --speculative-config as given, e.g. an EAGLE-3 head with random weights
(spec_decode/eagle3_random_head.py): what a draft step costs, and that the tokens stay exact.
"""

from __future__ import annotations

import argparse
import json
import time

from meshserve.bench.report import print_rows, write_json
from meshserve.bench.workloads import w1_prompt
from meshserve.cli_paths import check_output_file
from meshserve.cli_types import positive_int, positive_int_list

_CODE = """import json
from dataclasses import dataclass


@dataclass
class Order:
    order_id: int
    customer: str
    items: list[str]
    total_cents: int

    def is_large(self) -> bool:
        return self.total_cents > 100_00


def load_orders(path: str) -> list[Order]:
    with open(path) as f:
        rows = json.load(f)
    return [Order(r["order_id"], r["customer"], r["items"], r["total_cents"]) for r in rows]


def large_orders(orders: list[Order]) -> list[Order]:
    return [o for o in orders if o.is_large()]
"""

_PASSAGE = (
    "The Rhine is one of the major European rivers. It begins in the Swiss canton of Graubünden in the "
    "southeastern Swiss Alps, forms part of the Swiss-Austrian, Swiss-Liechtenstein, Swiss-German and then "
    "the Franco-German border, then flows through the German Rhineland and the Netherlands and eventually "
    "empties into the North Sea. The river is about 1,230 kilometres long. It is the second-longest river "
    "in Central and Western Europe, after the Danube. Since Roman times the Rhine has been a vital "
    "navigable waterway, carrying trade and goods deep inland, and it has also served as a defensive "
    "barrier and a frontier between peoples."
)

WORKLOADS = {
    "code-edit": "Rename the class Order to Purchase everywhere in this code and output the whole code:\n\n"
    + _CODE,
    "summarise": "Summarise the following passage in a few sentences, reusing its wording:\n\n" + _PASSAGE,
    "chat": "Write a short story about a lighthouse keeper who finds a message in a bottle.",
}


def _spec_stats(llm, batch: int) -> dict:
    s, gate = llm.engine.core.speculator.stats, llm.engine.core.speculator.gate
    # at the run's batch (the gate's last decision came as the last sequences finished: another bucket)
    measured = gate.measured.times(batch)
    verify_s = gate.measured.verify_seconds(batch)
    return {
        "gate_on": gate.is_on,  # at the end of the run (its last, smallest batches)
        "gate_probes": gate.num_probes,  # steps that speculated while the gate was off
        "gate_plain_probes": gate.num_plain_probes,
        # the gate's measured (plain, verify) step seconds at the run's batch, when it measured both
        "gate_step_s": [round(t, 5) for t in measured] if measured else None,
        # the verify step's device time alone (batch 1 at high acceptance measures no plain step)
        "gate_verify_s": round(verify_s, 5) if verify_s is not None else None,
        "acceptance_rate": round(s.acceptance_rate, 3),
        "mean_accepted_len": round(s.mean_acceptance_length, 2),
        "drafts": s.num_drafts,
        "draft_tokens": s.num_draft_tokens,
        "accepted": s.num_accepted_tokens,
    }


def _timed_generate(llm, prompts, params) -> tuple[list[list[int]], float]:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = llm.generate(prompts, params, use_tqdm=False)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return [o.outputs[0].token_ids for o in out], time.perf_counter() - t


def _engine_kwargs(ns) -> dict:
    kw = {"max_model_len": ns.max_model_len, "dtype": ns.dtype, "enforce_eager": ns.enforce_eager,
          "async_scheduling": ns.async_scheduling}
    if ns.model is not None:
        kw["model"] = ns.model
    if ns.replay or ns.w1:
        kw["load_format"] = "dummy"
    return kw


def _fresh_stats(llm) -> None:
    from meshserve.spec_decode.gate import SpeculationGate
    from meshserve.spec_decode.stats import SpecDecodeStats

    speculator = llm.engine.core.speculator
    speculator.stats = SpecDecodeStats()
    # each point starts as a fresh engine would: no acceptance or step times carried over from the last one
    speculator.gate = SpeculationGate(speculator.gate.k, speculator.gate.step_model)


def run_real_text(ns) -> list[dict]:
    from meshserve import LLM, SamplingParams

    spec = json.loads(ns.speculative_config)
    params = SamplingParams(temperature=0, max_tokens=ns.max_tokens)
    names = list(WORKLOADS) if ns.workload == "all" else [ns.workload]
    base = LLM(**_engine_kwargs(ns))
    tok = base.get_tokenizer()
    prompts = {
        n: [
            tok.apply_chat_template(
                [{"role": "user", "content": WORKLOADS[n]}], add_generation_prompt=True, tokenize=False
            )
        ]
        for n in names
    }
    base.generate(prompts[names[0]], SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up
    baseline = {n: _timed_generate(base, prompts[n], params) for n in names}
    base.shutdown()
    llm = LLM(**_engine_kwargs(ns), speculative_config=spec)
    llm.generate(prompts[names[0]], SamplingParams(max_tokens=4), use_tqdm=False)
    rows = []
    for n in names:
        _fresh_stats(llm)
        out, dt = _timed_generate(llm, prompts[n], params)
        ref, ref_dt = baseline[n]
        rows.append(
            {
                "workload": n,
                "method": spec["method"],
                "k": spec["num_speculative_tokens"],
                "tokens": len(out[0]),
                "base_tok_s": round(len(ref[0]) / ref_dt, 1),
                "spec_tok_s": round(len(out[0]) / dt, 1),
                "speedup": round(ref_dt / dt * len(out[0]) / len(ref[0]), 2),
                "identical": out == ref,
                **_spec_stats(llm, 1),
            }
        )
    llm.shutdown()
    return rows


def run_replay(ns) -> list[dict]:
    from meshserve import LLM, SamplingParams
    from meshserve.spec_decode.replay_proposer import ReplayOracle, ReplayProposer

    params = SamplingParams(temperature=0, max_tokens=ns.max_tokens, ignore_eos=True)
    base = LLM(**_engine_kwargs(ns))
    # W1's ids are < 10001: a tiny test model wraps them; a distinct prompt per row (the replay's key)
    vocab = base.engine.config.model_config.vocab_size
    ids = [t % vocab for t in w1_prompt()[1:]]
    prompts = [{"prompt_token_ids": [i + 1, *ids]} for i in range(ns.batch_size)]
    base.generate(prompts, SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
    ref, ref_dt = _timed_generate(base, prompts, params)
    base.shutdown()
    references = {tuple(p["prompt_token_ids"]): r for p, r in zip(prompts, ref)}
    rows = []
    for k in [int(x) for x in ns.replay_k.split(",")]:
        llm = LLM(**_engine_kwargs(ns), speculative_config={"method": "ngram", "num_speculative_tokens": k})
        vocab = llm.engine.config.model_config.vocab_size
        # warm-up with proposals that all hold: the engine's first verify steps (their one-off costs) and the
        # gate's first measurements fall here, not in the first timed row
        llm.engine.core.speculator.proposer = ReplayProposer(references, k, 0.0, vocab)
        llm.generate(prompts, SamplingParams(max_tokens=4 * (k + 1), ignore_eos=True), use_tqdm=False)
        for p_ok in [float(x) for x in ns.replay.split(",")]:
            proposer = ReplayProposer(references, k, 1.0 - p_ok, vocab)
            llm.engine.core.speculator.proposer = proposer
            if ns.replay_forced:
                runner = llm.engine.core.executor.runner
                requests = llm.engine.core.requests
                runner.sampling.greedy_oracle = ReplayOracle(
                    proposer, runner.device, prompt_of=lambda seq_id: requests[seq_id].prompt_token_ids)
            _fresh_stats(llm)
            out, dt = _timed_generate(llm, prompts, params)
            n = sum(len(o) for o in out)
            rows.append(
                {
                    "k": k,
                    "token_right_p": p_ok,
                    "batch": ns.batch_size,
                    "base_tok_s": round(sum(len(r) for r in ref) / ref_dt, 1),
                    "spec_tok_s": round(n / dt, 1),
                    "speedup": round(ref_dt / dt, 2),
                    "identical": out == ref,
                    **_spec_stats(llm, ns.batch_size),
                }
            )
        llm.shutdown()
    return rows


def _time_drafter(llm) -> dict:
    """Times each on-rank proposal (draft model or EAGLE-3 head: its forwards and its final read of the ids,
    after the target's tokens are known) where the runner is in this process; {} elsewhere."""
    runner = getattr(llm.engine.core.executor, "runner", None)
    drafter = getattr(runner, "drafter", None)
    times: dict = {"calls": 0, "s": 0.0}
    if drafter is None:
        return times
    propose = drafter.propose

    def timed(*args):
        t = time.perf_counter()
        out = propose(*args)
        times["calls"] += 1
        times["s"] += time.perf_counter() - t
        return out

    drafter.propose = timed
    return times


def run_w1(ns) -> list[dict]:
    from meshserve import LLM, SamplingParams

    spec = json.loads(ns.speculative_config)
    ks = [int(k) for k in ns.k.split(",")] if ns.k else [spec["num_speculative_tokens"]]
    params = SamplingParams(temperature=0, max_tokens=ns.max_tokens, ignore_eos=True)
    warm = SamplingParams(max_tokens=4, ignore_eos=True)
    ref = ref_dt = None
    rows = []
    for k in [None, *ks]:  # no speculation first, then each k
        extra = {} if k is None else {"speculative_config": {**spec, "num_speculative_tokens": k}}
        llm = LLM(**_engine_kwargs(ns), **extra)
        # W1's ids are < 10001: a tiny test model wraps them; a distinct first id per row
        vocab = llm.engine.config.model_config.vocab_size
        ids = [t % vocab for t in w1_prompt()[1:]]
        prompts = [{"prompt_token_ids": [i + 1, *ids]} for i in range(ns.batch_size)]
        llm.generate(prompts, warm, use_tqdm=False)
        if k is None:
            ref, ref_dt = _timed_generate(llm, prompts, params)
            llm.shutdown()
            continue
        _fresh_stats(llm)
        draft = _time_drafter(llm)
        out, dt = _timed_generate(llm, prompts, params)
        n, n_ref = sum(len(o) for o in out), sum(len(r) for r in ref)
        rows.append(
            {
                "method": spec["method"],
                "k": k,
                "batch": ns.batch_size,
                "tokens": n,
                "base_tok_s": round(n_ref / ref_dt, 1),
                "spec_tok_s": round(n / dt, 1),
                "speedup": round(ref_dt / dt * n / max(1, n_ref), 3),
                "identical": out == ref,
                "draft_ms": round(1e3 * draft["s"] / draft["calls"], 3) if draft["calls"] else None,
                **_spec_stats(llm, ns.batch_size),
            }
        )
        llm.shutdown()
    return rows


def _probabilities(text: str) -> list[float]:
    """--replay 0.5,0.9: acceptance probabilities in [0, 1]."""
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated probabilities, got {text!r}") from None
    if not values or not all(0 <= v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated probabilities in [0, 1], got {text!r}")
    return text


def _int_list_text(text: str) -> str:
    """K,K,...: checked as whole numbers >= 1, kept as the text the runs split."""
    positive_int_list(text)
    return text


def check_spec_bench_args(ns) -> None:
    """The speculative config and the report path, before any model loads (a bad JSON was a traceback)."""
    from meshserve.spec_decode.config import parse_speculative_config

    parse_speculative_config(ns.speculative_config)
    check_output_file(ns.output_json, "--output-json")


def add_spec_parser(bench_sub: argparse._SubParsersAction) -> None:
    p = bench_sub.add_parser("spec", help="speculative decoding: acceptance and batch-1 speedup")
    p.add_argument(
        "--model", default=None, help="default: the embedded SmolLM2 (real text); a preset with --replay"
    )
    p.add_argument(
        "--speculative-config",
        default='{"method": "ngram", "num_speculative_tokens": 4, '
        '"prompt_lookup_min": 2, "prompt_lookup_max": 4}',
        metavar="JSON",
    )
    p.add_argument("--workload", default="all", choices=["all", *WORKLOADS])
    p.add_argument("--max-tokens", type=positive_int, default=128)
    p.add_argument("--max-model-len", type=positive_int, default=2048)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--no-async-scheduling", dest="async_scheduling", action="store_false",
                   help="schedule each step after the last one's tokens are read (the A/B of async speculation)")
    p.add_argument(
        "--replay",
        default=None,
        type=_probabilities,
        metavar="P,P,...",
        help="controlled acceptance on dummy weights: each proposed token right with probability P",
    )
    p.add_argument("--replay-k", default="2,4,8", type=_int_list_text, help="with --replay: proposal lengths")
    p.add_argument("--replay-forced", action="store_true",
                   help="with --replay: the references stand in for the target's argmax in verification "
                        "(bf16: its near-ties would otherwise end the replay after a few tokens)")
    p.add_argument(
        "--w1",
        action="store_true",
        help="W1's token-id prompt on dummy weights, without and with --speculative-config",
    )
    p.add_argument(
        "--k", default=None, type=_int_list_text, metavar="K,K,...", help="with --w1: num_speculative_tokens to run in turn (default: the config's)"
    )
    p.add_argument("--batch-size", type=positive_int, default=1, help="with --replay or --w1: sequences at once")
    p.add_argument("--output-json", default=None)

    def run(ns) -> int:
        check_spec_bench_args(ns)
        rows = run_replay(ns) if ns.replay else run_w1(ns) if ns.w1 else run_real_text(ns)
        print_rows(rows)
        write_json(ns.output_json, {"bench": "spec", "rows": rows})
        return 0

    p.set_defaults(func=run)
