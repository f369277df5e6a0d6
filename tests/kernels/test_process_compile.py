"""The process-pool pre-compile (kernels/compile_job.py, kernels/process_compile_pool.py) without a GPU: a real
meshserve kernel's specialization compiled for sm_90 in a spawned child lands in the shared TRITON_CACHE_DIR
under the key this process's own compile of it looks up (a cache hit: no compile stage runs here, no entry is
added); the same through Triton's real AsyncCompileMode closure (JITFunction._do_compile) on the pool; and a
child whose kernel hashes differently (its source changed under it) fails the job, the kernel then compiling
here. The scripts run outside the interpreter, in tests/kernels/sm90.py's worker."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

from tests.kernels.sm90 import assert_compiles_for_sm90  # noqa: E402

_COMMON = r"""
import os, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.compiler.compiler import get_cache_invalidating_env_vars
from meshserve.kernels import compile_job, process_compile_pool
from meshserve.kernels.triton_ops import _rms_norm_kernel

cache = tempfile.mkdtemp(prefix="pc-cache-")
os.environ["TRITON_CACHE_DIR"] = cache
triton.knobs.cache.dir = cache
target = GPUTarget("cuda", 90, 32)
backend = make_backend(target)

def rms_spec(block):
    # as JITFunction.run specializes a launch: pointers divisible by 16, stride 1 of the last dim gone
    names = list(_rms_norm_kernel.arg_names)
    ptrs = dict(x_ptr="*bf16", res_ptr="*bf16", w_ptr="*bf16", out_ptr="*bf16", res_out_ptr="*bf16")
    const = dict(HAS_RESIDUAL=True, BLOCK=block, USE_GDC=False)
    sig = {n: "constexpr" if n in const else ptrs.get(n, "fp32" if n == "eps" else "i32") for n in names}
    constexprs = {(names.index(n),): v for n, v in const.items()}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in ptrs}
    return sig, constexprs, attrs

def entries():
    return sorted(os.path.relpath(os.path.join(d, f), cache) for d, _, fs in os.walk(cache) for f in fs
                  if ".tmp." not in f and f != "lock")

def compile_stages_forbidden():
    # the parent's compile() must find the child's entry: reaching the stages means a miss
    def no_stages(self, *a, **k):
        raise AssertionError("compiled in the parent: the child's cache entry was missed")
    type(backend).add_stages = no_stages
"""

_KEY_MATCH = _COMMON + r"""
sig, constexprs, attrs = rms_spec(4096)
src = ASTSource(_rms_norm_kernel, sig, constexprs, attrs)
options = backend.parse_options({"num_warps": 8, "num_stages": 3})
env_vars = get_cache_invalidating_env_vars()
job = compile_job.make_job(src, target, options, env_vars)
assert job.cache_dir == cache and job.fn.qualname == "_rms_norm_kernel"
done = process_compile_pool.compile_processes(2).submit(compile_job.run_job, job).result(timeout=240)
assert done.key == job.key, (done.key, job.key)
before = entries()
from triton.runtime.cache import get_cache_manager
entry = os.path.relpath(get_cache_manager(job.key).cache_dir, cache)  # the directory compile() keys by job.key
assert entry + os.sep + "_rms_norm_kernel.cubin" in before, (entry, before)

original_add_stages = type(backend).add_stages
compile_stages_forbidden()
try:
    kernel = triton.compile(src, target=target, options=options.__dict__, _env_vars=env_vars)
finally:
    type(backend).add_stages = original_add_stages
assert entries() == before, "the parent's compile wrote a new cache entry"
assert kernel.hash == job.key and kernel.asm["cubin"], kernel.hash
print("compiled", done.seconds, "s in the child")
"""

_THROUGH_ASYNC_COMPILE = _COMMON + r"""
from triton.runtime._async_compile import AsyncCompileMode

# JITFunction._do_compile's own closure, as a deferred launch makes it, without a device: the per-device
# caches create_binder would build for the current GPU are those of the sm_90 target
kernel_fn = _rms_norm_kernel
kernel_fn.device_caches[0] = ({}, {}, target, backend, None)
kernel_fn.ASTSource, kernel_fn.compile = ASTSource, triton.compile
sig, constexprs, attrs = rms_spec(2048)
options = backend.parse_options({"num_warps": 4, "num_stages": 3})

original_add_stages = type(backend).add_stages
compile_stages_forbidden()  # this process only loads; the child compiles (its backend class is its own)
pool = process_compile_pool.ProcessCompilePool(process_compile_pool.compile_processes(2), max_workers=2)
try:
    with AsyncCompileMode(pool) as mode:
        future = kernel_fn._do_compile("spec", sig, 0, constexprs, options, attrs, warmup=True)
    kernel = future.result()
finally:
    type(backend).add_stages = original_add_stages
    pool.shutdown()
assert (pool.in_processes, pool.fallbacks) == (1, 0), (pool.in_processes, pool.fallbacks)
assert kernel_fn.device_caches[0][0]["spec"] is kernel and kernel.asm["cubin"]
assert len(pool.build_seconds) == 1 and pool.build_seconds[0] > 0.05  # the child's compile is counted

# the pass itself (kernels/parallel_compile.compile_in_parallel): two more specializations, both in processes
from meshserve.kernels.parallel_compile import compile_in_parallel

def steps():
    for block in (1024, 512):
        kernel_fn._do_compile(("pass", block), *rms_spec(block)[:1], 0, rms_spec(block)[1], options,
                              rms_spec(block)[2], warmup=True)

