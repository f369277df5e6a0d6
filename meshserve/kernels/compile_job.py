"""One deferred Triton specialization as plain data, and its compile in another process (issue 29).

Under AsyncCompileMode, JITFunction._do_compile (Triton 3.6 through 3.9) hands the executor a closure,
`async_compile`, over the objects the compile needs: `src` (the ASTSource: the JITFunction, the signature
dict, the constexprs, the attrs such as divisibility by 16), `target` (the GPUTarget), `options` (the
backend's parsed options: num_warps, num_stages, ...) and `env_vars` (the cache-invalidating TRITON_*
variables). The closure does not pickle (the JITFunction holds its globals, locks and caches), so capture()
reads those four objects out of it and keeps plain data: the JITFunction as its module and qualified name (the
child imports the module, which registers the function in Triton's JIT registry), the rest as they are.

What the disk cache key depends on (triton/compiler/compiler.py get_cache_key, hashed by compile()):
triton_key() (the Triton build: its sources and libraries), ASTSource.hash() (the function's cache_key, a
hash of its source, its callees' and the constexpr globals it reads; str(attrs); the signature sorted by
name; each constexpr's cache_key or str()), backend.hash() (the target's arch and the ptxas version),
options.hash() and sorted(env_vars). So the child builds the ASTSource from the same signature, constexprs and
attrs objects, compiles for the parent's own GPUTarget (no CUDA in the child: the target is passed, nothing
asks a device) with the parent's env_vars, and checks before compiling that its key equals the one the
parent computed (`key`): a module that builds its kernels differently in another process (a kernel made in a
factory, a global read from the environment) fails the job and the parent compiles that kernel itself. The
compile writes into TRITON_CACHE_DIR (the parent's, passed along), where the parent's own compile of the
same closure then finds it: a load of a few milliseconds.

The launcher: Triton 3.6's CudaLauncher compiles a C module per kernel signature with the host compiler
(cached by source hash in the same cache dir); 3.9's launcher is generic (nothing to build). The child builds
it too where its driver allows (best effort: the parent's first launch builds what is missing).
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class JitRef:
    """A JITFunction named by where it is defined (a constexpr argument that is itself a kernel function)."""

    module: str
    qualname: str


@dataclass(frozen=True)
class CompileJob:
    """What triton.compile needs for one specialization, as picklable data."""

    fn: JitRef  # the kernel
    fn_cache_key: str  # the parent's JITFunction.cache_key (source and dependencies hash)
    signature: dict  # argument name -> Triton type ("*fp16", "i32", "constexpr", tuples)
    constexprs: dict  # argument path -> value (JitRef for a JITFunction)
    attrs: dict  # argument path -> [[attribute, value], ...] (tt.divisibility 16, ...)
    options: dict  # the backend options' __dict__ (num_warps, num_stages, ...)
    target: Any  # triton.backends.compiler.GPUTarget
    env_vars: dict  # the cache-invalidating environment variables at capture
    key: str  # sha256 of get_cache_key(...) in the parent: the disk cache entry's name
    cache_dir: str  # the parent's TRITON_CACHE_DIR


@dataclass(frozen=True)
class JobDone:
    key: str
    seconds: float  # the compile (a load when another process compiled it first)
    launcher: bool  # the launcher was built (or the Triton has none to build)


class NotCapturable(Exception):
    """The specialization cannot travel to another process; the parent compiles it."""


def _ref(fn) -> JitRef:
    from triton.runtime.jit import JITFunction

    if not isinstance(fn, JITFunction):
        raise NotCapturable(f"{type(fn).__name__} is not a JITFunction")
    qualname = fn.fn.__qualname__
    if "<locals>" in qualname or fn.module == "__main__":
        raise NotCapturable(f"{fn.module}:{qualname} is not importable")
    return JitRef(fn.module, qualname)


def _plain(value):
    """A constexpr value as picklable data: JITFunctions by reference, the rest as they are (ints, floats,
    bools, None, str, tl.dtype, tl.constexpr, tuples of these)."""
    from triton.runtime.jit import JITCallable

    if isinstance(value, JITCallable):
        return _ref(value)
    if isinstance(value, tuple):
        return type(value)(*map(_plain, value)) if hasattr(value, "_fields") else tuple(map(_plain, value))
    return value


def disk_key(src, backend, options, env_vars) -> str:
    """The name compile() gives the specialization's cache entry (compiler.compile: sha256 of get_cache_key;
    the stages-inspection hook, which appends to it, is refused by capture())."""
    from triton.compiler.compiler import get_cache_key

    return hashlib.sha256(get_cache_key(src, backend, options, env_vars).encode("utf-8")).hexdigest()


def make_job(src, target, options, env_vars) -> CompileJob:
    """The job for an ASTSource compiled for `target` with the backend options object `options`."""
    from triton import knobs
    from triton.compiler import make_backend

    if knobs.runtime.add_stages_inspection_hook is not None or knobs.compilation.always_compile:
        raise NotCapturable("a stages-inspection hook or TRITON_ALWAYS_COMPILE: compile() keys differ")
    backend = make_backend(target)
    return CompileJob(fn=_ref(src.fn), fn_cache_key=src.fn.cache_key, signature=dict(src.signature),
                      constexprs={k: _plain(v) for k, v in src.constants.items()}, attrs=dict(src.attrs),
                      options=dict(options.__dict__), target=target, env_vars=dict(env_vars),
                      key=disk_key(src, backend, _compile_options(backend, src, options.__dict__), env_vars),
                      cache_dir=knobs.cache.dir)


def _compile_options(backend, src, options: dict):
    """The options object compile() hashes: the given dict parsed again with the source's own options."""
    return backend.parse_options(dict(options, **src.parse_options()))


