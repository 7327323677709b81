"""Distillation: a teacher labels unlabelled texts, a small student learns from them.

rt-polarity: a fixed test set of 1,000 sentences; a labelled training file and a validation
file of --n rows a class each, a pool of --pool unlabelled sentences (all drawn from the rest).
Teachers: `prompt` (smollm2-135m zero-shot, `textune prompt`) and `contrastive` (minilm-l6 on
the labelled rows). For each teacher the student (minilm-l6, --strategy full) trains on the
labelled rows plus the pool with the teacher's probabilities (soft) or decisions (hard). The
baselines train on the labelled rows alone (full; contrastive). Prints each run's test accuracy,
the student's paired difference to its teacher on the same rows, and texts/s of the teacher
and of the student (`predict` on the test sentences).

    PYTHONPATH=src python bench/distill.py [--n 32] [--pool 4000] [--seeds 0]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=32, help="labelled rows a class (train; val alike)")
    p.add_argument("--pool", type=int, default=4000)
    p.add_argument("--seeds", default="0")
    p.add_argument("--teachers", default="prompt,contrastive")
    p.add_argument("--targets", default="soft,hard")
    p.add_argument("--student-epochs", type=int, default=2)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--out", help="folder for the runs (default: a temporary one)")
    a = p.parse_args()

    import pandas as pd

    import textune
    from textune.data import resolve_data
    from textune.prompting import PromptArgs, run_prompt

    work = Path(a.out or tempfile.mkdtemp(prefix="textune-distill-"))
    work.mkdir(parents=True, exist_ok=True)
    df = pd.read_csv(resolve_data("rt-polarity"), keep_default_na=False)[["text", "label"]]
    test = df.sample(1000, random_state=123)
    rest = df.drop(test.index)
    test.to_csv(work / "test.csv", index=False)
    classes = sorted(df["label"].unique())
    rows = []

    def note(seed, name, m, **extra):
        r = {"seed": seed, "run": name, "accuracy": m["accuracy"],
             "train_s": m.get("train_seconds"), **extra}
        t = m.get("teacher")
        if t:
            r["vs_teacher"] = t["student_minus_teacher"]["difference"]
            r["vs_teacher_ci95"] = t["student_minus_teacher"]["ci95"]
            r["teacher_texts_per_s"] = t.get("texts_per_second")  # (None: from the cache)
        rows.append(r)
        print(json.dumps(r), flush=True)

    for seed in map(int, a.seeds.split(",")):
        picked = [rest[rest["label"] == c].sample(2 * a.n, random_state=seed) for c in classes]
        train = pd.concat([g.iloc[:a.n] for g in picked])
        val = pd.concat([g.iloc[a.n:] for g in picked])
        pool = rest.drop(train.index).drop(val.index).sample(a.pool, random_state=seed)
        files = {k: work / f"{k}-{seed}.csv" for k in ("train", "val", "pool")}
        train.to_csv(files["train"], index=False)
        val.to_csv(files["val"], index=False)
        pool[["text"]].to_csv(files["pool"], index=False)
        common = dict(val=str(files["val"]), test=str(work / "test.csv"), model="minilm-l6",
                      max_length=a.max_length, seed=seed, progress=False, overwrite=True)

        teachers = {}
        for kind in a.teachers.split(","):
            out = work / f"teacher-{kind}-{seed}"
            if kind == "prompt":
                m = run_prompt(PromptArgs(model="smollm2-135m", data=str(files["train"]),
                                          val=str(files["val"]), test=str(work / "test.csv"),
                                          template="Text: {text}\nSentiment:", seed=seed,
                                          out=str(out)), progress=False, overwrite=True)
                m["train_seconds"] = 0.0
            else:
                m = textune.fit(str(files["train"]), out, strategy="contrastive", epochs=100,
                                **common).metrics
            teachers[kind] = out
            note(seed, f"teacher {kind}", m)
        m = textune.fit(str(files["train"]), work / f"labelled-full-{seed}", strategy="full",
                        epochs=20, **common).metrics
        note(seed, "labelled only, full", m)
        for kind, out in teachers.items():
            for how in a.targets.split(","):
                run = work / f"student-{kind}-{how}-{seed}"
                m = textune.fit(str(files["train"]), run, strategy="full",
                                epochs=a.student_epochs, unlabelled=str(files["pool"]),
                                teacher=str(out), teacher_targets=how, **common).metrics
                clf = textune.load(run)
                t0 = time.perf_counter()
                clf.predict_proba(test["text"].tolist())
                speed = len(test) / (time.perf_counter() - t0)
                note(seed, f"student of {kind}, {how}", m, student_texts_per_s=round(speed, 1))
    r = pd.DataFrame(rows)
    print(f"\nrt-polarity, {a.n} labelled rows a class (+ as many for validation), pool "
          f"{a.pool}, 1,000 test rows; mean over seeds {a.seeds}")
    print(r.groupby("run", sort=False)[["accuracy", "train_s"]].mean().round(4).to_string())
    r.to_csv(work / "distill.csv", index=False)
    print(f"runs: {work}")


if __name__ == "__main__":
    main()