compile_stages_forbidden()
try:
    done = compile_in_parallel(steps, 2, "test pass", processes=True)
finally:
    type(backend).add_stages = original_add_stages
assert (done.submitted, done.compiled, done.processes, done.fallbacks) == (2, 2, True, 0), done
assert all(kernel_fn.device_caches[0][0][("pass", b)].asm["cubin"] for b in (1024, 512))
print("compiled")
"""

_CHILD_FAILS = r"""
import os, sys, tempfile, textwrap, importlib
src_dir = tempfile.mkdtemp(prefix="pc-mod-")
sys.path.insert(0, src_dir)
os.environ["PYTHONPATH"] = src_dir + os.pathsep + os.environ.get("PYTHONPATH", "")
path = os.path.join(src_dir, "pc_changing_kernel.py")
source = '''
import triton
import triton.language as tl

SCALE = tl.constexpr({scale})

@triton.jit
def scale_kernel(x_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n)
    tl.store(x_ptr + offs, x * SCALE, mask=offs < n)
'''
open(path, "w").write(source.format(scale=2.0))
""" + _COMMON + r"""
from triton.runtime._async_compile import AsyncCompileMode
import pc_changing_kernel
open(path, "w").write(source.format(scale=3.0))  # the child imports a kernel that hashes differently
importlib.invalidate_caches()
process_compile_pool.stop()  # fresh processes, which see the module's directory

k = pc_changing_kernel.scale_kernel
k.device_caches[0] = ({}, {}, target, backend, None)
k.ASTSource, k.compile = ASTSource, triton.compile
names = list(k.arg_names)
pool = process_compile_pool.ProcessCompilePool(process_compile_pool.compile_processes(2), max_workers=2)
try:
    with AsyncCompileMode(pool) as mode:
        future = k._do_compile("spec", {"x_ptr": "*fp32", "n": "i32", "BLOCK": "constexpr"}, 0,
                               {(2,): 256}, backend.parse_options({"num_warps": 4}), {(0,): [["tt.divisibility", 16]]},
                               warmup=True)
    kernel = future.result()
finally:
    pool.shutdown()
    process_compile_pool.stop()
assert (pool.in_processes, pool.fallbacks) == (0, 1), (pool.in_processes, pool.fallbacks)
ttir = kernel.asm["ttir"]
assert "2.000000e+00" in ttir and "3.000000e+00" not in ttir, ttir  # compiled here, from this process's source
print("compiled")
"""


def test_child_compile_is_a_cache_hit_in_the_parent():
    assert_compiles_for_sm90(_KEY_MATCH)


@pytest.mark.slow  # a spawned compile process imports torch and the kernels (~20-60 s on 2 cores)
def test_async_compile_closure_goes_to_a_process_and_loads_here():
    assert_compiles_for_sm90(_THROUGH_ASYNC_COMPILE)


@pytest.mark.slow  # a spawned compile process imports torch and the kernels (~20-60 s on 2 cores)
def test_child_with_a_different_kernel_falls_back_to_a_local_compile():
    assert_compiles_for_sm90(_CHILD_FAILS)


def test_kernels_that_cannot_travel_are_refused():
    from meshserve.kernels.compile_job import NotCapturable, capture

    def not_triton():
        return 1

    with pytest.raises(NotCapturable):
        capture(not_triton)
    src = object()

    def async_compile():  # a closure, but not over Triton's objects
        return src

    with pytest.raises(NotCapturable):
        capture(async_compile)


def test_constexpr_values_travel_as_they_hash():
    """A constexpr's str() is its part of ASTSource.hash(): after the trip to a child it must read the same."""
    import pickle

    import triton.language as tl

    from meshserve.kernels.compile_job import _plain, _rebuild

    for value in (tl.float16, tl.constexpr(3), tl.constexpr("tf32"), (1, tl.bfloat16), None, 1.5, True):
        back = _rebuild(pickle.loads(pickle.dumps(_plain(value))))
        assert str(back) == str(value) and type(back) is type(value), value


_RESOLVE = """
from meshserve.kernels import compile_job, triton_ops
from meshserve.kernels.compile_job import JitRef, _ref, _resolve
if {drop}:
    compile_job._jit_registry = lambda: None
kernel = triton_ops._rms_norm_kernel
ref = _ref(kernel)
assert ref == JitRef("meshserve.kernels.triton_ops", "_rms_norm_kernel"), ref
assert _resolve(ref) is kernel
try:
    _resolve(JitRef("meshserve.kernels.triton_ops", "_no_such_kernel"))
    raise SystemExit("no LookupError")
except LookupError:
    pass
print("resolved")
"""


@pytest.mark.parametrize("drop", [False, True], ids=["registry", "no-registry"])
def test_kernels_resolve_by_name_with_or_without_tritons_jit_registry(drop):
    """Triton 3.9 registers each JITFunction by module:qualname; 3.6 (the device's) has no registry, so the child
    finds the kernel as the module's attribute (through an Autotuner's `.fn`). The H200 run of 2026-12-02 fell
    back on every kernel: an ImportError of the registry. Compiled mode (not the interpreter), as in a child."""
    env = dict(os.environ, TRITON_INTERPRET="0")
    out = subprocess.run([sys.executable, "-c", _RESOLVE.format(drop=drop)], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and "resolved" in out.stdout, out.stderr[-2000:]
