"""What a run ran on: library versions and the device, kept in metrics.json so that two runs'
figures can be told apart (bf16 kernels differ between CPU generations, for one)."""

from __future__ import annotations

import os
import platform
from importlib import metadata

import torch


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else what platform says."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def environment(device: torch.device) -> dict:
    """Versions, the device's name, and on CPU its vector instructions (``AVX2``,
    ``AVX512``...) and whether bf16 runs natively (AVX512-BF16 / AMX)."""
    from .loop import native_bf16

    env = {"python": platform.python_version(),
           **{p: _version(p) for p in ("torch", "transformers", "peft", "accelerate")}}
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    else:
        env["device_name"] = cpu_name()
        env["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        env["cpu_amx"] = bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())
    env["native_bf16"] = native_bf16(device.type)
    env["threads"] = torch.get_num_threads()
    env["cpus"] = os.cpu_count()
    return env
