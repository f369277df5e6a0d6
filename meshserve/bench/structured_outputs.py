"""`meshserve bench structured`: what a JSON schema costs and buys on a real model (default: the embedded
SmolLM2-135M-Instruct, on whatever device).

- accuracy: extraction prompts whose answer is a JSON object of a given schema, answered greedily with and
  without the schema as a constraint (the prompt states the schema either way): the fraction of answers
  that parse as JSON and the fraction that validate against the schema.
- overhead: the median decode step with every sequence constrained vs the same batch free, at each
  --batch-sizes (the prompts cycled to the batch size), so answers of different lengths compare fairly.
- mask fill: the CPU time to fill one step's token bitmasks for B constrained sequences (the model's
  vocabulary, matchers part-way through an answer), which the engine hides behind the forward.
"""

from __future__ import annotations

import argparse
import json
import time

from meshserve.bench.report import print_rows, write_json
from meshserve.cli_paths import check_output_file
from meshserve.cli_types import positive_int, positive_int_list

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "city": {"type": "string", "maxLength": 40},
        "role": {"enum": ["engineer", "doctor", "teacher", "artist", "student", "other"]},
    },
    "required": ["name", "age", "city", "role"],
    "additionalProperties": False,
}
PEOPLE = [
    ("Alice Martin", 34, "Lyon", "engineer"), ("Bob Chen", 51, "Toronto", "doctor"),
    ("Carla Diaz", 27, "Madrid", "teacher"), ("Deepak Rao", 45, "Pune", "engineer"),
    ("Emma Stone", 19, "Leeds", "student"), ("Farid Haddad", 62, "Beirut", "artist"),
    ("Grace Kim", 38, "Seoul", "doctor"), ("Hugo Weber", 23, "Munich", "student"),
    ("Ines Costa", 41, "Porto", "teacher"), ("Jonas Berg", 56, "Oslo", "artist"),
    ("Keiko Sato", 30, "Osaka", "engineer"), ("Liam Walsh", 67, "Dublin", "other"),
    ("Maya Patel", 25, "Leicester", "doctor"), ("Nils Olsen", 48, "Bergen", "teacher"),
    ("Olga Ivanova", 36, "Riga", "artist"), ("Pedro Alves", 22, "Recife", "student"),
    ("Qiu Lin", 44, "Chengdu", "engineer"), ("Rosa Neri", 58, "Turin", "other"),
    ("Sam Okafor", 29, "Lagos", "doctor"), ("Tara Singh", 33, "Delhi", "teacher"),
]
_STYLES = [
    "{name} is a {age}-year-old {role} who lives in {city}.",
    "Meet {name}, {age}, a {role} from {city}.",
    "In {city} there lives a {role} named {name}; {name} is {age} years old.",
    "Profile: {name}. Works as: {role}. Home: {city}. Age: {age}.",
]


def prompts() -> list[str]:
    """Twenty extraction requests, the schema spelled out in each (so the unconstrained model has a fair go)."""
    keys = ", ".join(f'"{k}"' for k in SCHEMA["properties"])
    roles = ", ".join(SCHEMA["properties"]["role"]["enum"])
    out = []
    for i, (name, age, city, role) in enumerate(PEOPLE):
        text = _STYLES[i % len(_STYLES)].format(name=name, age=age, city=city, role=role)
        out.append(f"{text}\nReturn only a JSON object with the keys {keys}: age an integer, role one of "
                   f"{roles}.")
    return out


def _first_object(text: str) -> str:
    """The text from its first "{" to its last "}" (a fenced or prefaced answer, read leniently)."""
    start, end = text.find("{"), text.rfind("}")
    return text[start:end + 1] if 0 <= start < end else text


def score(texts: list[str]) -> dict:
    """Fractions of answers that parse as JSON and that validate against SCHEMA; and of those that do once
    read leniently (from the first "{" to the last "}": code fences and a preface forgiven)."""
    import jsonschema

    def fractions(candidates: list[str]) -> tuple[float, float]:
        parsed = valid = 0
        for text in candidates:
            try:
                obj = json.loads(text)
            except json.JSONDecodeError:
                continue
            parsed += 1
            try:
                jsonschema.validate(obj, SCHEMA)
                valid += 1
            except jsonschema.ValidationError:
                pass
        return round(parsed / len(candidates), 3), round(valid / len(candidates), 3)

    json_ok, schema_ok = fractions(texts)
    _, lenient = fractions([_first_object(t) for t in texts])
    return {"json_ok": json_ok, "schema_ok": schema_ok, "schema_ok_lenient": lenient}


def _chat_prompts(llm, texts: list[str]) -> list[str]:
    tok = llm.get_tokenizer()
    return [tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=False)
            for t in texts]


def run_accuracy(llm, max_tokens: int) -> list[dict]:
    from meshserve import SamplingParams

    chat = _chat_prompts(llm, prompts())
    rows = []
    for constrained in (False, True):
        params = SamplingParams(temperature=0, max_tokens=max_tokens,
                                structured_outputs={"json": SCHEMA} if constrained else None)
        outs = llm.generate(chat, params, use_tqdm=False)
        rows.append({"constraint": "json_schema" if constrained else "none", "prompts": len(chat),
                     **score([o.outputs[0].text.strip() for o in outs])})
    return rows


