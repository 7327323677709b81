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

# (attention output projection suffix, feed-forward output projection suffix) per family
_SITES = {
    "bert": ("attention.output.dense", "layer.{}.output.dense"),
    "roberta": ("attention.output.dense", "layer.{}.output.dense"),
    "xlm-roberta": ("attention.output.dense", "layer.{}.output.dense"),
    "electra": ("attention.output.dense", "layer.{}.output.dense"),
    "distilbert": ("attention.out_lin", "ffn.lin2"),
    "deberta": ("attention.output.dense", "layer.{}.output.dense"),
    "deberta-v2": ("attention.output.dense", "layer.{}.output.dense"),
    "modernbert": ("attn.Wo", "mlp.Wo"),
    "llama": ("self_attn.o_proj", "mlp.down_proj"),
    "mistral": ("self_attn.o_proj", "mlp.down_proj"),
    "qwen2": ("self_attn.o_proj", "mlp.down_proj"),
    "gemma3_text": ("self_attn.o_proj", "mlp.down_proj"),
}
LLAMA_SITES = ("self_attn.o_proj", "mlp.down_proj")
"""Other decoders named as LLaMA is (Qwen3, Gemma 2, Phi-3, OLMo, Granite...) take these."""


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

    def __init__(self, linear: nn.Linear, bottleneck: int):
        super().__init__()
        self.linear = linear
        self.adapter = Bottleneck(linear.out_features, bottleneck)
        self.adapter.to(dtype=linear.weight.dtype, device=linear.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter(self.linear(x))


def adapter_sites(backbone: nn.Module, where: str) -> list[str]:
    mt = getattr(backbone.config, "model_type", "")
    linear = [n for n, m in backbone.named_modules() if isinstance(m, nn.Linear)]
    if mt not in _SITES and not all(any(n.endswith(s) for n in linear) for s in LLAMA_SITES):
        raise UserError(f"--strategy adapter does not know where to insert adapters in a "
                        f"{mt!r} model (known: {', '.join(_SITES)}, and decoders with LLaMA's "
                        f"o_proj / down_proj); use --strategy lora")
    attn, ffn = _SITES.get(mt, LLAMA_SITES)
    names = []
    for name, mod in backbone.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        is_attn = name.endswith(attn)
        is_ffn = _matches_ffn(name, ffn) and not is_attn
        if is_ffn or (is_attn and where == "both"):
            names.append(name)
    if not names:
        raise UserError(f"--strategy adapter found no projection layers in this {mt!r} model")
    return names


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
