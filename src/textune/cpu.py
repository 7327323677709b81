"""CPU training fast path: cheaper dropout masks, attention with dropout off SDPA's slow path,
and big tensors reused instead of page-faulted in every step.

Measured on a 2-core AVX2 CPU (minilm-l6, batches of 32 rt-polarity sentences, forward and
backward): ``F.dropout`` draws one Mersenne-Twister number per element; on [32, 72, 384] it
takes 13.7 ms against 4.5 ms for :func:`dropout` here, which draws one 64-bit number per four
elements and keeps an element when its 16 bits clear a threshold. With dropout, SDPA on a CPU
leaves its flash kernel for an unfused math path (58-66 ms a layer for [32, 12, 72, 32] heads,
against 30 ms for :func:`attention` here, which is the same math with that dropout).

Same model, same objective, same distribution of masks; only the random stream differs (and the
drop rate is rounded to a multiple of 1/65536: 0.1 -> 0.100006, rescaled to match).
``TEXTUNE_CPU_FASTPATH=0`` turns all of it off.
"""

from __future__ import annotations

import ctypes
import math
import os
import sys
from collections.abc import Callable

import torch
from torch import nn

ATTENTION = "textune_cpu"
"""The attention implementation name registered with transformers."""


def enabled() -> bool:
    return os.environ.get("TEXTUNE_CPU_FASTPATH", "1") != "0"


def keep_mask(shape: torch.Size, p: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """Bool mask, each element kept with probability ``1 - round(p * 65536) / 65536``: 16
    random bits an element, four elements from one 64-bit draw of the default generator."""
    n = math.prod(shape)
    bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-2 ** 63, None)
    return bits.view(torch.int16)[:n].view(shape) >= round(p * 65536) - 32768


def dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Training-mode dropout (inverted: kept elements scaled by ``1 / (1 - p)``)."""
    dropped = round(p * 65536)
    if dropped == 0:
        return x
    if dropped >= 65536:
        return x * 0.0
    scale = 65536 / (65536 - dropped)
    return x * keep_mask(x.shape, p, x.device).to(x.dtype).mul_(scale)


_dropout = dropout  # (attention's own ``dropout`` argument, the rate, shadows the name)


class Dropout(nn.Dropout):
    """``nn.Dropout`` that uses :func:`dropout` for CPU training, and ``F.dropout`` elsewhere."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.p > 0 and x.device.type == "cpu":
            return dropout(x, self.p)
        return super().forward(x)


def attention(module, query, key, value, attention_mask, dropout: float = 0.0,
              scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """A transformers attention function: SDPA, except CPU training with attention dropout on
    a plain (non-causal, no GQA, no cache or bias) layer, which runs softmax(QK^T)V itself with
    :func:`dropout` on the probabilities. Returns ``[B, T, heads, head_dim]`` as SDPA's does."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    plain = (dropout > 0 and module.training and query.device.type == "cpu"
             and not (is_causal if is_causal is not None else getattr(module, "is_causal", False))
             and getattr(module, "num_key_value_groups", 1) == 1
             and not any(kwargs.get(k) is not None for k in ("position_bias", "cache", "softcap"))
             and (attention_mask is None or attention_mask.dim() == 4))
    if not plain:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query * scale, key.transpose(-1, -2))
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:  # True: attend
            bias = torch.zeros(attention_mask.shape, dtype=scores.dtype, device=scores.device)
            attention_mask = bias.masked_fill_(~attention_mask, torch.finfo(scores.dtype).min)
        scores = scores + attention_mask
    probs = _dropout(torch.softmax(scores, dim=-1), dropout)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), None


def _register() -> bool:
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    except ImportError:  # a transformers without the attention interface: keep SDPA
        return False
    AttentionInterface.register(ATTENTION, attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, sdpa_mask)  # masks made as for SDPA
    return True


def reuse_freed_memory() -> bool:
    """glibc only: serve big tensors from the heap instead of fresh ``mmap`` pages.

    glibc maps every block above 32 MB (its largest dynamic threshold) afresh and returns it on
    free, so a tensor that size made every step is page-faulted in every step: minilm-l6's
    dense embedding gradient (30522 x 384 floats) costs 22 ms a step to zero, 2.8 ms from the
    heap. Process-wide and not undone: freed memory stays with the process for reuse (what
    PyTorch's GPU allocator does too)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, 1 << 30)) and \
            bool(libc.mallopt(m_trim_threshold, 1 << 30))
    except (OSError, AttributeError):  # not glibc
        return False


def fast_training(model: nn.Module, device: torch.device) -> Callable[[], None]:
    """Before training ``model`` on a CPU: :class:`Dropout` for its ``nn.Dropout`` modules and
    :func:`attention` for its SDPA attention. Returns the function that puts them back."""
    if device.type != "cpu" or not enabled():
        return lambda: None
    reuse_freed_memory()
    swapped = [m for m in model.modules() if type(m) is nn.Dropout]
    for m in swapped:
        m.__class__ = Dropout
    configs = {}
    if _register():
        for m in model.modules():
            cfg = getattr(m, "config", None)
            if getattr(cfg, "_attn_implementation", None) == "sdpa" and any(
                    getattr(cfg, k, 0) for k in ("attention_probs_dropout_prob", "attention_dropout")):
                configs[id(cfg)] = cfg  # (models without attention dropout keep plain SDPA)
        for cfg in configs.values():
            cfg._attn_implementation = ATTENTION

    def restore() -> None:
        for m in swapped:
            m.__class__ = nn.Dropout
        for cfg in configs.values():
            cfg._attn_implementation = "sdpa"

    return restore
