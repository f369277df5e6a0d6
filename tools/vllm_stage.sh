#!/usr/bin/env bash
# Stage vLLM 0.26 (the same-machine peer, ../shared/tools/vllm-peer) for a device session, in uploads that fit
# the 64 MiB carry limit beside this tree (~13 MB): the peer's prepare.sh makes 58 MiB parts, too big for that,
# so this re-splits the wheel into 50 MiB parts (.vp1-.vp3 hold one each), puts the other wheels into .vp4 and
# .vp5 (45 MiB each at most), and gives .vp4 the peer's scripts plus what meshserve's issues need beside them:
# configs for qwen3-30b-a3b and deepseek-v2-lite written from meshserve's presets, and a bench.py that takes
# QUANT (e.g. fp8) and KV_DTYPE (e.g. fp8) from the environment for vLLM's quantization / kv_cache_dtype.
# Usage (here, repo root, ~2 min; downloads ~380 MB from the package registry):  bash tools/vllm_stage.sh
# Then on the device, five calls back to back (the machine keeps /root/vstage while warm, ~30 s between calls):
#   carry [".vp1"]: mkdir -p /root/vstage && cp .vp1/* /root/vstage/     (likewise .vp2, .vp3, then .vp5)
#   carry [".vp4"]: [QUANT=fp8 KV_DTYPE=fp8] bash .vp4/run.sh .vp4 MODEL:w1,w2 ...   (installs, then runs)
set -euo pipefail
cd "$(dirname "$0")/.."
peer=../shared/tools/vllm-peer
for p in /.vllm-peer/ /.vp1/ /.vp2/ /.vp3/ /.vp4/ /.vp5/; do
  grep -qxF "$p" .git/info/exclude 2> /dev/null || echo "$p" >> .git/info/exclude
done
[ -f .vllm-peer/vllm-0.26.0-cp38-abi3-manylinux_2_28_x86_64.whl ] || bash $peer/prepare.sh > /dev/null
python3 - "$peer" << 'PY'
import json, os, shutil, subprocess, sys
peer, src = sys.argv[1], ".vllm-peer"
wheel = f"{src}/vllm-0.26.0-cp38-abi3-manylinux_2_28_x86_64.whl"
for d in (".vp1", ".vp2", ".vp3", ".vp4", ".vp5"):
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
for f in os.listdir(src):
    if f.startswith("vllmpart."):
        os.remove(f"{src}/{f}")
subprocess.run(["split", "-b", "50M", "-d", "-a", "1", wheel, f"{src}/vllmpart."], check=True)
parts = sorted(f for f in os.listdir(src) if f.startswith("vllmpart."))
if len(parts) > 4:
    raise SystemExit(f"{len(parts)} parts of 50 MiB: more than .vp1-.vp3 and .vp5 hold")
for i, part in enumerate(parts[:3]):
    shutil.copy(f"{src}/{part}", f".vp{i + 1}")
used = {".vp4": 0, ".vp5": 0}
for part in parts[3:]:  # the wheel's tail, if any
    shutil.copy(f"{src}/{part}", ".vp5")
    used[".vp5"] += os.path.getsize(f"{src}/{part}")
cap = 45 * 2**20
others = [f for f in os.listdir(src) if f.endswith(".whl") and not f.startswith("vllm-")]
for size, f in sorted(((os.path.getsize(f"{src}/{f}"), f) for f in others), reverse=True):
    home = next((d for d in used if used[d] + size <= cap), None)
    if home is None:
        raise SystemExit(f"no room for {f}")
    shutil.copy(f"{src}/{f}", home)
    used[home] += size
for name in ("bench.py", "run.sh", "serve.sh", "env.sh", "make_tokenizer.py"):
    shutil.copy(f"{peer}/{name}", ".vp4")
for model in ("llama-3.1-8b", "qwen3-0.6b"):
    shutil.copytree(f"{peer}/{model}", f".vp4/{model}")
sys.path.insert(0, ".")
from meshserve.models.presets import PRESETS  # noqa: E402 (the repo's own presets, no heavy imports)
for model in ("qwen3-30b-a3b", "deepseek-v2-lite"):
    os.makedirs(f".vp4/{model}")
    with open(f".vp4/{model}/config.json", "w") as f:
        json.dump(PRESETS[model], f, indent=1)
bench = open(".vp4/bench.py").read()
old = "gpu_memory_utilization=0.9, max_model_len=4096, seed=0, enable_prefix_caching=apc)"
new = ("gpu_memory_utilization=0.9, max_model_len=4096, seed=0, enable_prefix_caching=apc,\n"
       "              **({\"quantization\": os.environ[\"QUANT\"]} if os.environ.get(\"QUANT\") else {}),\n"
       "              **({\"kv_cache_dtype\": os.environ[\"KV_DTYPE\"]} if os.environ.get(\"KV_DTYPE\") else {}))\n"
       "    res[\"quantization\"] = os.environ.get(\"QUANT\"); res[\"kv_cache_dtype\"] = os.environ.get(\"KV_DTYPE\")")
if old not in bench:
    raise SystemExit("the peer's bench.py changed: its LLM(...) call is not the one this script extends")
open(".vp4/bench.py", "w").write(bench.replace(old, new))
PY
du -sh .vp1 .vp2 .vp3 .vp4 .vp5
