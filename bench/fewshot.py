"""Few labelled rows: `--strategy contrastive` (SetFit's recipe) against frozen and full.

rt-polarity, minilm-l6: a fixed test set of 1,000 sentences; for each --sizes (rows per class)
and seed, a training file of that many rows per class and a validation file of as many again
(both drawn from the rest, stratified); each strategy trains on the same files and is tested on
the same 1,000 rows. With so few rows a strategy's default epochs are only a few optimizer
steps, so every run gets --head-epochs (frozen, contrastive: the head) or --full-epochs (full),
the best epoch chosen on the validation file. Prints accuracy per run, each size's mean over
seeds, and the mean paired difference of contrastive to each of the others.

    PYTHONPATH=src python bench/fewshot.py [--sizes 8,16,32] [--seeds 0,1,2]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", default="rt-polarity")
    p.add_argument("--sizes", default="8,16,32")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--strategies", default="frozen,contrastive,full")
    p.add_argument("--head-epochs", type=int, default=100)
    p.add_argument("--full-epochs", type=int, default=20)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--out", help="folder for the runs (default: a temporary one)")
    a = p.parse_args()

    import pandas as pd

    import textune
    from textune.data import resolve_data

    work = Path(a.out or tempfile.mkdtemp(prefix="textune-fewshot-"))
    work.mkdir(parents=True, exist_ok=True)
    df = pd.read_csv(resolve_data(a.data), keep_default_na=False)[["text", "label"]]
    test = df.sample(1000, random_state=123)
    rest = df.drop(test.index)
    test.to_csv(work / "test.csv", index=False)
    classes = sorted(df["label"].unique())
    results = []
    for n in map(int, a.sizes.split(",")):
        for seed in map(int, a.seeds.split(",")):
            picked = [rest[rest["label"] == c].sample(2 * n, random_state=seed) for c in classes]
            train = pd.concat([g.iloc[:n] for g in picked])
            val = pd.concat([g.iloc[n:] for g in picked])
            files = {k: work / f"{k}-{n}-{seed}.csv" for k in ("train", "val")}
            train.to_csv(files["train"], index=False)
            val.to_csv(files["val"], index=False)
            for strategy in a.strategies.split(","):
                epochs = a.full_epochs if strategy == "full" else a.head_epochs
                clf = textune.fit(str(files["train"]), work / f"{strategy}-{n}-{seed}",
                                  val=str(files["val"]), test=str(work / "test.csv"),
                                  model="minilm-l6", strategy=strategy, epochs=epochs,
                                  max_length=a.max_length, seed=seed, progress=False,
                                  overwrite=True)
                m = clf.metrics
                results.append({"n": n, "seed": seed, "strategy": strategy,
                                "accuracy": m["accuracy"], "train_s": m["train_seconds"]})
                print(f"n={n} seed={seed} {strategy:12} accuracy {m['accuracy']:.4f} "
                      f"train {m['train_seconds']:.1f}s", flush=True)
    r = pd.DataFrame(results)
    print(f"\n{a.data}, minilm-l6, 1,000 test rows; mean over seeds {a.seeds}")
    table = r.pivot_table(index="n", columns="strategy", values="accuracy", aggfunc="mean")
    secs = r.pivot_table(index="n", columns="strategy", values="train_s", aggfunc="mean")
    print(table.round(4).to_string())
    print("train seconds:\n" + secs.round(1).to_string())
    if "contrastive" in table.columns:
        wide = r.pivot_table(index=["n", "seed"], columns="strategy", values="accuracy")
        for other in (s for s in table.columns if s != "contrastive"):
            d = (wide["contrastive"] - wide[other]).groupby("n")
            print(f"contrastive - {other}: " + ", ".join(
                f"n={n}: {g.mean():+.4f} (per seed {', '.join(f'{x:+.3f}' for x in g)})"
                for n, g in d))
    r.to_csv(work / "fewshot.csv", index=False)
    print(f"runs: {work}")


if __name__ == "__main__":
    main()
