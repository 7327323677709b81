"""`textune export RUN --merge --out DIR`: a run as a plain backbone folder + head.

LoRA weights are merged into the backbone (``W + BA``), so the result needs no PEFT at load
time and runs as fast as the base model. The output is itself a `full`-strategy run folder:
``textune.load(DIR)`` works, and ``DIR/backbone`` is a plain Hugging Face model folder.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .classifier import CALIBRATION, is_prompt_run, load
from .errors import UserError


def export_run(run: str | Path, out: str | Path, merge: bool = True) -> Path:
    from .api import prepare_out_dir
    from .strategies.base import save_head

    run = Path(run)
    if is_prompt_run(run):
        raise UserError(f"{run}: a `textune prompt` run has no trained weights to export; "
                        f"textune.load / predict / serve take its folder as it is")
    clf = load(run, device="cpu", merge=False)
    cfg = clf.config
    name = cfg.strategy.name
    if name == "adapter":
        raise UserError(f"{run}: bottleneck adapters are non-linear and cannot be merged into "
                        f"the weights; use the run folder as it is (textune.load)")
    if not merge:
        raise UserError("export needs --merge (the run folder itself is already loadable)")
    out = prepare_out_dir(out, False)
    backbone = clf.model.backbone
    if name == "lora":
        backbone = backbone.merge_and_unload()
    backbone.save_pretrained(out / "backbone", safe_serialization=True)
    clf.model.backbone = backbone
    save_head(clf.model, out)
    clf.tokenizer.save_pretrained(out / "tokenizer")
    shutil.copy(run / "labels.json", out / "labels.json")
    if (run / CALIBRATION).exists():
        shutil.copy(run / CALIBRATION, out / CALIBRATION)
    cfg.strategy.name = "full"
    cfg.out = str(out)
    cfg.save(out / "config.json")
    (out / "export.json").write_text(json.dumps({"from_run": str(run.resolve()),
                                                 "from_strategy": name, "merged": True}) + "\n")
    return out