def capture(compile_fn) -> CompileJob:
    """The job of an AsyncCompileMode compile closure (JITFunction._do_compile's async_compile); NotCapturable
    when it is not one."""
    code = getattr(compile_fn, "__code__", None)
    if code is None or compile_fn.__closure__ is None:
        raise NotCapturable(f"{compile_fn!r} is not a closure")
    cells = dict(zip(code.co_freevars, (c.cell_contents for c in compile_fn.__closure__)))
    missing = {"src", "target", "options", "env_vars"} - cells.keys()
    if missing:
        raise NotCapturable(f"{code.co_name} has no {sorted(missing)}: not Triton's async_compile")
    from triton.compiler import ASTSource

    if not isinstance(cells["src"], ASTSource):
        raise NotCapturable("not an ASTSource")
    return make_job(cells["src"], cells["target"], cells["options"], cells["env_vars"])


def _jit_registry() -> dict | None:
    """Triton 3.9's registry of JITFunctions by "module:qualname"; None where Triton has none (3.6)."""
    try:
        from triton.runtime.jit import _triton_jit_function_registry
    except ImportError:
        return None
    return _triton_jit_function_registry


def _resolve(ref: JitRef):
    """The JITFunction `ref` names in this process: from the registry, else the module's attribute path,
    unwrapped from an Autotuner or heuristics wrapper (each holds the next in `.fn`)."""
    import importlib

    from triton.runtime.jit import JITFunction

    module = importlib.import_module(ref.module)  # defining the kernel registers it (3.9)
    registry = _jit_registry()
    fn = registry.get(f"{ref.module}:{ref.qualname}") if registry is not None else None
    if fn is None:
        fn = module
        for name in ref.qualname.split("."):
            fn = getattr(fn, name, None)
        while fn is not None and not isinstance(fn, JITFunction):
            fn = getattr(fn, "fn", None)
    if fn is None:
        raise LookupError(f"{ref.module}:{ref.qualname} is not a JITFunction after import")
    return fn


def _rebuild(value):
    if isinstance(value, JitRef):
        return _resolve(value)
    if isinstance(value, tuple):
        return type(value)(*map(_rebuild, value)) if hasattr(value, "_fields") else tuple(map(_rebuild, value))
    return value


def source_of(job: CompileJob):
    """The job's ASTSource, rebuilt in this process; ValueError when this process's kernel differs."""
    from triton.compiler import ASTSource

    fn = _resolve(job.fn)
    if fn.cache_key != job.fn_cache_key:
        raise ValueError(f"{job.fn.module}:{job.fn.qualname} hashes differently here (its source or the "
                         "constexpr globals it reads differ from the parent's)")
    return ASTSource(fn, job.signature, {k: _rebuild(v) for k, v in job.constexprs.items()}, job.attrs)


def _build_launcher(kernel, target) -> bool:
    """Build the kernel's launcher as the parent's first launch would, from the backend's launcher class (no
    driver.active: this process has no GPU). False where it cannot (3.9's generic launcher asks the active
    driver, and has nothing to build)."""
    try:
        import sys

        from triton.backends import backends

        driver_module = sys.modules[backends[target.backend].driver.__module__]
        launcher_cls = getattr(driver_module, "CudaLauncher", None) or getattr(driver_module, "HIPLauncher")
        launcher_cls(kernel.src, kernel.metadata)
        return True
    except Exception as e:  # the parent's first launch builds it
        logger.debug("launcher of %s left to the parent: %r", job_name(kernel), e)
        return False


def job_name(obj) -> str:
    return getattr(obj, "name", None) or getattr(getattr(obj, "fn", None), "qualname", "?")


def run_job(job: CompileJob, build_launcher: bool = True) -> JobDone:
    """Compile the job into job.cache_dir (in the child). Raises on a key mismatch or a failed compile."""
    import triton
    from triton import knobs
    from triton.compiler import make_backend

    t0 = time.perf_counter()
    os.environ["TRITON_CACHE_DIR"] = job.cache_dir
    knobs.cache.dir = job.cache_dir
    src = source_of(job)
    backend = make_backend(job.target)
    key = disk_key(src, backend, _compile_options(backend, src, job.options), job.env_vars)
    if key != job.key:
        raise ValueError(f"{job.fn.qualname}: cache key {key[:12]} here, {job.key[:12]} in the parent")
    kernel = triton.compile(src, target=job.target, options=job.options, _env_vars=job.env_vars)
    launcher = _build_launcher(kernel, job.target) if build_launcher else False
    return JobDone(key, time.perf_counter() - t0, launcher)


def child_init(modules: tuple[str, ...] = (), target=None) -> None:
    """A compile process's start: no GPU (it only compiles, for the target each job gives); Triton, the kernel
    modules (torch with them) and the cache key's fixed parts (triton_key: a hash of Triton's sources; the
    backend's, which runs ptxas --version) done now rather than at the first job (~1 s there)."""
    import importlib

    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        from triton.runtime.cache import triton_key
    except ImportError:  # older Triton: beside compile()
        from triton.compiler.compiler import triton_key
    from triton.compiler import make_backend

    triton_key()
    if target is not None:
        make_backend(target).hash()

    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as e:  # a job that needs it fails on its own, and falls back
            logger.debug("compile process: import of %s failed: %r", name, e)
