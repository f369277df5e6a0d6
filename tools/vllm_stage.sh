#!/usr/bin/env bash
# Stage vLLM 0.26 (the same-machine peer, ../shared/tools/vllm-peer) for a device session, in uploads that fit
# the 64 MiB carry limit beside this tree: the peer's prepare.sh makes 58 MiB parts, too big for that, so this
# re-splits the wheel into parts of CAP bytes (64 MiB less this tree's files less 4 MiB; .vp1, .vp2, .vp3, then
# .vp5, .vp6, ... one upload each) and puts the other wheels into the room left there. .vp4 holds no wheels: the
# peer's scripts plus what meshserve's issues need beside them (configs for qwen3-30b-a3b and deepseek-v2-lite
# written from meshserve's presets, and a bench.py that takes QUANT (e.g. fp8) and KV_DTYPE (e.g. fp8) from the
# environment for vLLM's quantization / kv_cache_dtype), so it rides beside .whl in one call: meshserve and vLLM
# back to back (the thirty-eighth session's .vp4 with wheels, 47 MiB, did not fit beside .whl, nor 46 MiB parts
# beside an 18 MB tree).
# Usage (here, repo root, ~2 min; downloads ~380 MB from the package registry):  bash tools/vllm_stage.sh
# Then on the device, one call per folder back to back (the machine keeps /root/vstage while warm, ~30 s between
# calls; the script's last line lists the folders):
#   carry [".vp1"]: mkdir -p /root/vstage && cp .vp1/* /root/vstage/     (likewise .vp2, .vp3, .vp5, ...)
#   carry [".vp4", ".whl", ...]: [QUANT=fp8 KV_DTYPE=fp8] bash .vp4/run.sh .vp4 MODEL:w1,w2 ...   (installs, runs)
# MoE models: vLLM's dummy weights route differently from meshserve's (BENCHMARKS.md, twenty-eighth session); for
# a like-for-like run, after `bash .vp4/run.sh .vp4` (install only):
#   . .vp4/env.sh; VLLM_ALLOW_INSECURE_SERIALIZATION=1 python3 tools/vllm_reinit_bench.py .vp4/bench.py .vp4/MODEL w2
set -euo pipefail
cd "$(dirname "$0")/.."
peer=../shared/tools/vllm-peer
for p in /.vllm-peer/ /.vp1/ /.vp2/ /.vp3/ /.vp4/ /.vp5/ /.vp6/ /.vp7/ /.vp8/ /.vp9/; do
  grep -qxF "$p" .git/info/exclude 2> /dev/null || echo "$p" >> .git/info/exclude
done
[ -f .vllm-peer/vllm-0.26.0-cp38-abi3-manylinux_2_28_x86_64.whl ] || bash $peer/prepare.sh > /dev/null
python3 - "$peer" << 'PY'
import json, os, shutil, subprocess, sys
peer, src = sys.argv[1], ".vllm-peer"
wheel = f"{src}/vllm-0.26.0-cp38-abi3-manylinux_2_28_x86_64.whl"
# every upload is at most CAP: the device tool refuses a call whose tree + carry passes 64 MiB
tree = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], check=True,
                      capture_output=True).stdout.split(b"\0")
tree_bytes = sum(os.path.getsize(f) for f in tree if f and os.path.isfile(f))
CAP = 60 * 2**20 - tree_bytes
if CAP < 16 * 2**20:
    raise SystemExit(f"this tree's files take {tree_bytes / 2**20:.1f} MiB: too little room left for vLLM's parts")
for d in os.listdir("."):
    if d.startswith(".vp") and d[3:].isdigit():
        shutil.rmtree(d)
for f in os.listdir(src):
    if f.startswith("vllmpart."):
        os.remove(f"{src}/{f}")
subprocess.run(["split", "-b", str(CAP), "-d", "-a", "1", wheel, f"{src}/vllmpart."], check=True)
parts = sorted(f for f in os.listdir(src) if f.startswith("vllmpart."))
# .vp4 is the last upload (scripts only; run.sh installs after it): the wheel's parts and the other wheels fill
# .vp1, .vp2, .vp3, .vp5, .vp6, ... in order
names = [".vp1", ".vp2", ".vp3"] + [f".vp{i}" for i in range(5, 10)]
used = {}
for part in parts:
    used[names[len(used)]] = os.path.getsize(f"{src}/{part}")
others = [f for f in os.listdir(src) if f.endswith(".whl") and not f.startswith("vllm-")]
placed = []
for size, f in sorted(((os.path.getsize(f"{src}/{f}"), f) for f in others), reverse=True):
    home = next((d for d in used if used[d] + size <= CAP), None)
    if home is None:
        if len(used) == len(names):
            raise SystemExit(f"no room for {f}")
        home = names[len(used)]
        used[home] = 0
    used[home] += size
    placed.append((f, home))
for d in [*used, ".vp4"]:
    os.makedirs(d, exist_ok=True)
for part, d in zip(parts, used):
    shutil.copy(f"{src}/{part}", d)
for f, d in placed:
    shutil.copy(f"{src}/{f}", d)
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
du -sh .vp[0-9]*
