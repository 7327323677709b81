"""Long texts: does `--truncation windows` beat reading only a text's head, at equal compute?

On bbc-news (35% of the articles are longer than minilm-l6's 512 tokens; windows of
--max-length tokens make the effect visible at a CPU's cost), three runs of full fine-tuning on
the same splits and seed:

- head, 1 epoch: each article's first --max-length tokens;
- head, --head-epochs epochs: as many optimizer steps as the windowed run (the control: is it
  the windows, or just more training?);
- windows, 1 epoch: every article in windows, scored by the mean of its windows' logits;

plus the head-trained runs scored with windows at prediction time only (no retraining).
Prints test accuracy with 95% intervals and each run's difference to the windowed one, paired
over the same test rows (bootstrap).

    PYTHONPATH=src python bench/windows.py [--max-length 128] [--head-epochs 4] [--seed 0]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", default="bbc-news")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--head-epochs", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="folder for the runs (default: a temporary one)")
    a = p.parse_args()

    import textune
    from textune.api import load_splits
    from textune.metrics import bootstrap_means, interval

    work = Path(a.out or tempfile.mkdtemp(prefix="textune-windows-"))
    common = {"model": "minilm-l6", "max_length": a.max_length, "seed": a.seed, "progress": False,
              "overwrite": True}
    runs = {
        "head, 1 epoch": textune.fit(a.data, work / "head1", epochs=1, **common),
        f"head, {a.head_epochs} epochs": textune.fit(a.data, work / f"head{a.head_epochs}",
                                                     epochs=a.head_epochs, **common),
        "windows, 1 epoch": textune.fit(a.data, work / "windows", epochs=1,
                                        truncation="windows", **common),
    }
    test = load_splits(runs["windows, 1 epoch"].config).test
    right, rows = {}, []
    for name, clf in list(runs.items()):
        y, logits = clf.scores(test)
        right[name] = (logits.argmax(1) == y).astype(float)
        m = clf.metrics
        rows.append((name, m["steps"], m["train_seconds"]))
        if name.startswith("head"):  # the same weights, read in windows at prediction time
            clf.config.data.truncation = "windows"
            y, logits = clf.scores(test)
            right[name + " + windows at prediction"] = (logits.argmax(1) == y).astype(float)
            rows.append((name + " + windows at prediction", m["steps"], m["train_seconds"]))
    names = list(right)
    means = bootstrap_means(np.stack([right[n] for n in names]))
    ref = names.index("windows, 1 epoch")
    print(f"\n{a.data}, minilm-l6, max length {a.max_length}, seed {a.seed}, "
          f"{len(test)} test texts")
    print(f"{'run':44} {'steps':>5} {'train s':>8} {'accuracy [95% CI]':>24} "
          f"{'vs windows [95% CI]':>26}")
    for (name, steps, secs), m in zip(rows, means):
        acc = right[name].mean()
        lo, hi = interval(m)
        d = acc - right[names[ref]].mean()
        dlo, dhi = interval(m - means[ref])
        vs = "—" if name == names[ref] else f"{d:+.4f} [{dlo:+.3f}, {dhi:+.3f}]"
        print(f"{name:44} {steps:>5} {secs:>8.1f} {acc:>8.4f} [{lo:.3f}, {hi:.3f}] {vs:>26}")


if __name__ == "__main__":
    main()
