"""`textune cv`: k-fold cross-validation. On a small data set one test split of 10% knows
accuracy to ±5-10 points; K runs, each tested on a different fold, score every row once. The
pooled out-of-fold predictions give tighter intervals, and the rows whose label they contradict
(label_issues.csv, confident learning) are the ones most worth checking for a wrong label."""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .config import RunConfig
from .multirun import run_recorded, table_cell

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)


WEAK_MODEL = 0.9
"""Out-of-fold accuracy under which cv.md warns that label_issues.csv holds many model errors
(rt-polarity, frozen 0.775 and full 0.838: the 25 rows listed first were, read one by one,
right labels the model missed). Accuracy alone cannot tell a weak model from noisy labels
(bbc-news with 10% or 30% of labels flipped: 0.86 and 0.67 against the noisy labels, and
85-95% of the listed rows were flipped ones), so this is a caution, not a verdict."""


@dataclass
class CrossValidation:
    """What ``textune.cv`` returns. ``accuracy`` / ``macro_f1`` (and their ``_ci95``) score the
    pooled out-of-fold predictions (None if a fold failed); ``folds``: one row a fold;
    ``predictions``: every row of ``data`` once, predicted by the run that did not train on it
    (its ``fold`` and its ``row`` in ``data``); ``label_issues``: the rows whose label looks
    wrong, most likely first (None without cleanlab); ``summary``: ``out``/cv.json."""

    summary: dict
    folds: pd.DataFrame
    predictions: pd.DataFrame | None
    label_issues: pd.DataFrame | None

    def _pooled(self, key):
        return (self.summary.get("pooled") or {}).get(key)

    accuracy = property(lambda self: self._pooled("accuracy"))
    accuracy_ci95 = property(lambda self: self._pooled("accuracy_ci95"))
    macro_f1 = property(lambda self: self._pooled("macro_f1"))
    macro_f1_ci95 = property(lambda self: self._pooled("macro_f1_ci95"))

    def __repr__(self) -> str:
        s = self.summary
        head = f"CrossValidation({s['strategy']} {s['model']}, {s['folds']} folds"
        if self.accuracy is None:
            return head + f", {sum(r['status'] == 'ok' for r in s['runs'])} finished)"
        lo, hi = self.accuracy_ci95
        issues = "" if self.label_issues is None else f", {len(self.label_issues)} label issues"
        return head + f": accuracy {self.accuracy:.4f} [{lo:.4f}, {hi:.4f}], macro-F1 " \
                      f"{self.macro_f1:.4f}{issues})"


def cv(data, out, *, folds: int = 5, overwrite: bool = False, progress: bool = True,
       processes: int = 1, **options) -> CrossValidation:
    """``textune cv`` from Python: train once per fold of ``data`` (a file, a catalog name or a
    DataFrame), each run tested on its fold; ``options`` as in ``fit`` (``strategy="full"`` by
    default). Writes what the command writes under ``out`` (cv.md, predictions.csv,
    label_issues.csv, report.html, a folder a fold)."""
    import pandas as pd

    from .api import prepare_out_dir
    from .labelissues import LABEL_ISSUES
    from .report import PREDICTIONS

    # (with the folds: --folds and --test are checked before a folder is made)
    base = RunConfig.from_options(data=data, out=out, folds=folds, fold=0, **options).validate()
    folder = prepare_out_dir(out, overwrite)
    s = run_cv(base, folds, folder, progress=progress, processes=processes)
    table = pd.DataFrame(s["runs"]).set_index("fold")

    def read(name: str):  # (texts as written: an empty one stays "", not NaN)
        return pd.read_csv(folder / name, keep_default_na=False) if (folder / name).exists() \
            else None

    return CrossValidation(s, table, read(PREDICTIONS) if "pooled" in s else None,
                           read(LABEL_ISSUES) if s.get("label_issues") is not None else None)


