"""Bottleneck adapters (Houlsby et al., 2019; Pfeiffer et al., 2020).

A small ``down -> GELU -> up`` bottleneck with a residual is inserted after each transformer
layer's attention output projection and feed-forward output projection (``where="both"``,
Houlsby) or after the feed-forward only (``where="ffn"``, Pfeiffer), i.e. before the layer's
own dropout, residual and norm. The up-projection starts at zero, so training starts from the
pretrained function. The backbone is frozen; adapters and head train and are saved (small).

No maintained adapter library works with transformers 5 at the time of writing, so this is our
own module (about 100 lines), registered like the other strategies.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import UserError
from ..modeling import TextClassifier
from .base import Strategy, freeze, load_head, save_head

ADAPTER_FILE = "adapters.safetensors"

LAYOUTS = (
    ("attention.output.dense", "layer.{}.output.dense"),  # BERT, RoBERTa, XLM-R, CamemBERT,
    # ELECTRA, DeBERTa, ERNIE, RoFormer, BigBird, Longformer, MobileBERT
    ("attention.attn.o", "layer.{}.output.dense"),  # MPNet
    ("attention.out_lin", "ffn.lin2"),  # DistilBERT
    ("attn.Wo", "mlp.Wo"),  # ModernBERT
    ("self_attn.o_proj", "mlp.down_proj"),  # LLaMA, Mistral, Qwen, Gemma, Phi-3, OLMo, Granite
    ("attention.dense", "mlp.dense_4h_to_h"),  # GPT-NeoX / Pythia
    ("self_attention.dense", "mlp.dense_4h_to_h"),  # Falcon, BLOOM
    ("self_attn.out_proj", "fc2"),  # OPT
    ("self_attn.dense", "mlp.fc2"),  # Phi-1/2
    ("attn.c_proj", "mlp.c_proj"),  # GPT-2 (Conv1D projections)
)
"""Where adapters go: (attention output projection, feed-forward output projection), as
module-name suffixes (``{}``: a layer number). A backbone takes the first layout of which it has
one of each in every layer; the family's name is not consulted, so new models named like one of
these work unchanged."""


def _projection(m: nn.Module) -> bool:
    """A linear projection: ``nn.Linear`` (also 4-bit ones) or GPT-2's ``Conv1D``."""
    return isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"


def _out_features(m: nn.Module) -> int:
    return m.out_features if isinstance(m, nn.Linear) else m.nf


class Bottleneck(nn.Module):
    def __init__(self, hidden: int, bottleneck: int):
        super().__init__()
        self.down = nn.Linear(hidden, bottleneck)
        self.act = nn.GELU()
        self.up = nn.Linear(bottleneck, hidden)
        nn.init.normal_(self.down.weight, std=1e-2)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(self.act(self.down(x)))


class WithAdapter(nn.Module):
    """``linear`` followed by a bottleneck adapter on its output."""

    def __init__(self, linear: nn.Module, bottleneck: int):
        super().__init__()
        self.linear = linear
        self.adapter = Bottleneck(_out_features(linear), bottleneck)
        self.adapter.to(dtype=linear.weight.dtype, device=linear.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter(self.linear(x))


def adapter_sites(backbone: nn.Module, where: str) -> list[str]:
    """The projections adapters follow: of the first layout in ``LAYOUTS`` the backbone has
    in every layer, the feed-forward ones (and the attention ones with ``where="both"``)."""
    names = [n for n, m in backbone.named_modules() if _projection(m)]
    layers = getattr(backbone.config, "num_hidden_layers", None)
    for attn, ffn in LAYOUTS:
        a = [n for n in names if n.endswith(attn)]
        f = [n for n in names if _matches_ffn(n, ffn) and not n.endswith(attn)]
        if a and len(a) == len(f) and layers in (None, len(a)):
            return sorted(f + a if where == "both" else f, key=names.index)
    mt = getattr(backbone.config, "model_type", "")
    raise UserError(f"--strategy adapter does not know where to insert adapters in a {mt!r} "
                    f"model (no attention / feed-forward output projections named as in BERT, "
                    f"LLaMA, GPT-2 and {len(LAYOUTS) - 3} other layouts); use --strategy lora")


def _matches_ffn(name: str, pattern: str) -> bool:
    if "{}" not in pattern:
        return name.endswith(pattern)
    head, tail = pattern.split("{}")
    if not name.endswith(tail) or head not in name:
        return False
    middle = name[name.rindex(head) + len(head): len(name) - len(tail)]
    return middle.isdigit()


def insert_adapters(backbone: nn.Module, reduction: int, where: str) -> int:
    hidden = backbone.config.hidden_size
    bottleneck = max(1, hidden // reduction)
    sites = adapter_sites(backbone, where)
    for name in sites:
        parent_name, _, child = name.rpartition(".")
        parent = backbone.get_submodule(parent_name)
        setattr(parent, child, WithAdapter(getattr(parent, child), bottleneck))
    return len(sites)


class Adapter(Strategy):
    name = "adapter"
    default_lr = 1e-3

    def __init__(self, reduction: int = 16, where: str = "both", **options):
        if where not in ("both", "ffn"):
            raise UserError(f"--adapter-where {where}: choose both (Houlsby) or ffn (Pfeiffer)")
        super().__init__(reduction=reduction, where=where, **options)

    def setup(self, model: TextClassifier) -> TextClassifier:
        freeze(model.backbone)
        insert_adapters(model.backbone, self.options["reduction"], self.options["where"])
        return model

    def save(self, model: TextClassifier, run_dir: Path) -> None:
        state = {k: v.detach().contiguous().cpu() for k, v in model.backbone.state_dict().items()
                 if ".adapter." in k}
        save_file(state, str(run_dir / ADAPTER_FILE))
        save_head(model, run_dir)

    def load(self, model: TextClassifier, run_dir: Path) -> TextClassifier:
        insert_adapters(model.backbone, self.options["reduction"], self.options["where"])
        state = load_file(str(run_dir / ADAPTER_FILE))
        missing, unexpected = model.backbone.load_state_dict(state, strict=False)
        missing = [k for k in missing if ".adapter." in k]
        if missing or unexpected:
            raise UserError(f"{run_dir}: adapter weights do not match the model "
                            f"({len(missing)} missing, {len(unexpected)} unexpected)")
        load_head(model, run_dir)
        return model
