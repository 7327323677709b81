"""Rows whose label looks wrong. ``textune cv`` scores every row with a model that never saw
it; confident learning (Northcutt et al., 2021; the ``cleanlab`` library) turns those
out-of-fold probabilities into a list of rows whose given label the predictions contradict,
most likely first. ``train --exclude-rows`` leaves such rows out of a later run's training
split."""

from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger(__name__)

LABEL_ISSUES = "label_issues.csv"


def label_issues(df, names: list[str], *, multi_label: bool = False, sep: str = "|"):
    """The rows of ``df`` (out-of-fold predictions: ``label``, ``p_<name>`` columns) that
    cleanlab's ``find_label_issues`` flags, most likely mislabelled first (lowest probability
    of the given label). Adds ``p_label``: the probability the model gives the row's label
    (multi-label: of its least likely given tag, or of its most likely missing one, whichever is
    lower), and ``suggested``: the model's label for the row (multi-label: its tags at 0.5)."""
    from cleanlab.filter import find_label_issues
    from cleanlab.multilabel_classification.filter import find_label_issues as find_tag_issues

    index = {n: i for i, n in enumerate(names)}
    probs = np.clip(df[[f"p_{n}" for n in names]].astype(float).to_numpy(), 0.0, 1.0)
    if multi_label:
        given = [[index[t] for t in cell.split(sep) if t] for cell in df["label"]]
        onehot = np.zeros_like(probs)
        for r, tags in enumerate(given):
            onehot[r, tags] = 1
        ranked = find_tag_issues(given, probs, n_jobs=1,
                                 return_indices_ranked_by="self_confidence")
        p_label = np.where(onehot > 0, probs, 1 - probs).min(axis=1)
        suggested = [sep.join(names[j] for j in np.flatnonzero(p >= 0.5)) for p in probs]
    else:
        y = df["label"].map(index).to_numpy()
        probs = probs / probs.sum(axis=1, keepdims=True).clip(1e-12)  # (rounded in the file)
        ranked = find_label_issues(y, probs, n_jobs=1, return_indices_ranked_by="self_confidence")
        p_label = probs[np.arange(len(y)), y]
        suggested = [names[j] for j in probs.argmax(1)]
    ranked = np.asarray(ranked, dtype=int)
    out = df.iloc[ranked].copy()
    keep = [c for c in ("row", "fold", "text", "text_pair", "label") if c in out.columns]
    out = out[keep + [c for c in out.columns if c.startswith("p_")]]
    out.insert(len(keep), "suggested", [suggested[i] for i in ranked])
    out.insert(len(keep) + 1, "p_label", np.round(p_label[ranked], 4))
    return out.reset_index(drop=True)
