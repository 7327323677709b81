"""The contrastive strategy (SetFit's recipe): pairs, the pair phase on the shared loop, the
tuned backbone saved and reloaded."""

import json

import numpy as np
import pandas as pd
import pytest

import textune
from textune.api import train
from textune.cli import main
from textune.config import DataArgs, ModelArgs, RunConfig, StrategyArgs, TrainArgs
from textune.strategies.contrastive import make_pairs

from .conftest import toy_rows, write_csv


def test_pairs_match_a_text_with_its_class_and_with_another():
    labels = np.array([0, 0, 0, 1, 1, 2])
    a, b, target = make_pairs(labels, iterations=3, seed=0)
    # each round: a same-class partner for the 5 rows whose class has another row, a partner of
    # another class for all 6
    assert len(a) == 3 * (5 + 6) and target.sum() == 15
    same = labels[a] == labels[b]
    assert (same == (target == 1)).all() and (a != b).all()
    assert set(a[target == 1]) == {0, 1, 2, 3, 4}  # row 5 is alone in its class
    assert len(make_pairs(labels, iterations=3, seed=0, max_pairs=7)[0]) == 7


def test_tag_pairs_pull_rows_together_by_their_shared_tags():
    # rows: {x}, {x}, {x, y}, {y}, {z} (alone), {}, {}
    Y = np.array([[1, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 0, 1], [0, 0, 0], [0, 0, 0]])
    a, b, target = make_pairs(Y.astype(np.float32), iterations=4, seed=0)
    sets = [set(np.flatnonzero(r)) for r in Y]
    jaccard = [len(sets[i] & sets[j]) / len(sets[i] | sets[j]) if sets[i] | sets[j] else 1.0
               for i, j in zip(a, b)]
    assert np.allclose(target, jaccard) and (a != b).all()
    near = target > 0
    # every row with a partner sharing a tag (row 4's tag z is its own) or its emptiness gets
    # one each round; and every row one partner sharing none of its tags
    assert sorted(np.bincount(a[near], minlength=7)) == [0, *[4] * 6]
    assert (np.bincount(a[~near], minlength=7) == 4).all()
    assert {(i, j) for i, j in zip(a[~near], b[~near])}.isdisjoint({(0, 2), (2, 3), (5, 6)})
    assert set(np.round(target, 3)) == {0.0, 0.5, 1.0}
    # one label a row as a one-hot matrix: SetFit's 1 (same class) and 0 pairs
    labels = np.array([0, 0, 1, 1, 2])
    a, b, target = make_pairs(np.eye(3, dtype=np.float32)[labels], iterations=2, seed=0)
    assert ((labels[a] == labels[b]) == (target == 1)).all()


@pytest.fixture
def few_csv(tmp_path):
    """20 labelled toy rows a class for training; the test file is 400 more."""
    rows = toy_rows(440, seed=7)
    write_csv(tmp_path / "test.csv", rows[40:])
    return write_csv(tmp_path / "few.csv", rows[:40]), tmp_path / "test.csv"


def test_contrastive_beats_a_frozen_head_on_few_rows_and_reloads(tiny_bert, few_csv, tmp_path):
    few, test = few_csv

    def run(strategy, out):
        cfg = RunConfig(DataArgs(str(few), test=str(test), val_fraction=0.2, max_length=16),
                        ModelArgs(str(tiny_bert)), StrategyArgs(strategy, pair_iterations=20,
                                                                body_lr=1e-2),
                        TrainArgs(epochs=30, lr=1e-1, seed=0), str(tmp_path / out))
        return train(cfg, progress=False)

    frozen, con = run("frozen", "frozen"), run("contrastive", "con")
    assert con["contrastive_phase"]["pairs"] == 20 * (32 + 32)  # (32 training rows, 2 classes)
    assert con["features_from_cache"] == 0  # its backbone is its own: nothing stored fits it
    # a random 32-wide backbone: its features barely tell the cue words apart until the pairs
    # have pulled each class together (measured: frozen 0.59, contrastive 0.86)
    assert con["accuracy"] >= frozen["accuracy"] + 0.15, (frozen["accuracy"], con["accuracy"])
    assert con["accuracy"] >= 0.8
    hist = (tmp_path / "con" / "contrastive" / "history.jsonl").read_text().splitlines()
    losses = [json.loads(r)["loss"] for r in hist if "loss" in r]
    assert losses[-1] < losses[0]
    # reload: the saved backbone and head give the run's test predictions again
    clf = textune.load(tmp_path / "con")
    df = pd.read_csv(test, keep_default_na=False)
    pred = pd.read_csv(tmp_path / "con" / "predictions.csv", keep_default_na=False)
    assert clf.predict(df["text"].tolist()) == pred["predicted"].tolist()


def test_contrastive_refuses_text_pairs(tiny_bert, tmp_path, capsys):
    data = write_csv(tmp_path / "t.csv", [("a b", "x|y"), ("c d", "x")] * 20)
    assert main(["train", "--model", str(tiny_bert), "--data", str(data), "--strategy",
                 "contrastive", "--text-pair-col", "label", "--out", str(tmp_path / "r"),
                 "--quiet"]) == 2
    assert "pairs single texts" in capsys.readouterr().err


def test_contrastive_with_tags_beats_a_frozen_head_on_few_rows(tiny_bert, tmp_path):
    """--multi-label: pairs by shared tags, then the frozen head's per-tag loss and threshold."""
    from .test_multilabel import tag_rows

    rows = tag_rows(460, seed=3)
    few = write_csv(tmp_path / "few.csv", rows[:60])
    test = write_csv(tmp_path / "test.csv", rows[60:])

    def run(strategy):
        cfg = RunConfig(DataArgs(str(few), test=str(test), val_fraction=0.2, max_length=16,
                                 multi_label=True),
                        ModelArgs(str(tiny_bert)), StrategyArgs(strategy, pair_iterations=20,
                                                                body_lr=1e-2),
                        TrainArgs(epochs=30, lr=1e-1, seed=0), str(tmp_path / strategy))
        return train(cfg, progress=False)

    frozen, con = run("frozen"), run("contrastive")
    assert con["contrastive_phase"]["pairs"] > 20 * 48
    # a random 32-wide backbone (measured on three draws of rows: macro-F1 0.63 -> 0.72,
    # 0.63 -> 0.68, 0.62 -> 0.66; exact match 0.14 -> 0.39 and 0.08 -> 0.21 on the last two)
    assert con["macro_f1"] >= frozen["macro_f1"] + 0.05, (frozen["macro_f1"], con["macro_f1"])
    assert con["accuracy"] >= frozen["accuracy"] + 0.1, (frozen["accuracy"], con["accuracy"])
    clf = textune.load(tmp_path / "contrastive")
    pred = pd.read_csv(tmp_path / "contrastive" / "predictions.csv", keep_default_na=False)
    assert clf.multi_label and len(clf.predict(pred["text"].tolist()[:5])) == 5


def test_a_head_on_cached_features_gets_enough_steps_by_default():
    from textune.api import default_epochs
    from textune.strategies import get_strategy

    frozen, full = get_strategy("frozen"), get_strategy("full")
    t = TrainArgs()  # batch 32
    assert default_epochs(frozen, 32, t) == 100  # one step an epoch: 100 epochs
    assert default_epochs(frozen, 320, t) == 20  # 10 steps an epoch: the default's 200 steps
    assert default_epochs(get_strategy("contrastive"), 64, t) == 50
    assert default_epochs(full, 32, t) == 3  # (the backbone trains: no such floor)
    assert default_epochs(frozen, 32, TrainArgs(max_steps=7)) == 20
