"""Full fine-tuning: every parameter trains; the whole backbone is saved."""

from __future__ import annotations

from pathlib import Path

from ..modeling import TextClassifier, quiet_transformers
from .base import Strategy, save_head

BACKBONE_DIR = "backbone"


class Full(Strategy):
    name = "full"
    default_lr = 5e-5

    def save(self, model: TextClassifier, run_dir: Path) -> None:
        with quiet_transformers():  # (no "Writing model shards" bar at every best epoch)
            model.backbone.save_pretrained(run_dir / BACKBONE_DIR, safe_serialization=True)
        save_head(model, run_dir)

    def saved_backbone(self, run_dir: Path) -> Path | None:
        return run_dir / BACKBONE_DIR
