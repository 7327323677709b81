"""Memory plan: estimated peak memory of a training run, before it starts.

Peak = weights + gradients + optimizer state + activations (+ a fixed framework overhead).
Activations follow Korthikanti et al. (2022) for a transformer layer under 16-bit autocast with
a fused (flash / memory-efficient) attention kernel, adapted to the actual MLP width: per token
and layer about ``2 * (11 h + 3 I)`` bytes for a GELU MLP, ``2 * (11 h + 4 I)`` for a gated
(SwiGLU) one, doubled in fp32. Gradient checkpointing keeps only each layer's input
(``2 h`` bytes per token and layer) plus one layer's activations. The estimate is compared with
measured peaks in docs/BENCHMARKS.md.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

GIB = 2**30


@dataclass
class Plan:
    weights: float
    gradients: float
    optimizer: float
    activations: float
    overhead: float
    device: str
    free: float | None

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.overhead

    def as_dict(self) -> dict:
        return {**asdict(self), "total": self.total}

    def lines(self) -> list[str]:
        def gib(x):
            return f"{x / GIB:8.2f} GiB"

        out = [f"memory plan on {self.device}:",
               f"  weights      {gib(self.weights)}", f"  gradients    {gib(self.gradients)}",
               f"  optimizer    {gib(self.optimizer)}", f"  activations  {gib(self.activations)}",
               f"  overhead     {gib(self.overhead)}", f"  total        {gib(self.total)}"]
        if self.free is not None:
            verdict = "fits" if self.total < 0.92 * self.free else "DOES NOT FIT"
            out.append(f"  free now     {gib(self.free)}  -> {verdict}")
        return out


def device_free_bytes(device: str) -> float | None:
    if device.startswith("cuda"):
        import torch

        return float(torch.cuda.mem_get_info()[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _config_numbers(config) -> dict:
    c = config.get_text_config() if hasattr(config, "get_text_config") else config
    h = c.hidden_size
    inter = getattr(c, "intermediate_size", None) or 4 * h
    act = str(getattr(c, "hidden_act", "gelu"))
    gated = "silu" in act or "swish" in act or getattr(c, "model_type", "") in (
        "llama", "mistral", "qwen2", "gemma", "gemma2", "gemma3_text")
    return {"h": h, "inter": inter, "layers": c.num_hidden_layers, "gated": gated}


def estimate(config, total_params: int, trainable_params: int, *, strategy: str,
             batch_size: int, max_length: int, precision: str, device: str,
             gradient_checkpointing: bool = False, weight_bytes: float = 4.0,
             load_in_4bit: bool = False) -> Plan:
    """Estimated peak memory in bytes (see the module docstring for the model)."""
    n = _config_numbers(config)
    frozen_params = total_params - trainable_params
    if load_in_4bit:
        weight_bytes_frozen = 0.55  # 4-bit + block scales
    else:
        weight_bytes_frozen = weight_bytes
    weights = frozen_params * weight_bytes_frozen + trainable_params * 4.0
    grads = trainable_params * 4.0
    optim = trainable_params * 8.0  # AdamW: two fp32 moments
    tokens = batch_size * max_length
    act_bytes = 2 if precision in ("bf16", "fp16") else 4
    per_token_layer = act_bytes * (11 * n["h"] + (4 if n["gated"] else 3) * n["inter"])
    if strategy == "frozen":
        # features are computed under inference mode: one layer's activations at a time
        activations = tokens * per_token_layer
    elif gradient_checkpointing:
        activations = tokens * (n["layers"] * act_bytes * n["h"] + per_token_layer)
    else:
        activations = tokens * n["layers"] * per_token_layer
    overhead = 0.35 * GIB if device.startswith("cuda") else 0.5 * GIB
    return Plan(float(weights), float(grads), float(optim), float(activations), float(overhead),
                device, device_free_bytes(device))


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
