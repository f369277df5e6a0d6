"""The GPU `meshserve plan` assumes when --gpu is not given: this machine's, else H100-SXM, said out loud."""

from __future__ import annotations

import glob
import importlib.util
from dataclasses import dataclass

from meshserve.planner.hardware import GpuSpec, get_gpu, match_device_name

DEFAULT_GPU = "H100-SXM"
# Device nodes of the NVIDIA and AMD (ROCm) drivers: without them there is no GPU, and no reason to spend
# seconds importing torch to learn so.
_DEVICE_NODES = ("/dev/nvidiactl", "/dev/nvidia[0-9]*", "/dev/kfd")


@dataclass(frozen=True)
class GpuChoice:
    """The GPU to plan for and, when --gpu did not name it, one line on where it came from (report header)."""

    gpu: GpuSpec
    note: str = ""


def local_gpu_name() -> str | None:
    """The driver's name for GPU 0 (e.g. 'NVIDIA H100 80GB HBM3'), or None when torch sees no GPU."""
    if not any(glob.glob(node) for node in _DEVICE_NODES) or importlib.util.find_spec("torch") is None:
        return None
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def choose_gpu(name: str | None, catalog: dict[str, GpuSpec], device_name: str | None = None) -> GpuChoice:
    """`--gpu NAME` when given; else the local GPU (`device_name`, detected when None) if the catalog knows
    it; else DEFAULT_GPU, with a note saying it was assumed."""
    if name is not None:  # `--gpu ""` (an unset shell variable) is an unknown GPU, not "detect one"
        return GpuChoice(get_gpu(name, catalog))
    device_name = device_name if device_name is not None else local_gpu_name()
    if device_name:
        spec = match_device_name(device_name, catalog)
        if spec is not None:
            return GpuChoice(spec, f"{spec.name}, detected on this machine ({device_name}); --gpu to change")
        why = f"this machine's {device_name} is not in the catalog (see --list-gpus)"
    else:
        why = "no GPU detected on this machine"
    default = get_gpu(DEFAULT_GPU, catalog)
    return GpuChoice(default, f"{default.name} assumed: {why}; pass --gpu to plan for another")
