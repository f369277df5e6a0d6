"""The GPU catalog: memory, bandwidth, FLOP/s, links and an assumed price per GPU, read from a TOML file."""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from meshserve.errors import InvalidArgumentError

DEFAULT_CATALOG = Path(__file__).with_name("gpus.toml")
GIB = 1024**3


@dataclass(frozen=True)
class GpuSpec:
    """One GPU model as the planner sees it (units as in gpus.toml)."""

    name: str
    memory_gib: float
    hbm_gb_s: float
    bf16_tflops: float
    link: str
    link_gb_s: float
    link_latency_us: float
    gpus_per_node: int
    price_per_hour_usd: float
    fp8_tflops: float | None = None
    inter_node_gb_s: float = 50.0
    inter_node_latency_us: float = 15.0
    price_is_assumption: bool = True
    efficiency: float = 0.8
    # fixed time per layer per decode step (kernel launches and latencies inside a step); fitted by calibration
    layer_overhead_us: float = 0.0
    # the same at batch 1 for models the engine chains with PDL (perf.layer_overhead_s); None: layer_overhead_us
    layer_overhead_pdl_us: float | None = None
    aliases: tuple[str, ...] = ()

    @property
    def memory_bytes(self) -> float:
        return self.memory_gib * GIB

    @property
    def hbm_bytes_per_s(self) -> float:
        return self.hbm_gb_s * 1e9

    def flops_per_s(self, weight_dtype: str) -> float:
        """Dense tensor FLOP/s for GEMMs with these weights; fp8 only where the GPU has fp8 units."""
        if weight_dtype == "fp8" and self.fp8_tflops:
            return self.fp8_tflops * 1e12
        return self.bf16_tflops * 1e12  # bf16, and weight-only int8/int4 (dequantized to bf16 in the GEMM)


def _norm(name: str) -> str:
    return re.sub(r"[\s_\-]", "", name).lower()


def load_catalog(path: str | Path | None = None) -> dict[str, GpuSpec]:
    """The built-in catalog, with the entries of `path` (if given) overriding or adding GPUs by name."""
    catalog = _read(DEFAULT_CATALOG)
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise InvalidArgumentError(f"hardware file not found: {p}", param="hardware_file")
        catalog.update(_read(p, base=catalog))
    return catalog


def _read(path: Path, base: dict[str, GpuSpec] | None = None) -> dict[str, GpuSpec]:
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise InvalidArgumentError(f"hardware file {path} is not valid TOML: {e}", param="hardware_file") from e
    defaults = data.get("defaults", {})
    fields = {f.name for f in dataclasses.fields(GpuSpec)}
    out: dict[str, GpuSpec] = {}
    gpus = data.get("gpus", {})
    if not isinstance(gpus, dict) or not isinstance(defaults, dict):
        raise InvalidArgumentError(f"hardware file {path}: [gpus] and [defaults] must be tables", param="hardware_file")
    for name, entry in gpus.items():
        if not isinstance(entry, dict):
            raise InvalidArgumentError(f"hardware file {path}: gpus.{name} must be a table ([gpus.{name}] with "
                                       f"its fields), got {type(entry).__name__}", param="hardware_file")
        # A user entry may change one field of a built-in GPU: start from its values; new GPUs get [defaults].
        start = dataclasses.asdict(base[name]) if base and name in base else defaults
        merged = {**start, **entry, "name": name}
        unknown = set(merged) - fields
        if unknown:
            raise InvalidArgumentError(f"hardware file {path}: unknown keys for {name}: {sorted(unknown)}",
                                       param="hardware_file")
        aliases = merged.get("aliases", ())
        if isinstance(aliases, str) or not isinstance(aliases, (list, tuple)) or not all(
                isinstance(a, str) for a in aliases):
            raise InvalidArgumentError(f"hardware file {path}: gpus.{name}.aliases must be a list of regexes "
                                       f"(strings), got {aliases!r}", param="hardware_file")
        for pattern in aliases:
            try:
                re.compile(pattern)
            except re.error as e:
                raise InvalidArgumentError(f"hardware file {path}: gpus.{name}.aliases: {pattern!r} is not a "
                                           f"valid regex ({e})", param="hardware_file") from e
        merged["aliases"] = tuple(aliases)
        missing = [f.name for f in dataclasses.fields(GpuSpec)
                   if f.name not in merged and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]
        if missing:  # it said "GpuSpec.__init__() missing 7 required positional arguments"
            raise InvalidArgumentError(f"hardware file {path}: gpus.{name} is a new GPU: it needs "
                                       f"{', '.join(missing)} (or a [defaults] table with them)",
                                       param="hardware_file")
        try:
            out[name] = GpuSpec(**merged)
        except TypeError as e:
            raise InvalidArgumentError(f"hardware file {path}: entry {name}: {e}", param="hardware_file") from e
        _check_numbers(out[name], path)
    return out


_NUMBERS = ("memory_gib", "hbm_gb_s", "bf16_tflops", "link_gb_s", "link_latency_us", "gpus_per_node",
            "price_per_hour_usd", "fp8_tflops", "inter_node_gb_s", "inter_node_latency_us", "efficiency",
            "layer_overhead_us", "layer_overhead_pdl_us")


# what the planner divides by (0 was a ZeroDivisionError traceback, inf an OverflowError one)
_POSITIVE = ("memory_gib", "hbm_gb_s", "bf16_tflops", "link_gb_s", "inter_node_gb_s", "gpus_per_node")


def _check_numbers(spec: GpuSpec, path: Path) -> None:
    """Every numeric field a finite number >= 0 (a string would fail later as a TypeError deep in the
    prediction), > 0 where the planner divides by it, gpus_per_node whole, efficiency a fraction of the peak in
    (0, 1] as --efficiency (above 1 predicted faster than the roofline)."""
    def bad(key: str, value: object, must: str) -> InvalidArgumentError:
        return InvalidArgumentError(f"hardware file {path}: gpus.{spec.name}.{key} must be {must}, got {value!r}",
                                    param="hardware_file")

    for key in _NUMBERS:
        value = getattr(spec, key)
        if value is None and key in ("fp8_tflops", "layer_overhead_pdl_us"):
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
            raise bad(key, value, "a number >= 0")
        if key in _POSITIVE and not value > 0:
            raise bad(key, value, "a number > 0")
    if spec.gpus_per_node != int(spec.gpus_per_node):
        raise bad("gpus_per_node", spec.gpus_per_node, "a whole number")
    if not 0 < spec.efficiency <= 1:
        raise bad("efficiency", spec.efficiency, "a fraction of the GPU's peak in (0, 1]")


def get_gpu(name: str, catalog: dict[str, GpuSpec] | None = None) -> GpuSpec:
    """A catalog entry by name, ignoring case, spaces, '-' and '_' ("h100_sxm" finds "H100-SXM")."""
    catalog = catalog if catalog is not None else load_catalog()
    for key, spec in catalog.items():
        if _norm(key) == _norm(name):
            return spec
    match = match_device_name(name, catalog)
    if match is not None:
        return match
    raise InvalidArgumentError(f"unknown GPU {name!r}; known: {', '.join(catalog)}", param="gpu")


def match_device_name(device_name: str, catalog: dict[str, GpuSpec]) -> GpuSpec | None:
    """The catalog entry for a driver-reported name such as 'NVIDIA H100 80GB HBM3', or None."""
    for spec in catalog.values():
        if any(re.search(pattern, device_name, re.IGNORECASE) for pattern in spec.aliases):
            return spec
    return None
