"""CPU training attention: SDPA against the math textune runs (``textune.cpu.attention``).

Forward and backward of one attention call under bf16 autocast, as CPU training runs it: fp32
queries, keys and values (rotary embeddings leave them so), a padding mask (a third of every
other row padded; ``--causal`` adds the causal mask), best of ``--reps`` calls after a warm-up.
The rows are ``[batch, heads, tokens, head dim]`` shapes; what is printed is milliseconds a
call and the ratio. ``cpu.MATH_BF16_MAX_LENGTH`` was chosen from this table.

    PYTHONPATH=src python bench/attention.py [--causal] [--reps 10]
"""

from __future__ import annotations

import argparse
import time

import torch

SHAPES = [(32, 12, 32, 32), (32, 12, 64, 32), (32, 12, 128, 32), (16, 12, 256, 32),
          (8, 12, 512, 32), (32, 9, 40, 64), (32, 9, 128, 64), (8, 9, 512, 64)]


class _Layer(torch.nn.Module):
    """What the attention function reads from a layer: training mode, causal or not."""

    def __init__(self, causal: bool):
        super().__init__()
        self.is_causal = causal


def timed(fn, shape, causal: bool, reps: int) -> float:
    b, h, t, d = shape
    torch.manual_seed(0)
    q, k, v = (torch.randn(b, h, t, d, requires_grad=True) for _ in range(3))
    keep = torch.ones(b, t, dtype=torch.bool)
    keep[::2, t - t // 3:] = False
    mask = keep[:, None, None, :].expand(b, 1, t, t)
    if causal:
        mask = mask & torch.ones(t, t, dtype=torch.bool).tril()
    grad = torch.randn(b, t, h, d)

    def once() -> float:
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, _ = fn(_Layer(causal).train(), q, k, v, mask)
        out.backward(grad.to(out.dtype))
        return time.perf_counter() - start

    for _ in range(3):
        once()
    return min(once() for _ in range(reps)) * 1e3


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--causal", action="store_true")
    p.add_argument("--reps", type=int, default=10)
    a = p.parse_args()
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from textune import cpu

    def math(layer, q, k, v, mask):
        saved, cpu.MATH_BF16_MAX_LENGTH = cpu.MATH_BF16_MAX_LENGTH, 1 << 30
        try:
            return cpu.attention(layer, q, k, v, mask)
        finally:
            cpu.MATH_BF16_MAX_LENGTH = saved

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, bf16 autocast, "
          f"{'causal + ' if a.causal else ''}padding mask; forward + backward, ms a call")
    print(f"{'shape':>20}  {'sdpa':>8}  {'math':>8}  sdpa/math")
    for shape in SHAPES:
        s = timed(sdpa_attention_forward, shape, a.causal, a.reps)
        m = timed(math, shape, a.causal, a.reps)
        print(f"{str(list(shape)):>20}  {s:8.2f}  {m:8.2f}  {s / m:8.2f}")


if __name__ == "__main__":
    main()
