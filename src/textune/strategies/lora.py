"""LoRA through PEFT on the backbone; the head trains in full and is saved beside the adapter."""

from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path

from torch import nn

from ..errors import UserError
from ..modeling import TextClassifier
from .base import Strategy, freeze, load_head, save_head

log = logging.getLogger(__name__)
ADAPTER_DIR = "adapter"

# Attention and MLP projections by architecture family (PEFT's own table covers fewer).
_TARGETS = {
    "bert": ["query", "key", "value", "dense"],
    "roberta": ["query", "key", "value", "dense"],
    "xlm-roberta": ["query", "key", "value", "dense"],
    "electra": ["query", "key", "value", "dense"],
    "distilbert": ["q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"],
    "deberta-v2": ["query_proj", "key_proj", "value_proj", "dense"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gemma3_text": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gemma": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


@contextlib.contextmanager
def _quiet_peft():
    """PEFT reads ``model.is_gradient_checkpointing``, which recent transformers deprecates with
    a FutureWarning on every wrap and load: nothing the user can act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        yield


def default_targets(backbone: nn.Module) -> list[str] | str:
    mt = getattr(backbone.config, "model_type", "")
    return _TARGETS.get(mt, "all-linear")


class LoRA(Strategy):
    name = "lora"
    default_lr = 5e-4
    # decoders: smollm2-135m, rt-polarity, 1,000 rows, 1 epoch: 5e-4 -> 0.741, 1e-3 -> 0.806
    default_lr_decoder = 1e-3

    def __init__(self, r: int = 8, alpha: int | None = None, dropout: float = 0.05,
                 targets: list[str] | None = None, **options):
        super().__init__(r=r, alpha=alpha if alpha is not None else 2 * r, dropout=dropout,
                         targets=targets, **options)

    def setup(self, model: TextClassifier) -> TextClassifier:
        from peft import LoraConfig, get_peft_model

        o = self.options
        targets = o["targets"] or default_targets(model.backbone)
        freeze(model.backbone)
        cfg = LoraConfig(r=o["r"], lora_alpha=o["alpha"], lora_dropout=o["dropout"],
                         target_modules=targets, bias="none")
        try:
            with _quiet_peft():
                model.backbone = get_peft_model(model.backbone, cfg)
        except ValueError as e:
            raise UserError(f"--lora-targets {targets}: {str(e).splitlines()[0]}") from None
        self.options["targets"] = targets if isinstance(targets, str) else list(targets)
        return model

    def save(self, model: TextClassifier, run_dir: Path) -> None:
        model.backbone.save_pretrained(run_dir / ADAPTER_DIR)
        save_head(model, run_dir)

    def load(self, model: TextClassifier, run_dir: Path) -> TextClassifier:
        from peft import PeftModel

        with _quiet_peft():
            model.backbone = PeftModel.from_pretrained(model.backbone, run_dir / ADAPTER_DIR)
        load_head(model, run_dir)
        return model
