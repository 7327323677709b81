"""Accuracy, macro-F1, per-class precision/recall/F1, the confusion matrix, and how far to trust
them: bootstrap confidence intervals, paired differences between two classifiers on the same
rows, and the calibration error of the predicted probabilities."""

from __future__ import annotations

import numpy as np

RESAMPLES = 1000  # bootstrap resamples: the 2.5/97.5 percentiles move by < 0.1 pt beyond this
ECE_BINS = 15


def classification_metrics(y_true: np.ndarray, logits: np.ndarray, names: list[str], *,
                           uncertainty: bool = False, probabilities: bool = True,
                           thresholds: np.ndarray | None = None) -> dict:
    """Metrics of ``logits`` against ``y_true``. ``uncertainty``: also 95% bootstrap intervals
    of accuracy and macro-F1 and, when the logits' softmax is a probability
    (``probabilities``), the expected calibration error. Multi-label ``y_true`` (0/1 rows):
    see :func:`multilabel_metrics`."""
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

    if np.ndim(y_true) == 2:
        return multilabel_metrics(y_true, logits, names, thresholds, uncertainty=uncertainty)
    y_pred = logits.argmax(-1)
    labels = list(range(len(names)))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    out = {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(np.mean(f)),
        "per_class": {n: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                          "support": int(s[i])} for i, n in enumerate(names)},
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        "labels": names,
        "n_eval": int(len(y_true)),
    }
    if uncertainty and len(y_true):
        acc, f1 = bootstrap(y_true, [y_pred], len(names))
        out["accuracy_ci95"] = interval(acc[0])
        out["macro_f1_ci95"] = interval(f1[0])
        out["bootstrap_resamples"] = RESAMPLES
        if probabilities:
            probs = softmax(logits)
            out["ece"] = round(calibration_error(y_true, probs), 4)
            out["by_confidence"] = confidence_table(y_true, probs)
    return out


CONFIDENCE_LEVELS = (0.0, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)


def confidence_table(y_true: np.ndarray, probs: np.ndarray,
                     levels: tuple[float, ...] = CONFIDENCE_LEVELS) -> list[dict]:
    """Accuracy on the rows whose top probability is at least each level, and the share of rows
    that is (coverage): what ``predict --min-confidence`` keeps, and how often it is right. The
    rest would go to a person."""
    top = probs.max(1)
    right = probs.argmax(1) == y_true
    table = []
    for t in levels:
        kept = top >= t
        n = int(kept.sum())
        table.append({"min_confidence": t, "rows": n,
                      "coverage": round(n / max(len(top), 1), 4),
                      "accuracy": round(float(right[kept].mean()), 4) if n else None})
    return table


def multilabel_metrics(y_true: np.ndarray, logits: np.ndarray, names: list[str],
                       thresholds: np.ndarray | None = None, *, uncertainty: bool = False) -> dict:
    """Multi-label metrics: a tag is predicted where its sigmoid probability reaches its
    threshold (0.5 unless given). ``accuracy`` is exact match (every tag of a row right);
    ``macro_f1`` the mean of the tags' F1, ``micro_f1`` F1 over all (row, tag) decisions,
    ``hamming_loss`` the share of wrong decisions. ``uncertainty``: 95% bootstrap intervals of
    accuracy and macro-F1."""
    y = np.asarray(y_true) > 0.5
    pred = sigmoid(logits) >= (0.5 if thresholds is None else np.asarray(thresholds))
    tp, fp, fn = _tag_counts(y, pred)
    p = np.divide(tp, tp + fp, out=np.zeros_like(tp), where=tp + fp > 0)
    r = np.divide(tp, tp + fn, out=np.zeros_like(tp), where=tp + fn > 0)
    f = _f1(tp, fp, fn)
    micro = 2 * tp.sum() / max(2 * tp.sum() + fp.sum() + fn.sum(), 1)
    right = (y == pred).all(1)
    out = {
        "multi_label": True,
        "accuracy": float(right.mean()) if len(y) else 0.0,
        "macro_f1": float(f.mean()),
        "micro_f1": float(micro),
        "hamming_loss": float((y != pred).mean()) if len(y) else 0.0,
        "per_class": {n: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                          "support": int(y[:, i].sum())} for i, n in enumerate(names)},
        "labels": names,
        "thresholds": [round(float(t), 4) for t in np.broadcast_to(
            0.5 if thresholds is None else thresholds, (len(names),))],
        "n_eval": int(len(y)),
    }
    if uncertainty and len(y):
        acc = np.empty(RESAMPLES)
        f1 = np.empty(RESAMPLES)
        for cols, idx in _index_chunks(len(y), RESAMPLES, 0):
            # each resample as row counts: its per-tag counts are a matrix product
            w = np.stack([np.bincount(i, minlength=len(y)) for i in idx]).astype(np.float64)
            acc[cols] = w @ right / len(y)
            f1[cols] = _f1(w @ (y & pred), w @ (~y & pred), w @ (y & ~pred)).mean(1)
        out["accuracy_ci95"] = interval(acc)
        out["macro_f1_ci95"] = interval(f1)
        out["bootstrap_resamples"] = RESAMPLES
    return out


