"""Multi-label classification: reading tag lists and 0/1 columns, the loss, thresholds,
metrics, prediction, serving and the report, on a tiny model built in the test."""

from __future__ import annotations

import json
import random

import numpy as np
import pandas as pd
import pytest

import textune
from textune.api import load_splits, train
from textune.cli import main
from textune.config import RunConfig
from textune.data import limit_indices, read_table, split_indices
from textune.errors import UserError
from textune.metrics import fit_thresholds, multilabel_metrics

from .conftest import FILL, NEG, POS, write_csv

DIGITS = [str(i) for i in range(10)]
CUES = {"pos": POS, "neg": NEG, "num": DIGITS}


def tag_rows(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """Each row carries a cue word for each of its tags (any subset of pos / neg / num, the
    empty one included) among filler words; the label cell is the tags joined by |."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        tags = [t for t in CUES if rng.random() < 0.45]
        words = rng.sample(FILL, rng.randint(3, 8)) + [rng.choice(CUES[t]) for t in tags]
        rng.shuffle(words)
        rows.append((" ".join(words), "|".join(tags)))
    return rows


@pytest.fixture
def tags_csv(tmp_path):
    return write_csv(tmp_path / "tags.csv", tag_rows(900))


def test_tag_cells_columns_and_lists_read_alike(tmp_path):
    rows = [("a", "x|y"), ("b", ""), ("c", "y"), ("d", "y|x|x")]
    piped = read_table(write_csv(tmp_path / "p.csv", rows), multi_label=True)
    assert piped.labels == [("x", "y"), (), ("y",), ("x", "y")] and piped.label_sep == "|"
    assert piped.multi_label
    flags = pd.DataFrame({"text": list("abcd"), "x": [1, 0, 0, "yes"], "y": ["1", "0", "1", "true"]})
    flags.to_csv(tmp_path / "f.csv", index=False)
    cols = read_table(tmp_path / "f.csv", label_col="x,y", multi_label=True)
    assert cols.labels == piped.labels
    (tmp_path / "l.jsonl").write_text("".join(
        json.dumps({"text": t, "tags": tags}) + "\n"
        for t, tags in zip("abcd", [["y", "x"], [], ["y"], ["x", "y"]])))
    assert read_table(tmp_path / "l.jsonl", label_col="tags", multi_label=True).labels == \
        piped.labels
    bad = pd.DataFrame({"text": ["a", "b"], "x": [1, 2], "y": [0, 1]})
    bad.to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(UserError, match=r"column 'x' at line 3 holds '2'"):
        read_table(tmp_path / "bad.csv", label_col="x,y", multi_label=True)


def test_split_keeps_rare_tags_in_every_split(tmp_path):
    rows = tag_rows(600)
    rows += [(f"rare {i} film", "rare|pos") for i in range(6)]
    table = read_table(write_csv(tmp_path / "t.csv", rows), multi_label=True)
    parts = split_indices(table, 0.1, 0.1, seed=0)
    for idx in parts:  # the 6 rows of the rarest tag, stratified on it: 2 per split or more
        assert sum("rare" in table.labels[i] for i in idx) >= 1
    assert sorted(i for p in parts for i in p) == list(range(len(table)))
    train_rows = limit_indices(parts[0], table.labels, 100, seed=0)
    assert len(train_rows) == 100 and set(train_rows) <= set(parts[0])
    few = read_table(write_csv(tmp_path / "few.csv", rows + [("odd one", "odd")]),
                     multi_label=True)
    with pytest.raises(UserError, match="tag 'odd' has only 1"):
        split_indices(few, 0.1, 0.1, seed=0)


def test_multilabel_metrics_agree_with_sklearn():
    from sklearn.metrics import accuracy_score, f1_score, hamming_loss

    rng = np.random.default_rng(0)
    y = (rng.random((300, 4)) < 0.3).astype(np.float32)
    logits = 3 * (2 * y - 1) + rng.normal(0, 3, y.shape)
    pred = logits >= 0
    m = multilabel_metrics(y, logits, list("abcd"), uncertainty=True)
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert m["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro", zero_division=0))
    assert m["micro_f1"] == pytest.approx(f1_score(y, pred, average="micro", zero_division=0))
    assert m["hamming_loss"] == pytest.approx(hamming_loss(y, pred))
    lo, hi = m["macro_f1_ci95"]
    assert lo < m["macro_f1"] < hi and hi - lo < 0.15
    lo, hi = m["accuracy_ci95"]
    assert lo < m["accuracy"] < hi


def test_thresholds_chosen_for_f1():
    rng = np.random.default_rng(1)
    y = (rng.random((2000, 2)) < 0.2).astype(np.float32)
    # tag 0's scores run low: its positives sit around probability 0.3, not above 0.5
    logits = np.stack([np.where(y[:, 0] > 0, -0.8, -3.0) + rng.normal(0, 0.4, 2000),
                       np.where(y[:, 1] > 0, 3.0, -3.0) + rng.normal(0, 0.4, 2000)], 1)
    t = fit_thresholds(logits, y, per_tag=True)
    assert 0.1 < t[0] < 0.3 and t[1] == pytest.approx(0.5, abs=0.35)
    shared = fit_thresholds(logits, y)
    assert shared[0] == shared[1] and 0.1 < shared[0] < 0.5  # (tag 1 is right at any of them)
    at_half = multilabel_metrics(y, logits, ["a", "b"])["macro_f1"]
    tuned = multilabel_metrics(y, logits, ["a", "b"], t)["macro_f1"]
    assert tuned > at_half + 0.2
    assert multilabel_metrics(y, logits, ["a", "b"], shared)["macro_f1"] > at_half + 0.2
    few = y.copy()
    few[4:, 0] = 0  # 4 positive rows at most: too few to choose on, so it takes the shared one
    t = fit_thresholds(logits, few, per_tag=True)
    assert t[0] == fit_thresholds(logits, few)[0]
    calibrated = np.stack([np.where(y[:, 0] > 0, 3.0, -3.0), logits[:, 1]], 1)
    assert list(fit_thresholds(calibrated, y)) == [0.5, 0.5]  # ties go to 0.5


# (lr, epochs, head, micro-F1 reached): a random 32-wide backbone's pooled features carry the
# three cues weakly, so frozen only gets to ~0.76 (tagging every row with every tag: ~0.62)
RECIPE = {"full": (1e-3, 10, "linear", 0.95), "frozen": (1e-2, 30, "mlp", 0.72)}


@pytest.mark.parametrize("strategy", ["full", "frozen"])
def test_multilabel_learns_predicts_and_reloads(strategy, tiny_bert, tags_csv, tmp_path, capsys):
    out = tmp_path / strategy
    lr, epochs, head, reached = RECIPE[strategy]
    cfg = RunConfig.from_options(model=str(tiny_bert), data=str(tags_csv), out=out,
                                 strategy=strategy, lr=lr, epochs=epochs, head=head,
                                 multi_label=True, max_length=16)
    m = train(cfg, progress=False)
    assert m["multi_label"] and m["labels"] == ["neg", "num", "pos"]
    assert m["micro_f1"] >= reached, m
    assert "confusion_matrix" not in m and len(m["thresholds"]) == 3
    saved = RunConfig.load(out / "config.json")
    assert saved.data.label_sep == "|" and saved.train.calibration == "threshold"
    fitted = json.loads((out / "calibration.json").read_text())["thresholds"]
    assert list(fitted) == m["labels"] and list(fitted.values()) == m["thresholds"]
    assert len(set(m["thresholds"])) == 1  # one shared threshold by default
    pred = pd.read_csv(out / "predictions.csv", keep_default_na=False)
    assert set(pred.columns) == {"text", "label", "predicted", "p_neg", "p_num", "p_pos"}
    right = (pred["label"] == pred["predicted"]).mean()
    assert right == pytest.approx(m["accuracy"])
    report = (out / "report.html").read_text()
    assert "exact-match accuracy" in report and "Per tag" in report

    clf = textune.load(out)
    assert clf.multi_label and list(clf.thresholds) == m["thresholds"]
    table = load_splits(saved).test
    assert clf.evaluate(table)["macro_f1"] == pytest.approx(m["macro_f1"], abs=1e-9)
    texts = ["the film was good and 7", "the plot", "awful story"]
    p = clf.predict_proba(texts)
    assert p.shape == (3, 3) and ((p >= 0) & (p <= 1)).all()
    tags = clf.predict(texts)
    assert all(isinstance(t, list) for t in tags)
    if strategy == "full":
        assert tags == [["num", "pos"], [], ["neg"]]

    inp = write_csv(tmp_path / "new.csv", [(t,) for t in texts], header=("text",))
    assert main(["predict", str(out), "--input", str(inp), "--output",
                 str(tmp_path / "p.csv"), "--quiet"]) == 0
    got = pd.read_csv(tmp_path / "p.csv", keep_default_na=False)
    assert list(got["label"]) == ["|".join(t) for t in tags]
    assert np.allclose(got[["p_neg", "p_num", "p_pos"]].to_numpy(), p, atol=1e-5)

    assert main(["eval", str(out), "--data", str(tags_csv), "--quiet"]) == 0
    assert "exact-match accuracy" in capsys.readouterr().out
    if strategy == "full":  # the server answers each text with its list of tags
        from fastapi.testclient import TestClient

        from textune.serve import create_app

        with TestClient(create_app(clf, out)) as c:
            body = c.post("/predict", json={"texts": texts}).json()
        assert body["labels"] == tags
        assert np.allclose([[r[n] for n in clf.labels] for r in body["probabilities"]], p,
                           atol=1e-5)


def test_multilabel_cli_columns_and_weights(tiny_bert, tmp_path, capsys, caplog):
    rows = tag_rows(600, seed=3)
    df = pd.DataFrame({"text": [t for t, _ in rows],
                       **{k: [int(k in y.split("|")) for _, y in rows] for k in CUES}})
    df.to_csv(tmp_path / "flags.csv", index=False)
    out = tmp_path / "run"
    caplog.set_level("INFO", logger="textune")
    assert main(["train", "--model", str(tiny_bert), "--data", str(tmp_path / "flags.csv"),
                 "--multi-label", "--label-col", "pos,neg,num", "--class-weights", "auto",
                 "--calibration", "per-tag",
                 "--lr", "1e-3", "--epochs", "10", "--out", str(out), "--quiet"]) == 0
    # each tag's positive rows weigh (rows without it) / (rows with it): ~0.55 / 0.45
    w = json.loads(caplog.text.split("positive-tag weights ")[1].splitlines()[0])
    assert len(w) == 3 and all(1.0 < x < 1.5 for x in w)
    shown = capsys.readouterr().out
    assert "exact-match accuracy" in shown and "micro-F1" in shown and " t=" in shown
    m = json.loads((out / "metrics.json").read_text())
    assert m["micro_f1"] > 0.85 and m["labels"] == ["neg", "num", "pos"]
    assert RunConfig.load(out / "config.json").data.label_sep is None
    assert textune.load(out).predict(["good 3"]) == [["num", "pos"]]


def test_multilabel_flag_errors(tiny_bert, tags_csv, tmp_path, capsys, caplog):
    base = ["train", "--model", str(tiny_bert), "--data", str(tags_csv), "--quiet"]
    assert main([*base, "--multi-label", "--calibration", "temperature",
                 "--out", str(tmp_path / "a")]) == 2
    assert "--calibration temperature is for single-label" in capsys.readouterr().err
    assert main([*base, "--calibration", "per-tag", "--out", str(tmp_path / "b")]) == 2
    assert "--calibration per-tag is for --multi-label" in capsys.readouterr().err
    assert main(["compare", "--model", str(tiny_bert), "--data", str(tags_csv), "--multi-label",
                 "--strategies", "frozen,prompt", "--out", str(tmp_path / "c"), "--quiet"]) == 2
    assert "with --multi-label compare the trained strategies" in capsys.readouterr().err
    # the same file without --multi-label trains on tag combinations, and says so
    caplog.set_level("WARNING", logger="textune")
    assert main([*base, "--epochs", "1", "--max-steps", "2",
                 "--out", str(tmp_path / "d")]) == 0
    assert "For tags, pass --multi-label" in caplog.text


def test_multilabel_decoder_head(tiny_llama, tags_csv, tmp_path):
    """A decoder (last-token pooling, pad token added) takes the same multi-label head."""
    out = tmp_path / "llama"
    m = train(RunConfig.from_options(model=str(tiny_llama), data=str(tags_csv), out=out,
                                     strategy="lora", epochs=1, multi_label=True, max_length=16,
                                     lora_r=4), progress=False)
    assert m["multi_label"] and 0 <= m["micro_f1"] <= 1 and m["n_eval"] > 0
    clf = textune.load(out)
    p = clf.predict_proba(["good film 3", "the plot"])
    assert p.shape == (2, 3) and not np.allclose(p.sum(1), 1)  # independent sigmoids
    assert all(set(t) <= {"neg", "num", "pos"} for t in clf.predict(["good film 3"]))


def test_multilabel_cross_validation_pools_each_folds_decisions(tiny_bert, tags_csv, tmp_path):
    out = tmp_path / "cv"
    assert main(["cv", "--model", str(tiny_bert), "--data", str(tags_csv), "--multi-label",
                 "--folds", "3", "--lr", "1e-3", "--epochs", "14", "--max-length", "16",
                 "--out", str(out), "--quiet"]) == 0
    pooled = pd.read_csv(out / "predictions.csv", keep_default_na=False)
    assert len(pooled) == 900 and set(pooled["fold"]) == {0, 1, 2}
    m = json.loads((out / "metrics.json").read_text())
    assert m["multi_label"] and m["n_eval"] == 900 and "thresholds" not in m
    assert m["accuracy"] == pytest.approx((pooled["label"] == pooled["predicted"]).mean())
    folds = [json.loads((out / f"fold-{k}" / "metrics.json").read_text()) for k in range(3)]
    assert m["accuracy"] == pytest.approx(sum(f["accuracy"] * f["n_eval"] for f in folds) / 900)
    assert m["micro_f1"] >= 0.9, m
    assert "exact-match accuracy" in (out / "cv.md").read_text()
    # label issues work on tag sets too: each listed row is the data's row, with its tags
    issues = pd.read_csv(out / "label_issues.csv", keep_default_na=False)
    data = pd.read_csv(tags_csv, keep_default_na=False)
    assert {"row", "fold", "label", "suggested", "p_label"} <= set(issues.columns)
    assert (data.loc[issues["row"], "text"].to_numpy() == issues["text"].to_numpy()).all()
    assert len(issues) < 0.1 * len(data)  # (clean toy tags: few, if any, contradicted)
