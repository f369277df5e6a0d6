"""Plain-text rendering of a plan: a header on the model, one table row per layout, one line per rejection."""

from __future__ import annotations

from meshserve.planner.memory import kv_bytes, kv_bytes_per_token, kv_dtype_bytes, weight_bytes
from meshserve.planner.moe_comm import ep_traffic, tp_moe_all_reduce_bytes
from meshserve.planner.plan import Candidate, PlanResult, max_running_per_replica

GB = 1e9
COLUMNS = [("#", 3), ("layout", 16), ("GB/GPU", 12), ("weights", 8), ("KV", 7), ("max conc", 9), ("conc", 6),
           ("TTFT ms", 9), ("ITL ms", 8), ("decode tok/s", 12), ("out tok/s", 10), ("roofline", 10),
           ("$/1M out", 9)]


def model_summary(result: PlanResult) -> list[str]:
    """Parameters, weight bytes and the KV arithmetic, spelled out (GQA: KV heads, not query heads)."""
    m, r = result.request.model, result.request
    if m.is_moe:
        params = (f"{m.total_params / 1e9:.2f} B parameters ({m.active_params / 1e9:.2f} B active per token: "
                  f"{m.num_experts} experts, top-{m.experts_per_token})")
    else:
        params = f"{m.total_params / 1e9:.2f} B parameters"
    per_token = kv_bytes_per_token(m, r.kv_dtype)
    seq = kv_bytes(m, result.max_model_len, 1, r.kv_dtype)
    window = f", sliding window {m.sliding_window:,}" if m.sliding_window else ""
    if m.is_mla:
        kv_terms = (f"{m.num_layers} layers × ({m.kv_lora_rank} latent + {m.qk_rope_head_dim} rotary key, MLA: "
                    f"one per token, replicated over TP)")
    else:
        kv_terms = f"2 × {m.num_layers} layers × {m.num_kv_heads} KV heads × {m.head_dim} head dim"
    return [
        f"model    {params}; weights {weight_bytes(m, result.weight_dtype) / GB:.1f} GB in {result.weight_dtype}",
        (f"KV       {per_token:,} bytes/token = {kv_terms} × {kv_dtype_bytes(r.kv_dtype)} B; {seq / GB:.1f} GB per "
         f"{result.max_model_len:,}-token sequence{window}"),
    ]


def _row(i: int, c: Candidate) -> list[str]:
    p, mem = c.prediction, c.memory
    return [str(i), c.layout.label, f"{mem.total / GB:.1f}/{mem.budget / GB:.1f}", f"{mem.weights / GB:.1f}",
            f"{mem.kv / GB:.1f}", f"{c.max_concurrency:,}", f"{p.concurrency:,}" + ("*" if c.clamped else ""),
            f"{p.ttft_s * 1e3:,.1f}",
            f"{p.itl_s * 1e3:,.2f}", f"{p.decode_tok_per_s:,.0f}", f"{p.output_tok_per_s:,.0f}", f"{p.roofline_tok_per_s:,.0f}",
            f"{c.cost.usd_per_million_output_tokens:,.3f}"]


def _fmt(cells: list[str]) -> str:
    return "  ".join(cell.rjust(w) if k > 1 else cell.ljust(w) for k, (cell, (_, w)) in enumerate(zip(cells, COLUMNS)))


def _clamp_notes(result: PlanResult) -> list[str]:
    """One footnote per layout predicted below the concurrency asked for, and why."""
    notes = []
    for c in result.candidates:
        if c.clamped:
            r = result.request
            steps = max_running_per_replica(r, c.layout) // r.max_num_seqs  # PP: one batch per step in flight
            per_step = f" x {steps} steps in flight" if steps > 1 else ""
            cap = (f"--max-num-seqs {r.max_num_seqs}{per_step} per replica" if c.limited_by == "max_num_seqs"
                   else "its KV memory")
            notes.append(f"* {c.layout.label}: {c.requested_concurrency:,} concurrent asked, {c.max_concurrency:,} "
                         f"at most ({cap}); predicted at {c.prediction.concurrency:,}, the rest would queue")
    return notes