def _full_batch_step_times(llm, prompt_ids: list[list[int]], params, batch: int, tag: str) -> list[float]:
    """Wall time of each engine step while all `batch` requests decode (prefill steps and the tail, where
    finished requests have left the batch, are left out: outputs of different lengths stay comparable)."""
    engine = llm.engine
    for i in range(batch):
        engine.add_request(f"{tag}-{i}", prompt_ids[i % len(prompt_ids)], params)
    times, finished, step = [], 0, 0
    while engine.has_unfinished_requests():
        t0 = time.perf_counter()
        outs = engine.step()
        dt = time.perf_counter() - t0
        step += 1
        if step > 3 and finished == 0 and outs:
            times.append(dt)
        finished += sum(o.finished for o in outs)
    return times


def run_overhead(llm, batch_sizes: list[int], max_tokens: int, rounds: int = 3) -> list[dict]:
    """Per-token cost of the constraint: the median decode step with all sequences constrained against
    the same batch unconstrained (alternating rounds, so a shared machine's drift hits both)."""
    import statistics

    from meshserve import SamplingParams

    tok = llm.get_tokenizer()
    ids = [tok.encode(p, add_special_tokens=False) for p in _chat_prompts(llm, prompts())]
    free = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    schema = SamplingParams(temperature=0, max_tokens=max_tokens, structured_outputs={"json": SCHEMA})
    llm.generate([ids[0]], schema, use_tqdm=False)  # the compile, once
    rows = []
    for b in batch_sizes:
        times: dict[str, list[float]] = {"free": [], "schema": []}
        for r in range(rounds):
            for name, params in (("free", free), ("schema", schema)):
                times[name] += _full_batch_step_times(llm, ids, params, b, f"{name}-{b}-{r}")
        free_ms, schema_ms = (statistics.median(times[k]) * 1e3 for k in ("free", "schema"))
        rows.append({"batch": b, "free_step_ms": round(free_ms, 2), "schema_step_ms": round(schema_ms, 2),
                     "steps": min(len(v) for v in times.values()),
                     "overhead_per_token": round(schema_ms / free_ms - 1, 3)})
    return rows


def run_mask_fill(llm, batch_sizes: list[int], repeats: int = 50) -> list[dict]:
    """Per-step mask fill time for B matchers at varied points of a valid answer; and the schema's first
    compile against the vocabulary."""
    import xgrammar as xgr

    from meshserve.structured.bitmask import fill_bitmasks
    from meshserve.structured.grammar import compile_structured_outputs
    from meshserve.structured.params import StructuredOutputsParams

    core_compiler = llm.engine.core.grammar_waitlist.compiler
    xgr_compiler = core_compiler._xgr_compiler()
    params = StructuredOutputsParams(json=SCHEMA)
    xgr_compiler.clear_cache()
    t0 = time.perf_counter()
    compiled = compile_structured_outputs(xgr_compiler, params)
    compile_s = time.perf_counter() - t0
    answer = json.dumps({"name": "Alice Martin", "age": 34, "city": "Lyon", "role": "engineer"})
    ids = llm.get_tokenizer().encode(answer, add_special_tokens=False)
    vocab = core_compiler.vocab_size
    rows = []
    for b in batch_sizes:
        matchers = []
        for i in range(b):
            m = xgr.GrammarMatcher(compiled)
            for t in ids[: i % len(ids)]:
                assert m.accept_token(t)
            matchers.append(m)
        fill_bitmasks(matchers, vocab)
        t0 = time.perf_counter()
        for _ in range(repeats):
            fill_bitmasks(matchers, vocab)
        dt = (time.perf_counter() - t0) / repeats
        rows.append({"batch": b, "vocab": vocab, "fill_ms_per_step": round(dt * 1e3, 3),
                     "us_per_sequence": round(dt * 1e6 / b, 1), "first_compile_ms": round(compile_s * 1e3, 1)})
    return rows


PARTS = ("accuracy", "overhead", "mask")


def _parts(text: str) -> list[str]:
    parts = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [x for x in parts if x not in PARTS]
    if not parts or unknown:
        raise argparse.ArgumentTypeError(f"expected any of {', '.join(PARTS)}, got {text!r}")
    return parts


def add_structured_parser(bench_sub: argparse._SubParsersAction) -> None:
    p = bench_sub.add_parser("structured", help="structured outputs: JSON-schema accuracy, overhead, mask fill")
    p.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--parts", default="accuracy,overhead,mask", type=_parts,
                   help="any of accuracy, overhead, mask")
    p.add_argument("--batch-sizes", default="1,16", type=positive_int_list,
                   help="overhead: sequences at once (e.g. 1,64 on a GPU)")
    p.add_argument("--mask-batch-sizes", default="1,16,64", type=positive_int_list)
    p.add_argument("--max-tokens", type=positive_int, default=96)
    p.add_argument("--max-model-len", type=positive_int, default=1024)
    p.add_argument("--output-json", default=None)

    def run(ns) -> int:
        from meshserve import LLM

        check_output_file(ns.output_json, "--output-json")  # before the model loads: the results must not be lost
        llm = LLM(model=ns.model, max_model_len=ns.max_model_len)
        parts, results = ns.parts, {}
        try:
            if "accuracy" in parts:
                results["accuracy"] = run_accuracy(llm, ns.max_tokens)
            if "overhead" in parts:
                results["overhead"] = run_overhead(llm, ns.batch_sizes, ns.max_tokens)
            if "mask" in parts:
                results["mask_fill"] = run_mask_fill(llm, ns.mask_batch_sizes)
        finally:
            llm.shutdown()
        for name, rows in results.items():
            print(f"\n{name}")
            print_rows(rows)
        write_json(ns.output_json, {"bench": "structured", **results})
        return 0

    p.set_defaults(func=run)
