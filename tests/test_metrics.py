import numpy as np
from sklearn.metrics import accuracy_score, f1_score

from textune.metrics import (
    bootstrap,
    bootstrap_means,
    calibration_error,
    classification_metrics,
    resampled_scores,
)


def test_resampled_scores_match_sklearn_on_each_resample():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 4, 300)
    pred = np.where(rng.random(300) < 0.7, y, rng.integers(0, 4, 300))
    idx = rng.integers(0, 300, (25, 300))
    idx[0] = 0  # one resample where three classes are absent: they count as F1 0, as in sklearn
    acc, f1 = resampled_scores(y, pred, idx, 4)
    for i in range(len(idx)):
        assert acc[i] == accuracy_score(y[idx[i]], pred[idx[i]])
        assert np.isclose(f1[i], f1_score(y[idx[i]], pred[idx[i]], labels=range(4),
                                          average="macro", zero_division=0))


def test_intervals_cover_the_score_and_narrow_with_more_rows():
    rng = np.random.default_rng(0)
    widths = []
    for n in (200, 5000):
        y = rng.integers(0, 3, n)
        pred = np.where(rng.random(n) < 0.8, y, (y + 1) % 3)
        m = classification_metrics(y, np.eye(3)[pred], ["a", "b", "c"], uncertainty=True)
        lo, hi = m["accuracy_ci95"]
        assert lo < m["accuracy"] < hi and m["macro_f1_ci95"][0] < m["macro_f1"]
        widths.append(hi - lo)
        # the binomial interval's half-width is ~1.96 sqrt(p(1-p)/n)
        assert np.isclose((hi - lo) / 2, 1.96 * np.sqrt(0.8 * 0.2 / n), rtol=0.25)
    assert widths[1] < widths[0] / 4
    assert "accuracy_ci95" not in classification_metrics(y, np.eye(3)[pred], ["a", "b", "c"])


def test_paired_resamples_see_a_difference_unpaired_intervals_hide():
    # b is right wherever a is, and on 4% more rows: the paired difference is clearly > 0
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 1000)
    a = np.where(rng.random(1000) < 0.75, y, 1 - y)
    b = a.copy()
    wrong = np.flatnonzero(a != y)[:40]
    b[wrong] = y[wrong]
    acc, _ = bootstrap(y, [b, a], 2)
    assert np.percentile(acc[1], 97.5) > np.percentile(acc[0], 2.5)  # the intervals overlap
    assert np.percentile(acc[0] - acc[1], 2.5) > 0.02  # the paired one excludes 0


def test_calibration_error():
    y = np.array([0, 1] * 50)
    overconfident = np.tile([0.9, 0.1], (100, 1))  # says 90%, right half of the time
    assert np.isclose(calibration_error(y, overconfident), 0.4)
    sure_and_right = np.eye(2)[y]
    assert calibration_error(y, sure_and_right) == 0


def test_a_wide_interval_is_a_caveat():
    from textune.report import caveats

    assert caveats({"accuracy_ci95": [0.74, 0.76], "n_eval": 5000}) == []
    (c,) = caveats({"accuracy_ci95": [0.70, 0.84], "n_eval": 120})
    assert "only 120 rows" in c and "±7%" in c


def test_bootstrap_means_of_right_answers_are_the_bootstrap_accuracies():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 3, 500)
    preds = [np.where(rng.random(500) < q, y, (y + 1) % 3) for q in (0.6, 0.9)]
    acc, _ = bootstrap(y, preds, 3, resamples=300, seed=5)
    means = bootstrap_means(np.stack([p == y for p in preds]), resamples=300, seed=5)
    assert np.allclose(acc, means)


def test_temperature_scaling_recovers_the_scale_and_calibrates():
    from textune.metrics import fit_temperature, softmax

    rng = np.random.default_rng(0)
    logits = rng.normal(0, 1, (3000, 3))
    logits[np.arange(3000), rng.integers(0, 3, 3000)] += 1.5
    y = np.array([rng.choice(3, p=p) for p in softmax(logits)])  # calibrated at T = 1
    for scale in (0.3, 3.0):  # under- and overconfident versions of the same classifier
        t = fit_temperature(logits * scale, y)
        assert np.isclose(t, scale, rtol=0.1)
        assert calibration_error(y, softmax(logits * scale / t)) < 0.03 < \
            calibration_error(y, softmax(logits * scale))


def test_confidence_table_is_accuracy_on_the_rows_kept():
    from textune.metrics import confidence_table

    y = np.array([0, 1, 1, 0])
    probs = np.array([[0.9, 0.1], [0.4, 0.6], [0.8, 0.2], [0.55, 0.45]])  # row 2 is wrong
    table = {r["min_confidence"]: r for r in confidence_table(y, probs, (0.0, 0.6, 0.8, 0.9,
                                                                         0.95))}
    assert (table[0.0]["coverage"], table[0.0]["accuracy"]) == (1.0, 0.75)
    assert (table[0.6]["rows"], table[0.6]["accuracy"]) == (3, round(2 / 3, 4))
    assert (table[0.8]["coverage"], table[0.8]["accuracy"]) == (0.5, 0.5)
    assert (table[0.9]["rows"], table[0.9]["accuracy"]) == (1, 1.0)
    assert table[0.95]["rows"] == 0 and table[0.95]["accuracy"] is None