def _ep_notes(result: PlanResult) -> list[str]:
    """For expert-parallel rows: the bytes each GPU sends per decode step for the MoE layers, as the engine moves
    them (inside its decode CUDA graphs one all-reduce, eager the all-to-all exchange), beside the other way."""
    m, notes = result.request.model, []
    for c in result.candidates:
        step = c.prediction.step
        if c.layout.ep > 1 and step.ep_bytes:
            # the step priced (PP: one step in flight, through the slowest stage), not the whole batch or model
            batch, layers = step.tokens, step.moe_layers
            if step.ep_in_graph:
                eager = ep_traffic(m, c.layout.ep, batch, layers).total
                notes.append(f"EP {c.layout.label}: {step.ep_bytes / 1e6:,.1f} MB sent per GPU per decode step, "
                             f"TP's all-reduce ({layers} MoE layers, {batch:,} tokens): inside its decode CUDA "
                             "graphs the engine runs each rank's experts on every token and sums them; eager "
                             f"(--enforce-eager) the all-to-all exchange sends {eager / 1e6:,.1f} MB")
                continue
            per = " per replica" if c.layout.dp > 1 else ""
            note = (f"EP {c.layout.label}: {step.ep_bytes / 1e6:,.1f} MB sent per GPU per decode step "
                    f"in the all-to-all exchange ({layers} MoE layers, {batch:,} tokens{per})")
            if c.layout.dp > 1:
                note += "; planned only: the engine spreads experts over one replica's TP group"
            else:
                reduce = tp_moe_all_reduce_bytes(m, c.layout.tp, batch, layers)
                note += f"; TP's all-reduce of the same layers: {reduce / 1e6:,.1f} MB"
            notes.append(note)
    return notes


def render_plan(result: PlanResult, gpu_note: str = "") -> str:
    """The human-readable plan `meshserve plan` prints; `gpu_note` says where the GPU came from."""
    r = result.request
    conc = (f"{r.concurrency:,} concurrent" if r.concurrency else
            ("as many as fit" if r.objective == "throughput" else "1 sequence"))
    title = (f"{r.model.name} on {r.num_gpus}× {r.gpu.name} ({r.nodes} node{'s' if r.nodes > 1 else ''}), "
             f"max_model_len {result.max_model_len:,}, KV {r.kv_dtype}, objective {r.objective}")
    workload = (f"workload {r.workload.input_len:,} prompt + {r.workload.output_len:,} output tokens per request; "
                f"concurrency: {conc}; GPU efficiency {r.efficiency or r.gpu.efficiency:.2f}")
    gpu = [f"GPU      {gpu_note}"] if gpu_note else []
    lines = [title, *gpu, *model_summary(result), workload, ""]
    if result.candidates:
        lines.append(_fmt([name for name, _ in COLUMNS]))
        lines.extend(_fmt(_row(i, c)) for i, c in enumerate(result.candidates, 1))
        lines.extend(_clamp_notes(result))
        lines.extend(_ep_notes(result))
        lines.append("")
    if result.rejections:
        lines.append("rejected:")
        lines.extend(f"  {x}" for x in result.rejections)
        lines.append("")
    lines.append(f"chosen: {result.reason}" if result.candidates else f"no fit: {result.reason}")
    if result.hint:
        lines.append(f"hint: {result.hint}")
    price = "assumed" if r.gpu.price_is_assumption else "given"
    lines.append(f"price {price}: ${r.gpu.price_per_hour_usd:.2f} per {r.gpu.name}-hour (edit gpus.toml or "
                 "--hardware-file)")
    if any(c.layout.pp > 1 for c in result.candidates):
        from meshserve.planner.pipeline_host import fitted_host

        host = r.pipeline_host or fitted_host()
        lines.append(f"PP host assumed: {host.step_s * 1e3:g} ms of the engine core per step + {host.round_trip_s * 1e3:g}"
                     f" ms round trip{', token hand-off' if r.pp_token_handoff else ''} (fitted on 2 x H200, 8B; "
                     "--pp-host-step-ms/--pp-round-trip-ms)")
    lines.append("decode tok/s: all sequences decoding; out tok/s: with each request's prefill paid in; roofline: "
                 "decode ceiling, weight bytes per GPU ÷ HBM bandwidth")
    return "\n".join(lines)
