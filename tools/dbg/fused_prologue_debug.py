import os, sys, traceback
import torch
from types import SimpleNamespace
from meshserve.kernels.triton_ops import qkv_rope_cache, qkv_rope_cache_ref
from meshserve.layers.rotary import RotaryEmbedding

for dtype in (torch.float32, torch.bfloat16):
    for nb in (64, 300000):
        h, hkv, d, t = 32, 8, 128, 512
        rope = RotaryEmbedding(SimpleNamespace(rope_theta=500000.0, rope_scaling=None), d, 1024).cuda()
        qkv = torch.randn(t, (h + 2 * hkv) * d, device="cuda").to(dtype)
        pos = torch.arange(t, device="cuda")
        slots = torch.arange(t, device="cuda")
        cache = torch.zeros(2, nb, 16, hkv, d, dtype=dtype, device="cuda")
        try:
            q = qkv_rope_cache(qkv, pos, rope.cos_cache, rope.sin_cache, None, None, 1e-6, cache, slots, h, hkv)
            torch.cuda.synchronize()
            print("ok", dtype, nb, cache.stride(0))
        except Exception as e:
            print("FAIL", dtype, nb, cache.stride(0), str(e)[:200])
            sys.exit(1)
        del cache
