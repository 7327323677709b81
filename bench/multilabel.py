"""Multi-label on real text: bbc-news-tags (BBC article openings, one or two topics a row).

For each strategy and seed, trains minilm-l6 with --multi-label and thresholds left at 0.5,
then scores the test split three ways, the thresholds chosen on the validation split:
0.5 for every tag, one shared threshold (the default, --calibration threshold) and one per tag
(--calibration per-tag).

    PYTHONPATH=src python bench/multilabel.py [--strategies frozen,full] [--seeds 0,1,2,3]

Few labelled rows: ``--limit 64 --strategies frozen,contrastive`` trains on 64 rows (a
stratified sample; validation and test splits unchanged), each strategy with its default
epochs and linear head.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

EPOCHS = {"frozen": 30, "full": 3, "lora": 3, "adapter": 3}
"""Epochs (and, frozen, an MLP head) for the whole training split; with --limit, the defaults
(a head on features: at least 100 steps) except full fine-tuning, 20 epochs as in fewshot.py
(its default 3 would be 6 steps on 64 rows)."""


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--strategies", default="frozen")
    p.add_argument("--seeds", default="0,1,2,3")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--limit", type=int, default=None, help="training rows (few-shot)")
    a = p.parse_args()

    import textune
    from textune.api import load_splits
    from textune.cli import main as cli
    from textune.config import RunConfig
    from textune.metrics import fit_thresholds, multilabel_metrics

    rows = []
    work = Path(tempfile.mkdtemp(prefix="textune-multilabel-"))
    for strategy in a.strategies.split(","):
        for seed in [int(s) for s in a.seeds.split(",")]:
            out = work / f"{strategy}-{seed}"
            args = ["train", "--model", "minilm-l6", "--data", "bbc-news-tags", "--multi-label",
                    "--strategy", strategy, "--max-length", str(a.max_length), "--seed",
                    str(seed), "--calibration", "none", "--out", str(out), "--quiet"]
            if a.limit:
                args += ["--limit", str(a.limit)] + (["--epochs", "20"] if strategy == "full"
                                                     else [])
            else:
                args += ["--epochs", str(EPOCHS[strategy])] + (
                    ["--head", "mlp"] if strategy == "frozen" else [])
            assert cli(args) == 0
            clf = textune.load(out)
            splits = load_splits(RunConfig.load(out / "config.json"))
            yv, lv = clf.scores(splits.val)
            yt, lt = clf.scores(splits.test)
            m = json.loads((out / "metrics.json").read_text())
            row = {"strategy": strategy, "seed": seed, "train_s": m["train_seconds"],
                   "n_test": len(yt)}
            for name, t in (("0.5", None), ("shared", fit_thresholds(lv, yv)),
                            ("per-tag", fit_thresholds(lv, yv, per_tag=True))):
                s = multilabel_metrics(yt, lt, clf.labels, t)
                row[name] = (s["macro_f1"], s["micro_f1"], s["accuracy"])
            rows.append(row)
            print(f"{strategy:>7} seed {seed}: train {row['train_s']:.1f}s  " + "  ".join(
                f"{k}: macro-F1 {row[k][0]:.4f} micro-F1 {row[k][1]:.4f} exact {row[k][2]:.4f}"
                for k in ("0.5", "shared", "per-tag")), flush=True)
    for strategy in a.strategies.split(","):
        rs = [r for r in rows if r["strategy"] == strategy]
        mean = {k: np.mean([r[k] for r in rs], 0) for k in ("0.5", "shared", "per-tag")}
        print(f"{strategy} mean over {len(rs)} seeds: " + "  ".join(
            f"{k}: macro-F1 {v[0]:.4f} micro-F1 {v[1]:.4f} exact {v[2]:.4f}"
            for k, v in mean.items()))


if __name__ == "__main__":
    main()