def run_cv(base: RunConfig, folds: int, out: Path, *, progress: bool = True,
           processes: int = 1) -> dict:
    """Train ``base`` once per fold (its own process), then pool the folds' test predictions
    into ``out``/predictions.csv and score them: cv.md, cv.json, metrics.json, report.html."""
    if base.data.split_seed is None:
        base.data.split_seed = base.split_seed
    from .api import load_splits

    probe = copy.deepcopy(base)
    probe.data.folds, probe.data.fold = folds, 0
    # bad data or flags (--folds, --test: RunConfig.validate): one clear error, before training
    load_splits(probe.validate())
    fold_rows = []  # each fold's test rows: their places in --data (for label_issues.csv)
    quiet, data_log = logging.getLogger("textune"), logging.getLogger("textune").level
    quiet.setLevel(logging.ERROR)  # (the warnings about --data were given once, above)
    try:
        for k in range(folds):
            probe.data.fold = k
            fold_rows.append(load_splits(probe).test.rows)
    finally:
        quiet.setLevel(data_log)
    runs = []
    for k in range(folds):
        cfg = copy.deepcopy(base)
        cfg.data.folds, cfg.data.fold = folds, k
        cfg.out = str(out / f"fold-{k}")
        log.info("=== fold %d of %d ===", k + 1, folds)
        record, m = run_recorded(cfg, progress, processes,
                                 ("accuracy", "macro_f1", "train_seconds", "n_eval"), f"fold {k}")
        runs.append({"fold": k, **record, "train_rows": (m.get("splits") or {}).get("train")})
    summary = pool(runs, out, base, folds, fold_rows)
    (out / "cv.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "cv.md").write_text(markdown(summary) + "\n")
    return summary


def pool(runs: list[dict], out: Path, base: RunConfig, folds: int,
         fold_rows: list[list[int] | None] | None = None) -> dict:
    """The folds' test predictions as one file (every row once, its fold and its ``row`` in
    --data beside it) and the metrics of that file; with each fold's own scores, their mean and
    spread; and the rows whose label looks wrong (label_issues.csv)."""
    import pandas as pd

    from .data import TAG_JOIN, write_frame
    from .metrics import classification_metrics
    from .report import PREDICTIONS, read_predictions, write_report

    ok = [r for r in runs if r["status"] == "ok"]
    summary: dict = {"model": base.model.model, "data": base.data.data,
                     "strategy": base.strategy.name, "folds": folds,
                     "split_seed": base.split_seed, "epochs": base.epochs,
                     "multi_label": base.data.multi_label, "runs": runs}
    if not ok:
        return summary
    for key in ("accuracy", "macro_f1"):
        vals = [r[key] for r in ok]
        summary[f"{key}_mean"] = float(np.mean(vals))
        summary[f"{key}_sd"] = float(np.std(vals, ddof=1)) if len(vals) > 1 else None
    if len(ok) < len(runs):
        return summary  # pooled scores need every row's prediction
    names = json.loads((Path(ok[0]["run"]) / "labels.json").read_text(encoding="utf-8"))
    frames = []
    for r in ok:
        f = read_predictions(r["run"])
        if f is None:
            return summary  # (a run folder someone emptied)
        f.insert(0, "fold", r["fold"])
        rows = fold_rows[r["fold"]] if fold_rows else None
        if rows is not None and len(rows) == len(f):
            f.insert(1, "row", rows)
        frames.append(f)
    df = pd.concat(frames, ignore_index=True)
    if "row" in df.columns:
        if df["row"].isna().any():  # (a fold whose rows were not known)
            df = df.drop(columns="row")
        else:
            df["row"] = df["row"].astype(int)
    index = {n: i for i, n in enumerate(names)}
    sep = TAG_JOIN
    if base.data.multi_label:  # each fold decided with its own thresholds: score the decisions
        sep = RunConfig.load(Path(ok[0]["run"]) / "config.json").data.label_sep or TAG_JOIN

        def tags(col) -> np.ndarray:
            out = np.zeros((len(df), len(names)), dtype=np.float32)
            for r, cell in enumerate(df[col]):
                out[r, [index[t] for t in cell.split(sep) if t]] = 1
            return out

        m = classification_metrics(tags("label"), np.where(tags("predicted") > 0, 1.0, -1.0),
                                   names, uncertainty=True)
        m.pop("thresholds")  # (each fold's own: in its calibration.json)
    else:
        y = df["label"].map(index).to_numpy()
        probs = df[[f"p_{n}" for n in names]].astype(float).to_numpy()
        # the probabilities' logs as logits: the same argmax; their softmax is the probabilities
        m = classification_metrics(y, np.log(np.clip(probs, 1e-12, None)), names,
                                   uncertainty=True)
    m.update({"split": f"out-of-fold predictions ({folds} folds)", "model": base.model.model,
              "strategy": base.strategy.name})
    write_frame(df, out / PREDICTIONS)
    (out / "metrics.json").write_text(json.dumps(m, indent=2, ensure_ascii=False) + "\n")
    write_report(out, m, title=f"textune cv: {base.strategy.name} on {base.data.data}, "
                               f"{folds} folds")
    summary["pooled"] = {k: m[k] for k in ("accuracy", "accuracy_ci95", "macro_f1",
                                           "macro_f1_ci95", "n_eval", "micro_f1") if k in m}
    summary["label_issues"] = write_label_issues(df, names, out, base.data.multi_label, sep)
    return summary


def write_label_issues(df, names: list[str], out: Path, multi_label: bool, sep: str) -> int | None:
    """label_issues.csv: the rows confident learning flags in the out-of-fold predictions; how
    many (None where it could not run)."""
    from .data import write_frame
    from .labelissues import LABEL_ISSUES, label_issues

    try:
        issues = label_issues(df, names, multi_label=multi_label, sep=sep)
    except ImportError:
        log.warning("label_issues.csv needs the cleanlab package: pip install cleanlab")
        return None
    write_frame(issues, out / LABEL_ISSUES)
    log.info("%d of %d rows (%.1f%%) look mislabelled: %s, most likely first", len(issues),
             len(df), 100 * len(issues) / max(len(df), 1), out / LABEL_ISSUES)
    return len(issues)


def markdown(s: dict) -> str:
    lines = [f"# textune cv: {s['strategy']} {s['model']} on {s['data']}", "",
             f"{s['folds']} stratified folds (seed {s['split_seed']}); each run tested on one fold, "
             f"its validation split drawn from the others; epochs {s['epochs']}.", "",
             "| fold | training rows | test rows | accuracy | macro-F1 | train s | status |",
             "|---|---|---|---|---|---|---|"]
    for r in s["runs"]:
        lines.append("| " + " | ".join(table_cell(k, r.get(k), r) for k in (
            "fold", "train_rows", "n_eval", "accuracy", "macro_f1", "train_seconds"))
            + f" | {r['status']} |")
    if "accuracy_mean" in s:
        sd = s.get("accuracy_sd")
        lines += ["", f"Mean over folds: accuracy {s['accuracy_mean']:.4f}"
                  + (f" (sd {sd:.4f})" if sd is not None else "")
                  + f", macro-F1 {s['macro_f1_mean']:.4f}."]
    p = s.get("pooled")
    if p:
        acc = "exact-match accuracy" if s.get("multi_label") else "accuracy"
        micro = f", micro-F1 {p['micro_f1']:.4f}" if "micro_f1" in p else ""
        lines += [f"Every row, out of fold (n={p['n_eval']}): {acc} {p['accuracy']:.4f} "
                  f"[{p['accuracy_ci95'][0]:.3f}, {p['accuracy_ci95'][1]:.3f}], macro-F1 "
                  f"{p['macro_f1']:.4f} [{p['macro_f1_ci95'][0]:.3f}, "
                  f"{p['macro_f1_ci95'][1]:.3f}]{micro} (95% bootstrap intervals over the "
                  f"rows; they leave out how the folds' models differ, which the sd above shows).",
                  "", "predictions.csv: every row with its fold and out-of-fold prediction; "
                  + ("report.html lists the rows with a wrong tag." if s.get("multi_label") else
                     "report.html lists the most confident mistakes, often wrong labels.")]
    n = s.get("label_issues")
    if n is not None and p:
        lines += ["", f"**{n} of {p['n_eval']} rows ({100 * n / p['n_eval']:.1f}%) look "
                  f"mislabelled** (confident learning, cleanlab): label_issues.csv lists them, "
                  f"most likely first, with their `row` in the data file and the label the "
                  f"model suggests. Check them; to train without them: `textune train ... "
                  f"--exclude-rows label_issues.csv` (training split only, so the test rows "
                  f"stay the same)."]
        if p["accuracy"] < WEAK_MODEL:
            lines.append(f"The list is only as good as the model behind it: at {p['accuracy']:.0%} "
                         f"out-of-fold accuracy (against the labels as given), many of these "
                         f"rows may be right labels the model gets wrong (sarcasm, negation, "
                         f"hard cases) rather than wrong labels. Read them before dropping "
                         f"any.")
    return "\n".join(lines)
