"""What a strategy decides: which parameters train, how the model is wrapped, what is saved."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..modeling import TextClassifier

HEAD_FILE = "head.safetensors"


class Strategy:
    """Base: subclasses override :meth:`setup`, :meth:`save`, :meth:`load` as needed."""

    name: str = "base"
    default_lr: float = 5e-5
    default_lr_decoder: float | None = None  # where decoders want another default
    default_epochs: int = 3
    #: train the head on backbone features computed once (no backbone in the loop)
    precompute_features: bool = False

    def __init__(self, **options):
        self.options = options

    def setup(self, model: TextClassifier) -> TextClassifier:
        """Freeze / wrap ``model`` for training; returns the model to train."""
        return model

    def prepare_backbone(self, model: TextClassifier, train, args, accelerator, out: Path,
                         progress: bool, resume: bool) -> dict | None:
        """Train the backbone before the main loop, on the training split (an ``Encoded``);
        returns what it did, for the run's metrics, or None where a strategy has no such phase
        (all but contrastive)."""
        return None

    def save(self, model: TextClassifier, run_dir: Path) -> None:
        save_head(model, run_dir)

    def load(self, model: TextClassifier, run_dir: Path) -> TextClassifier:
        """Put the saved weights of ``run_dir`` onto ``model`` (built on the base backbone)."""
        load_head(model, run_dir)
        return model

    def saved_backbone(self, run_dir: Path) -> Path | None:
        """A backbone folder saved in the run that replaces the base model on reload."""
        return None

    def describe(self) -> dict:
        return {"name": self.name, **self.options}


def save_head(model: TextClassifier, run_dir: Path) -> None:
    state = {k: v.detach().contiguous().cpu() for k, v in model.head.state_dict().items()}
    save_file(state, str(run_dir / HEAD_FILE))


def load_head(model: TextClassifier, run_dir: Path) -> None:
    state = load_file(str(run_dir / HEAD_FILE))
    model.head.load_state_dict(state)


def freeze(module: nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(False)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train (what a resumable checkpoint must hold)."""
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
