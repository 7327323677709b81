"""cv's label_issues.csv (confident learning on out-of-fold predictions) and
train --exclude-rows."""

import json
import random

import numpy as np
import pandas as pd
import pytest

from textune.cli import main
from textune.labelissues import label_issues

from .conftest import POS, toy_rows, write_csv


@pytest.fixture
def noisy_csv(tmp_path):
    """Toy sentiment rows with 45 labels flipped, and two empty texts (dropped on reading, so
    data rows and the file's rows differ)."""
    rows = toy_rows(900, seed=3)
    flipped = set(random.Random(1).sample(range(len(rows)), 45))
    rows = [(t, ("neg" if y == "pos" else "pos") if i in flipped else y)
            for i, (t, y) in enumerate(rows)]
    rows[5:5] = [("", "pos")]
    rows[300:300] = [("", "neg")]
    path = write_csv(tmp_path / "noisy.csv", rows)
    data = pd.read_csv(path, keep_default_na=False)
    truth = {i for i, (t, y) in enumerate(zip(data["text"], data["label"]))
             if t and (bool(set(t.split()) & set(POS)) != (y == "pos"))}
    return path, data, truth


def test_cv_lists_the_flipped_labels_and_train_can_leave_them_out(tiny_bert, noisy_csv,
                                                                   tmp_path, capsys):
    path, data, truth = noisy_csv
    assert len(truth) == 45  # (the cue word decides the true label)
    out = tmp_path / "cv"
    assert main(["cv", "--model", str(tiny_bert), "--data", str(path), "--folds", "3",
                 "--lr", "1e-3", "--epochs", "6", "--max-length", "16", "--out", str(out),
                 "--quiet"]) == 0
    assert "look mislabelled" in capsys.readouterr().out
    issues = pd.read_csv(out / "label_issues.csv", keep_default_na=False)
    assert json.loads((out / "cv.json").read_text())["label_issues"] == len(issues)
    # row = the row of the data file (the empty texts are not counted away)
    assert (data.loc[issues["row"], "text"].to_numpy() == issues["text"].to_numpy()).all()
    assert (data.loc[issues["row"], "label"].to_numpy() == issues["label"].to_numpy()).all()
    found = set(issues["row"])
    # (measured: 45 of 45 found, among 52 flagged)
    assert len(found & truth) >= 40 and len(found & truth) >= 0.75 * len(found), (found, truth)
    assert (issues["suggested"] != issues["label"]).all()
    assert issues["p_label"].is_monotonic_increasing  # most likely mislabelled first

    runs = {}
    for name, extra in (("all", []), ("clean", ["--exclude-rows", str(out / "label_issues.csv")])):
        runs[name] = tmp_path / name
        assert main(["train", "--model", str(tiny_bert), "--data", str(path), "--lr", "1e-3",
                     "--epochs", "2", "--max-length", "16", "--out", str(runs[name]), "--quiet",
                     *extra]) == 0
    m = {k: json.loads((v / "metrics.json").read_text()) for k, v in runs.items()}
    left_out = m["clean"]["splits"]["excluded_from_train"]
    assert 0 < left_out <= len(issues)
    assert m["clean"]["splits"]["train"] == m["all"]["splits"]["train"] - left_out
    # the test rows are the same, so the two runs compare on them
    tests = [pd.read_csv(v / "predictions.csv", keep_default_na=False) for v in runs.values()]
    assert tests[0]["text"].tolist() == tests[1]["text"].tolist()


def test_exclude_rows_refuses_a_file_that_does_not_fit(tiny_bert, toy_csv, tmp_path, capsys):
    bad = {"no_row.csv": "text\nx\n", "words.csv": "row\nten\n", "far.csv": "row\n5000\n"}
    msgs = ["no `row` column", "whole numbers", "row 5000 is not a row of --data"]
    for (name, body), msg in zip(bad.items(), msgs):
        (tmp_path / name).write_text(body)
        assert main(["train", "--model", str(tiny_bert), "--data", str(toy_csv), "--epochs", "1",
                     "--exclude-rows", str(tmp_path / name), "--out", str(tmp_path / "r"),
                     "--quiet"]) == 2
        assert msg in capsys.readouterr().err


def test_label_issues_ranks_contradicted_labels_single_and_multi_label():
    rng = np.random.default_rng(0)
    n = 300
    y = rng.integers(0, 3, n)
    probs = np.full((n, 3), 0.05)
    probs[np.arange(n), y] = 0.9
    given = y.copy()
    given[:15] = (y[:15] + 1) % 3  # labels the confident model contradicts
    names = ["a", "b", "c"]
    df = pd.DataFrame({"text": [f"t{i}" for i in range(n)], "label": [names[i] for i in given],
                       **{f"p_{c}": probs[:, j] for j, c in enumerate(names)}})
    out = label_issues(df, names)
    assert set(out["text"]) == {f"t{i}" for i in range(15)}
    assert (out["suggested"] == [names[y[int(t[1:])]] for t in out["text"]]).all()
    # multi-label: a tag the model is sure is missing, and one given that it is sure is wrong
    tags = ["a|b" if i % 2 else "c" for i in range(n)]
    p = np.array([[0.95, 0.95, 0.03] if i % 2 else [0.02, 0.03, 0.96] for i in range(n)])
    tags[0], tags[1] = "c|a", "a"
    df = pd.DataFrame({"label": tags, **{f"p_{c}": p[:, j] for j, c in enumerate(names)}})
    out = label_issues(df, names, multi_label=True)
    assert set(out.index) == {0, 1} and set(out["label"]) == {"c|a", "a"}
    assert set(out["suggested"]) == {"c", "a|b"}


def test_cv_md_cautions_when_the_model_behind_the_list_is_weak():
    from textune.crossval import markdown

    def md(acc):
        return markdown({"strategy": "frozen", "model": "m", "data": "d", "folds": 5,
                         "split_seed": 0, "epochs": 20, "runs": [], "label_issues": 30,
                         "pooled": {"accuracy": acc, "accuracy_ci95": [acc - .01, acc + .01],
                                    "macro_f1": acc, "macro_f1_ci95": [acc - .01, acc + .01],
                                    "n_eval": 1000}})

    assert "30 of 1000 rows (3.0%) look mislabelled" in md(0.95)
    assert "only as good as the model" not in md(0.95)
    assert "at 78% out-of-fold accuracy" in md(0.78)
