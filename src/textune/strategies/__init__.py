"""Strategy registry: ``get_strategy(name, **options)``."""

from __future__ import annotations

from ..errors import UserError
from .adapter import Adapter
from .base import Strategy
from .contrastive import Contrastive
from .frozen import Frozen
from .full import Full
from .lora import LoRA

REGISTRY: dict[str, type[Strategy]] = {s.name: s for s in (Full, Frozen, LoRA, Adapter,
                                                                Contrastive)}


def get_strategy(name: str, **options) -> Strategy:
    if name not in REGISTRY:
        raise UserError(f"--strategy {name}: unknown; choose one of {', '.join(REGISTRY)}")
    return REGISTRY[name](**options)


__all__ = ["REGISTRY", "Strategy", "get_strategy"]
