"""vLLM 0.26 at tensor parallel on the same machine (issue 21's peer row): W1 (batch-1 decode, the draws of
../shared/tools/vllm-peer/bench.py: random.seed(0), a 128-token prompt, 256 new tokens, best of three) and
decode tok/s at the batch sizes asked, for a dummy-weight model whose config.json comes from meshserve's preset.

usage (device, after the vLLM staging of ../shared/tools/vllm-peer/README.md; tools/vllm_tp_device.sh runs it):
  python3 tools/vllm_tp_peer.py MODEL TP [BATCHES]     e.g.  llama-3.1-70b 2 1,32
Prints one `RESULT {...}` line.
"""

import json
import os
import random
import sys
import time


def write_config(model: str, root: str) -> str:
    """A folder holding the preset's config.json (vLLM reads only that with load_format=dummy)."""
    from meshserve.models.presets import PRESETS

    path = os.path.join(root, model)
    os.makedirs(path, exist_ok=True)
    config = dict(PRESETS[model])
    config.setdefault("architectures", ["LlamaForCausalLM"])
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    return path


def decode_tok_s(llm, prompts, n: int) -> float:
    """Decode tokens per second over n - 1 steps: a run of n new tokens minus a run of 1 (the prefill)."""
    from vllm import SamplingParams

    def timed(max_tokens: int) -> float:
        sp = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=max_tokens, detokenize=False)
        llm.generate(prompts, sp, use_tqdm=False)
        t = time.perf_counter()
        llm.generate(prompts, sp, use_tqdm=False)
        return time.perf_counter() - t

    return len(prompts) * (n - 1) / (timed(n) - timed(1))


def main(model: str, tp: int, batches: list[int]) -> None:
    import torch
    import vllm
    from vllm import LLM, SamplingParams

    res = {"model": model, "tp": tp, "vllm": vllm.__version__, "gpu": torch.cuda.get_device_name(0),
           "gpus": torch.cuda.device_count()}
    t0 = time.perf_counter()
    llm = LLM(model=write_config(model, "/tmp/vllm-tp-models"), load_format="dummy", skip_tokenizer_init=True,
              dtype="bfloat16", tensor_parallel_size=tp, gpu_memory_utilization=0.9, max_model_len=4096, seed=0)
    res["start_s"] = time.perf_counter() - t0
    random.seed(0)
    prompt = [{"prompt_token_ids": [random.randint(0, 10000) for _ in range(128)]}]
    best = {}
    for n in (1, 256):
        sp = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=n, detokenize=False)
        best[n] = 1e9
        for _ in range(3):
            t = time.perf_counter()
            llm.generate(prompt, sp, use_tqdm=False)
            best[n] = min(best[n], time.perf_counter() - t)
    res["w1_tok_s_end_to_end"] = 256 / best[256]
    res["w1_decode_tok_s"] = 255 / (best[256] - best[1])
    random.seed(2)
    res["decode_tok_s_by_batch"] = {
        bs: decode_tok_s(llm, [{"prompt_token_ids": [random.randint(0, 10000) for _ in range(128)]}
                               for _ in range(bs)], 128) for bs in batches}
    print("RESULT " + json.dumps(res), flush=True)


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit("usage: vllm_tp_peer.py MODEL TP [BATCHES, e.g. 1,32]")
    main(sys.argv[1], int(sys.argv[2]), [int(b) for b in sys.argv[3].split(",")] if len(sys.argv) > 3 else [])
