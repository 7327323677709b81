"""Which rows to label next: the ones a run is least sure of (`predict --uncertain N`), or
random ones? A simulation on rt-polarity, whose labels are all known.

The validation and test splits are fixed (split seed 0). From the training split a pool of
--pool rows is drawn; --start of them, at random, are the first labelled set. Each round trains
on the labelled set, scores the fixed test rows, then adds --step rows from the rest of the
pool: the most uncertain ones under the run just trained (one arm), or random ones (the other).
Both arms start from the same first run; every seed draws its own pool and start.
``--arms uncertain,random,diverse`` adds a third: the 4 x --step most uncertain rows cut into
--step clusters (k-means on the run's own features, `clf.embed`), the most uncertain row of
each cluster (cand is sorted most unsure first, so a cluster's first member is its most unsure).

    PYTHONPATH=src python bench/active.py [--strategy frozen] [--seeds 0,1,2] [--rounds 2]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--strategy", default="frozen")
    p.add_argument("--epochs", type=int, help="default: the strategy's")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--pool", type=int, default=4000)
    p.add_argument("--start", type=int, default=500)
    p.add_argument("--step", type=int, default=500)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--arms", default="uncertain,random")
    a = p.parse_args()

    import textune
    from textune.api import load_splits
    from textune.config import RunConfig

    splits = load_splits(RunConfig.from_options(data="rt-polarity", split_seed=0))
    work = Path(tempfile.mkdtemp(prefix="textune-active-"))
    for name in ("val", "test"):
        t = getattr(splits, name)
        pd.DataFrame({"text": t.texts, "label": t.labels}).to_csv(work / f"{name}.csv", index=False)
    train = splits.train
    results = []  # (seed, round, arm, labelled rows, accuracy)

    def fit(rows: list[int], tag: str, seed: int):
        f = work / f"{tag}.csv"
        pd.DataFrame({"text": [train.texts[i] for i in rows],
                      "label": [train.labels[i] for i in rows]}).to_csv(f, index=False)
        opts = {"epochs": a.epochs} if a.epochs else {}
        return textune.fit(f, work / tag, model="minilm-l6", strategy=a.strategy,
                           val=str(work / "val.csv"), test=str(work / "test.csv"),
                           max_length=a.max_length, seed=seed, progress=False, **opts)

    for seed in [int(s) for s in a.seeds.split(",")]:
        rng = np.random.default_rng(seed)
        pool = rng.choice(len(train), size=min(a.pool, len(train)), replace=False).tolist()
        first = pool[:a.start]
        clf0 = fit(first, f"s{seed}-r0", seed)
        results.append((seed, 0, "both", len(first), clf0.metrics["accuracy"]))
        print(f"seed {seed} round 0: {len(first)} rows, accuracy {clf0.metrics['accuracy']:.4f}",
              flush=True)
        for arm in a.arms.split(","):
            labelled, clf = list(first), clf0
            for r in range(1, a.rounds + 1):
                have = set(labelled)
                rest = [i for i in pool if i not in have]
                if arm == "uncertain":
                    probs = clf.predict_proba([train.texts[i] for i in rest])
                    order = np.argsort(-clf.uncertainty(probs), kind="stable")
                    labelled += [rest[i] for i in order[:a.step]]
                elif arm == "diverse":
                    from sklearn.cluster import KMeans

                    probs = clf.predict_proba([train.texts[i] for i in rest])
                    unsure = clf.uncertainty(probs)
                    cand = np.argsort(-unsure, kind="stable")[:4 * a.step]
                    emb = clf.embed([train.texts[rest[i]] for i in cand])
                    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
                    groups = KMeans(a.step, n_init=1, random_state=seed).fit_predict(emb)
                    labelled += [rest[cand[np.flatnonzero(groups == g)[0]]]
                                 for g in range(a.step)]
                else:
                    labelled += rng.choice(rest, size=a.step, replace=False).tolist()
                clf = fit(labelled, f"s{seed}-{arm}-r{r}", seed)
                results.append((seed, r, arm, len(labelled), clf.metrics["accuracy"]))
                print(f"seed {seed} round {r} {arm}: {len(labelled)} rows, accuracy "
                      f"{clf.metrics['accuracy']:.4f}", flush=True)

    df = pd.DataFrame(results, columns=["seed", "round", "arm", "rows", "accuracy"])
    print(f"\n{a.strategy}, pool {a.pool}, start {a.start}, +{a.step} a round; test rows "
          f"{len(splits.test)}; mean over seeds {a.seeds}:")
    print("| labelled rows | random | uncertain | uncertain - random (per seed) |")
    print("|---|---|---|---|")
    for r in range(a.rounds + 1):
        at = df[df["round"] == r]
        if r == 0:
            print(f"| {int(at['rows'].iloc[0]):,} | {at['accuracy'].mean():.4f} | (same) | |")
            continue
        u = at[at.arm == "uncertain"].sort_values("seed")["accuracy"].to_numpy()
        rnd = at[at.arm == "random"].sort_values("seed")["accuracy"].to_numpy()
        d = u - rnd
        print(f"| {int(at['rows'].iloc[0]):,} | {rnd.mean():.4f} | {u.mean():.4f} | "
              f"{100 * d.mean():+.1f} pts ({', '.join(f'{100 * x:+.1f}' for x in d)}) |")


if __name__ == "__main__":
    main()
