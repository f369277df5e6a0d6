"""Per-expert load counters: every routed (token, slot) of every MoE layer counted once, read by the core."""

from __future__ import annotations

from meshserve import LLM, SamplingParams
from meshserve.engine.expert_load import ExpertLoadReader


def test_core_reports_tokens_routed_per_expert(tiny_model_dir):
    llm = LLM(model=tiny_model_dir("qwen3_moe"), enable_prefix_caching=False)
    try:
        prompts = [[5, 6, 7, 8, 9], list(range(10, 40))]
        llm.generate([{"prompt_token_ids": p} for p in prompts],
                     SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
        load = llm.engine.stats()["expert_load"]
        cfg = llm.engine.config.model_config.hf_config
    finally:
        llm.shutdown()
    # layer 0 is sparse (layer 1 dense: mlp_only_layers); each forwarded token goes to top_k experts once
    forwarded = sum(len(p) for p in prompts) + 3 * len(prompts)  # the last sampled token is never forwarded
    assert len(load) == 1 and len(load[0]) == cfg.num_experts
    assert sum(load[0]) == cfg.num_experts_per_tok * forwarded
    assert sum(1 for n in load[0] if n > 0) > cfg.num_experts_per_tok  # the router spreads the tokens


def test_reader_polls_at_most_once_a_period():
    class Runner:
        model = type("M", (), {"expert_layers": lambda self: [1]})()
        reads = 0

        def expert_load(self):
            self.reads += 1
            return [[self.reads]]

    runner = Runner()
    reader = ExpertLoadReader(runner, period_s=3600)
    assert reader.poll() == [[1]] and reader.poll() == [] and reader.poll(force=True) == [[2]]
    dense = ExpertLoadReader(type("R", (), {"model": object()})())
    assert dense.poll(force=True) == []


def test_metrics_export_the_last_published_counts():
    from meshserve.serve.metrics import ServerMetrics

    metrics = ServerMetrics()
    text = metrics.render(({"num_running": 1, "expert_load": [[3, 0], [1, 2]]}, 0.1)).decode()
    assert 'meshserve:moe_expert_tokens_total{expert="0",moe_layer="0"} 3.0' in text
    assert 'meshserve:moe_expert_tokens_total{expert="1",moe_layer="1"} 2.0' in text
    # a later step without counts (not due for a read) keeps the last ones
    text = metrics.render(({"num_running": 0}, 0.1)).decode()
    assert 'meshserve:moe_expert_tokens_total{expert="1",moe_layer="1"} 2.0' in text
    assert "moe_expert_tokens" not in ServerMetrics().render(({"num_running": 0}, 0.1)).decode()