def _tag_counts(y: np.ndarray, pred: np.ndarray, axis=0) -> tuple[np.ndarray, ...]:
    """True positives, false positives, false negatives (as floats), summed over ``axis``:
    the rows, giving one count per tag."""
    return tuple((a & b).sum(axis).astype(np.float64) for a, b in
                 ((y, pred), (~y, pred), (y, ~pred)))


def _f1(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    """F1 from counts (0 where a tag is never true nor predicted, as sklearn's
    ``zero_division=0``)."""
    denom = 2 * tp + fp + fn
    return np.divide(2 * tp, denom, out=np.zeros_like(tp, dtype=np.float64), where=denom > 0)


THRESHOLD_GRID = np.round(np.arange(0.05, 0.951, 0.05), 2)
MIN_THRESHOLD_POSITIVES = 5  # per tag: a tag with fewer validation rows takes the shared one


def fit_thresholds(logits: np.ndarray, y_true: np.ndarray, per_tag: bool = False) -> np.ndarray:
    """Decision thresholds chosen on held-out rows from the grid 0.05 ... 0.95, ties to the
    one nearest 0.5: one for every tag, the best for F1 over all (row, tag) decisions; with
    ``per_tag``, each tag with ``MIN_THRESHOLD_POSITIVES`` positive rows or more gets the best
    for its own F1 (the others the shared one). One shared threshold has one number to fit;
    per tag, a small validation split overfits (measured: docs/BENCHMARKS.md)."""
    probs = sigmoid(logits)
    y = np.asarray(y_true) > 0.5

    def best(p: np.ndarray, t: np.ndarray) -> float:  # p, t: [rows, tags]
        pred = p[..., None] >= THRESHOLD_GRID  # [rows, tags, grid]
        t = t[..., None]
        f1 = _f1(*_tag_counts(t, pred, axis=(0, 1)))  # one F1 per grid threshold
        top = np.flatnonzero(f1 >= f1.max() - 1e-12)
        return float(THRESHOLD_GRID[top[np.argmin(np.abs(THRESHOLD_GRID[top] - 0.5))]])

    out = np.full(y.shape[1], best(probs, y) if len(y) else 0.5)
    if per_tag:
        for k in np.flatnonzero(y.sum(0) >= MIN_THRESHOLD_POSITIVES):
            out[k] = best(probs[:, k:k + 1], y[:, k:k + 1])
    return out


def bootstrap(y_true: np.ndarray, preds: list[np.ndarray], n_classes: int,
              resamples: int = RESAMPLES, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Accuracy and macro-F1 of each prediction in ``preds`` on ``resamples`` bootstrap
    resamples of the rows, the same resamples for every prediction (so differences between
    them are paired). Returns two arrays of shape [len(preds), resamples]."""
    y = np.asarray(y_true, dtype=np.int64)
    acc = np.empty((len(preds), resamples))
    f1 = np.empty((len(preds), resamples))
    for cols, idx in _index_chunks(len(y), resamples, seed):
        for j, pred in enumerate(preds):
            acc[j, cols], f1[j, cols] = resampled_scores(y, pred, idx, n_classes)
    return acc, f1


def _index_chunks(n: int, resamples: int, seed: int):
    """Bootstrap resamples of ``n`` rows as index matrices, a chunk of resamples at a time
    (each matrix at most ~16 MB): yields (the resamples' slice, their [r, n] indices). The same
    ``seed`` gives the same resamples to every caller."""
    rng = np.random.default_rng(seed)
    chunk = max(1, 2_000_000 // max(n, 1))
    for start in range(0, resamples, chunk):
        r = min(chunk, resamples - start)
        yield slice(start, start + r), rng.integers(0, n, size=(r, n))


def bootstrap_means(values: np.ndarray, resamples: int = RESAMPLES,
                    seed: int = 0) -> np.ndarray:
    """Means over bootstrap resamples of the columns of ``values`` [m, n] (one line per
    classifier, one column per row: e.g. 1 where it was right), the same resamples for every
    line. Returns [m, resamples]."""
    values = np.asarray(values, dtype=np.float64)
    out = np.empty((len(values), resamples))
    for cols, idx in _index_chunks(values.shape[1], resamples, seed):
        out[:, cols] = values[:, idx].mean(-1)
    return out


def resampled_scores(y: np.ndarray, pred: np.ndarray, idx: np.ndarray,
                     k: int) -> tuple[np.ndarray, np.ndarray]:
    """Accuracy and macro-F1 (absent classes count 0, as sklearn's ``zero_division=0``) of the
    rows each line of the index matrix ``idx`` picks, from one confusion matrix per line."""
    r = len(idx)
    code = np.asarray(y, dtype=np.int64) * k + np.asarray(pred, dtype=np.int64)
    offset = (np.arange(r) * k * k)[:, None]
    cm = np.bincount((code[idx] + offset).ravel(), minlength=r * k * k).reshape(r, k, k)
    tp = np.diagonal(cm, axis1=1, axis2=2).astype(np.float64)
    denom = cm.sum(1) + cm.sum(2)  # per class: 2 tp + fp + fn
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0).mean(1)
    return tp.sum(1) / idx.shape[1], f1


def interval(samples: np.ndarray) -> list[float]:
    """The central 95% of bootstrap ``samples``."""
    lo, hi = np.percentile(samples, [2.5, 97.5])
    return [round(float(lo), 4), round(float(hi), 4)]


def calibration_error(y_true: np.ndarray, probs: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error: the gap between confidence (the top probability) and
    accuracy, averaged over equal-width confidence bins weighted by their rows."""
    conf = probs.max(-1)
    right = probs.argmax(-1) == np.asarray(y_true)
    which = np.minimum((conf * bins).astype(np.int64), bins - 1)
    gap = np.bincount(which, weights=conf - right, minlength=bins)
    return float(np.abs(gap).sum() / max(len(conf), 1))


def fit_temperature(logits: np.ndarray, y_true: np.ndarray) -> float:
    """Temperature scaling (Guo et al. 2017): the T > 0 that minimises the negative
    log-likelihood of softmax(logits / T) on held-out rows. Dividing by T never changes which
    class is predicted; it makes the probabilities mean what they say."""
    from scipy.optimize import minimize_scalar

    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(y_true, dtype=np.int64)

    def nll(log_t: float) -> float:
        s = z / np.exp(log_t)
        s = s - s.max(1, keepdims=True)
        return float(np.mean(np.log(np.exp(s).sum(1)) - s[np.arange(len(y)), y]))

    r = minimize_scalar(nll, bounds=(np.log(0.05), np.log(20.0)), method="bounded")
    return float(np.exp(r.x))


def sigmoid(logits: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(logits, dtype=np.float64)))


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)
