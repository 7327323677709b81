"""Wrong labels: does `textune cv`'s label_issues.csv find them, and does training without them
(`--exclude-rows`) win back the accuracy they cost?

A real data set with labels flipped on purpose, so that which labels are wrong is known:
bbc-news is split into a pool (80%) and a clean test set (20%, stratified, seed 0); --noise of
the pool's labels are changed to another class drawn at random. Then:

1. `textune cv` (--cv-strategy, 5 folds) on the noisy pool: label_issues.csv's precision and
   recall against the flipped rows;
2. for each --strategies: train on the noisy pool, on the noisy pool with
   `--exclude-rows label_issues.csv`, and on the pool with its true labels (the ceiling), each
   tested on the same clean test set; accuracy with 95% intervals, and the paired difference to
   the noisy run (bootstrap over the test rows).

    PYTHONPATH=src python bench/label_issues.py [--noise 0.1] [--strategies frozen,full]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", default="bbc-news")
    p.add_argument("--noise", type=float, default=0.1)
    p.add_argument("--cv-strategy", default="frozen")
    p.add_argument("--strategies", default="frozen,full")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--epochs", type=int, help="default: each strategy's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="folder for the runs (default: a temporary one)")
    a = p.parse_args()

    import pandas as pd
    from sklearn.model_selection import train_test_split

    import textune
    from textune.cli import main as cli
    from textune.data import resolve_data
    from textune.metrics import bootstrap_means, interval

    work = Path(a.out or tempfile.mkdtemp(prefix="textune-label-issues-"))
    work.mkdir(parents=True, exist_ok=True)
    df = pd.read_csv(resolve_data(a.data), keep_default_na=False)[["text", "label"]]
    pool, test = train_test_split(df, test_size=0.2, random_state=a.seed, stratify=df["label"])
    pool = pool.reset_index(drop=True)
    rng = np.random.default_rng(a.seed)
    classes = sorted(df["label"].unique())
    flip = rng.choice(len(pool), size=round(a.noise * len(pool)), replace=False)
    noisy = pool.copy()
    noisy.loc[flip, "label"] = [rng.choice([c for c in classes if c != y])
                                for y in pool.loc[flip, "label"]]
    files = {"noisy": work / "noisy.csv", "true": work / "true.csv", "test": work / "test.csv"}
    noisy.to_csv(files["noisy"], index=False)
    pool.to_csv(files["true"], index=False)
    test.to_csv(files["test"], index=False)

    common = ["--model", "minilm-l6", "--max-length", str(a.max_length), "--seed", str(a.seed),
              "--quiet", "--overwrite"]
    assert cli(["cv", "--data", str(files["noisy"]), "--strategy", a.cv_strategy, "--folds", "5",
                "--out", str(work / "cv"), *common]) == 0
    issues = pd.read_csv(work / "cv" / "label_issues.csv", keep_default_na=False)
    found, wrong = set(issues["row"]), set(int(i) for i in flip)
    hit = len(found & wrong)

    right, rows = {}, []
    for strategy in a.strategies.split(","):
        runs = {"noisy labels": (files["noisy"], {}),
                "noisy, label issues left out": (files["noisy"], {
                    "exclude_rows": str(work / "cv" / "label_issues.csv")}),
                "true labels": (files["true"], {})}
        for name, (data, extra) in runs.items():
            kw = {"epochs": a.epochs} if a.epochs else {}
            clf = textune.fit(str(data), work / f"{strategy}-{name.split()[0].strip(',')}"
                              f"{'-x' if extra else ''}", model="minilm-l6", strategy=strategy,
                              test=str(files["test"]), max_length=a.max_length, seed=a.seed,
                              progress=False, overwrite=True, **kw, **extra)
            pred = pd.read_csv(Path(clf.config.out) / "predictions.csv", keep_default_na=False)
            key = f"{strategy}: {name}"
            right[key] = (pred["label"] == pred["predicted"]).to_numpy(float)
            rows.append((key, strategy, clf.metrics["splits"]["train"],
                         clf.metrics["train_seconds"]))

    print(f"\n{a.data}, minilm-l6, max length {a.max_length}, seed {a.seed}: pool {len(pool)} "
          f"rows, {len(flip)} labels flipped ({a.noise:.0%}); clean test {len(test)} rows")
    print(f"cv ({a.cv_strategy}, 5 folds): {len(found)} rows flagged, {hit} of them flipped: "
          f"precision {hit / max(len(found), 1):.3f}, recall {hit / len(wrong):.3f}")
    names = list(right)
    means = bootstrap_means(np.stack([right[n] for n in names]))
    print(f"{'run':44} {'train rows':>10} {'train s':>8} {'accuracy [95% CI]':>24} "
          f"{'vs noisy [95% CI]':>24}")
    for (name, strategy, n, secs), m in zip(rows, means):
        ref = names.index(f"{strategy}: noisy labels")
        acc = right[name].mean()
        lo, hi = interval(m)
        d = acc - right[names[ref]].mean()
        dlo, dhi = interval(m - means[ref])
        vs = "—" if names.index(name) == ref else f"{d:+.4f} [{dlo:+.3f}, {dhi:+.3f}]"
        print(f"{name:44} {n:>10} {secs:>8.1f} {acc:>8.4f} [{lo:.3f}, {hi:.3f}] {vs:>24}")
    print(f"runs: {work}")


if __name__ == "__main__":
    main()
