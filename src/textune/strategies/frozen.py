"""Feature extraction: the backbone is frozen, its pooled features are computed once (inference
mode, length-sorted batches) and cached, and only the head trains on the cache."""

from __future__ import annotations

from ..modeling import TextClassifier
from .base import Strategy, freeze


class Frozen(Strategy):
    name = "frozen"
    default_lr = 1e-3
    precompute_features = True

    def setup(self, model: TextClassifier) -> TextClassifier:
        freeze(model.backbone)
        return model
