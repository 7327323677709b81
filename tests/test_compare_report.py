"""compare, report, export, class weights on tiny models."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import textune
from textune.cli import main

from .conftest import toy_rows, write_csv


def test_compare_writes_table_json_chart_and_survives_a_failure(tiny_bert, toy_csv, tmp_path,
                                                               capsys):
    out = tmp_path / "cmp"
    # LoRA aimed at a module the model lacks fails; the others must still be reported
    code = main(["compare", "--model", str(tiny_bert), "--data", str(toy_csv), "--strategies",
                 "frozen,lora,full", "--lora-targets", "no_such_module", "--epochs", "1",
                 "--out", str(out), "--quiet"])
    assert code == 0
    md = (out / "compare.md").read_text()
    for s in ("frozen", "lora", "full"):
        assert f"| {s} |" in md
    rows = json.loads((out / "compare.json").read_text())["rows"]
    assert [r["status"] for r in rows][::2] == ["ok", "ok"]
    assert rows[1]["status"].startswith("failed: --lora-targets") and "| failed:" in md
    assert (out / "compare.png").stat().st_size > 5000
    assert (out / "frozen" / "metrics.json").exists() and (out / "full" / "report.html").exists()
    # paired differences on the same test rows: one run is the best, the other is against it
    ok = [rows[0], rows[2]]
    assert sorted(isinstance(r["accuracy_vs_best"], str) for r in ok) == [False, True]
    other = next(r for r in ok if r["accuracy_vs_best"] != "best")
    best = next(r for r in ok if r["accuracy_vs_best"] == "best")
    d = other["accuracy_vs_best"]
    assert np.isclose(d["difference"], other["accuracy"] - best["accuracy"], atol=1e-4)
    assert d["ci95"][0] <= d["difference"] <= d["ci95"][1] <= 1e-9
    assert "accuracy_vs_best" not in rows[1] and "| best |" in md and " pts [" in md


def test_each_run_gets_todays_environment_and_folder(tiny_bert, toy_csv, tmp_path, monkeypatch):
    """Runs fork from a fork server that lives as long as this process (across tests): each
    must see the environment and working folder of the moment it starts, not the server's."""
    from textune.config import DataArgs, ModelArgs, RunConfig, StrategyArgs, TrainArgs
    from textune.multirun import train_in_subprocess

    def cfg(out):  # (a relative --data: read from the working folder)
        return RunConfig(DataArgs("toy.csv", max_length=16), ModelArgs(str(tiny_bert)),
                         StrategyArgs("frozen"), TrainArgs(epochs=1, seed=0), str(out))

    monkeypatch.chdir(toy_csv.parent)
    assert train_in_subprocess(cfg(tmp_path / "a"), False)[0] == "ok"  # (the server runs now)
    home = tmp_path / "another-home"
    monkeypatch.setenv("TEXTUNE_HOME", str(home))
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "toy.csv").write_text(toy_csv.read_text())
    monkeypatch.chdir(other)
    status, m = train_in_subprocess(cfg(tmp_path / "b"), False)
    assert status == "ok" and m["features_from_cache"] == 0
    assert list((home / "features").iterdir())  # its features went to today's TEXTUNE_HOME


def test_compare_from_python_returns_the_table(tiny_bert, toy_csv, tmp_path):
    import importlib
    import pkgutil

    import pandas as pd

    import textune

    # a submodule, once imported, is bound on the package: none may share an API function's name
    for m in pkgutil.walk_packages(textune.__path__, "textune."):
        if not m.name.endswith(".__main__"):
            importlib.import_module(m.name)
    assert all(callable(getattr(textune, n)) for n in textune.__all__ if n != "__version__")
    table = textune.compare(pd.read_csv(toy_csv), tmp_path / "c", model=str(tiny_bert),
                            strategies="frozen,full", epochs=1, max_length=16, progress=False)
    assert list(table.index) == ["frozen", "full"] and (table["status"] == "ok").all()
    doc = json.loads((tmp_path / "c" / "compare.json").read_text())
    assert table.loc["full", "accuracy"] == doc["rows"][1]["accuracy"]
    assert (tmp_path / "c" / "full" / "metrics.json").exists()


def test_cv_and_curve_from_python(tiny_bert, tmp_path):
    """textune.cv / textune.curve: a DataFrame in, what the commands write out, and the results
    as Python objects that agree with those files."""
    df = pd.DataFrame(toy_rows(300), columns=["text", "label"])
    opts = dict(model=str(tiny_bert), lr=1e-3, epochs=3, max_length=16, progress=False)
    res = textune.cv(df, tmp_path / "cv", folds=3, **opts)
    s = json.loads((tmp_path / "cv" / "cv.json").read_text())
    assert list(res.folds.index) == [0, 1, 2] and (res.folds["status"] == "ok").all()
    assert res.accuracy == s["pooled"]["accuracy"] and res.accuracy_ci95[0] < res.accuracy
    assert sorted(res.predictions["row"]) == list(range(300))  # every row once, out of fold
    assert (res.predictions["text"].to_numpy() == df.loc[res.predictions["row"], "text"]).all()
    assert np.isclose(res.accuracy, (res.predictions["label"] == res.predictions["predicted"])
                      .mean())
    assert len(res.label_issues) == s["label_issues"]
    assert repr(res).startswith(f"CrossValidation(full {tiny_bert}, 3 folds: accuracy "
                                f"{res.accuracy:.4f}")
    with pytest.raises(textune.errors.UserError, match="--folds 1"):
        textune.cv(df, tmp_path / "cv1", folds=1, **opts)
    assert not (tmp_path / "cv1").exists()

    table = textune.curve(df, tmp_path / "curve", sizes=[24, 60, "all"], **opts)
    doc = json.loads((tmp_path / "curve" / "curve.json").read_text())
    n = doc["training_rows_available"]
    assert list(table.index) == [24, 60, n] and (table["status"] == "ok").all()
    assert table["accuracy"].tolist() == [r["accuracy"] for r in doc["rows"]]
    assert np.isnan(table.loc[24, "gain"]) and table.loc[60, "gain"] == \
        doc["rows"][1]["gain"]["difference"]
    assert table.attrs["verdict"].startswith(f"From 60 to {n} training rows")
    assert (tmp_path / "curve" / "rows-60" / "metrics.json").exists()


def test_compare_over_seeds_shares_the_splits(tiny_bert, toy_csv, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", "--model", str(tiny_bert), "--data", str(toy_csv), "--strategies",
                 "frozen,full", "--seeds", "3,4", "--epochs", "1", "--out", str(out),
                 "--quiet"]) == 0
    doc = json.loads((out / "compare.json").read_text())
    assert doc["seeds"] == [3, 4] and doc["split_seed"] == 3
    preds = {}
    for r in doc["rows"]:
        assert r["status"] == "ok" and [x["seed"] for x in r["runs"]] == [3, 4]
        assert np.isclose(r["accuracy"], np.mean([x["accuracy"] for x in r["runs"]]))
        assert r["accuracy_ci95"][0] <= r["accuracy"] <= r["accuracy_ci95"][1]
        for x in r["runs"]:
            cfg = json.loads((Path(x["run"]) / "config.json").read_text())
            assert cfg["train"]["seed"] == x["seed"] and cfg["data"]["split_seed"] == 3
            preds[r["strategy"], x["seed"]] = pd.read_csv(Path(x["run"]) / "predictions.csv")
    texts = [p["text"].tolist() for p in preds.values()]
    assert all(t == texts[0] for t in texts)  # one test split for every strategy and seed
    # the seeds differ in training: the full fine-tuning runs differ somewhere
    assert not preds["full", 3][["p_neg"]].equals(preds["full", 4][["p_neg"]])
    assert sorted(str(r["accuracy_vs_best"]) == "best" for r in doc["rows"]) == [False, True]
    md = (out / "compare.md").read_text()
    assert "sd over seeds" in md and "| full | 4 |" in md and "full/seed-4" in md
    # the second frozen seed read every row's features from the first one's
    frozen = next(r for r in doc["rows"] if r["strategy"] == "frozen")
    assert [x["features_from_cache"] for x in frozen["runs"]][0] == 0
    assert frozen["runs"][1]["features_from_cache"] == len(preds["frozen", 4]) + sum(
        json.loads((Path(frozen["runs"][1]["run"]) / "metrics.json").read_text())["splits"][k]
        for k in ("train", "val"))
    assert "frozen: backbone features of some rows were read from the cache" in md


def test_every_run_has_a_report_with_embedded_plots(tiny_bert, toy_csv, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--model", str(tiny_bert), "--data", str(toy_csv), "--epochs", "2",
                 "--out", str(out), "--quiet"]) == 0
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 4  # loss/lr, validation, confusion, F1
    for png in ("loss_lr.png", "validation.png", "confusion_matrix.png", "per_class_f1.png"):
        assert (out / png).stat().st_size > 3000
    assert "http" not in html.replace("http-equiv", "")  # self-contained
    # the one caveat of this run: 100 test rows pin accuracy down to about ±10 points
    assert html.count("<li>") == 1 and "only 100 rows were evaluated" in html
    # every test row's prediction, matching the metrics; intervals around the scores
    m = json.loads((out / "metrics.json").read_text())
    pred = pd.read_csv(out / "predictions.csv", keep_default_na=False)
    assert len(pred) == m["n_eval"] and list(pred.columns[:3]) == ["text", "label", "predicted"]
    assert np.isclose((pred["label"] == pred["predicted"]).mean(), m["accuracy"])
    probs = pred[["p_neg", "p_pos"]].to_numpy()
    assert np.allclose(probs.sum(1), 1, atol=2e-4)
    assert (pred["predicted"] == np.array(["neg", "pos"])[probs.argmax(1)]).all()
    assert m["accuracy_ci95"][0] <= m["accuracy"] <= m["accuracy_ci95"][1]
    assert 0 <= m["ece"] <= 1 and "(95% CI " in html
    # what it ran on: the versions and the device, in metrics.json and the report
    import torch
    import transformers

    env = m["environment"]
    assert env["torch"] == torch.__version__.split("+")[0] or env["torch"] == torch.__version__
    assert env["transformers"] == transformers.__version__ and env["device_name"]
    assert env["threads"] == torch.get_num_threads() and isinstance(env["native_bf16"], bool)
    assert f"ran on</td><td>{env['device_name']}" in html.replace("<td >", "<td>")
    wrong = int((pred["label"] != pred["predicted"]).sum())
    assert f"Mistakes ({wrong} of {len(pred)} rows)" in html
    (out / "report.html").unlink()
    assert main(["report", str(out)]) == 0 and (out / "report.html").exists()
    assert main(["eval", str(out), "--data", str(toy_csv), "--out", str(tmp_path / "ev"),
                 "--quiet"]) == 0
    assert "data:image/png" in (tmp_path / "ev" / "report.html").read_text()
    assert len(pd.read_csv(tmp_path / "ev" / "predictions.csv")) == json.loads(
        (tmp_path / "ev" / "metrics.json").read_text())["n_eval"]


def test_export_merges_lora_and_reloads_identically(tiny_bert, toy_csv, tmp_path, capsys):
    run, exp = tmp_path / "lora", tmp_path / "exp"
    assert main(["train", "--model", str(tiny_bert), "--data", str(toy_csv), "--strategy", "lora",
                 "--epochs", "2", "--lr", "5e-3", "--precision", "fp32", "--out", str(run),
                 "--quiet"]) == 0
    assert main(["export", str(run), "--merge", "--out", str(exp)]) == 0
    texts = ["good film", "awful dull plot", "the story"]
    a = textune.load(run).predict_proba(texts)
    b = textune.load(exp).predict_proba(texts)
    assert np.allclose(a, b, atol=1e-5)
    from transformers import AutoModel

    plain = AutoModel.from_pretrained(exp / "backbone")  # a plain HF folder, no PEFT
    assert not any("lora" in n for n, _ in plain.named_parameters())


def test_class_weights_auto_helps_minority_class(tiny_bert, tmp_path, capsys, caplog):
    """On a 9:1 imbalanced set, inverse-frequency weights raise minority recall (macro-F1)."""
    caplog.set_level("INFO", logger="textune")
    rows = toy_rows(2000, seed=3)
    pos = [r for r in rows if r[1] == "pos"][:900]
    neg = [r for r in rows if r[1] == "neg"][:100]
    data = write_csv(tmp_path / "imb.csv", pos + neg)
    res = {}
    for cw in ("none", "auto"):
        out = tmp_path / cw
        assert main(["train", "--model", str(tiny_bert), "--data", str(data), "--strategy",
                     "frozen", "--epochs", "6", "--lr", "5e-2", "--class-weights", cw, "--out",
                     str(out), "--quiet"]) == 0
        res[cw] = json.loads((out / "metrics.json").read_text())
        hinted = "--class-weights auto also weighs" in caplog.text
        assert hinted == (cw == "none"), cw  # the hint where the flag would help
        caplog.clear()
    assert res["auto"]["per_class"]["neg"]["recall"] > res["none"]["per_class"]["neg"]["recall"]
    assert res["auto"]["macro_f1"] > res["none"]["macro_f1"]


@pytest.mark.parametrize("where,expect", [("both", 4), ("ffn", 2)])
def test_adapter_where(tiny_bert, where, expect):
    from textune.modeling import TextClassifier, load_backbone
    from textune.strategies import get_strategy

    m = get_strategy("adapter", reduction=4, where=where).setup(
        TextClassifier(load_backbone(str(tiny_bert)), 2))
    assert sum(1 for n, _ in m.named_modules() if n.endswith(".adapter")) == expect


def test_paired_differences_flag_what_the_seeds_cannot_tell(tmp_path):
    from textune.multirun import paired_differences

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400).astype(str)

    def run(name, right_share, sd):
        folder = tmp_path / name
        folder.mkdir()
        pred = np.where(rng.random(400) < right_share, y, np.where(y == "1", "0", "1"))
        pd.DataFrame({"text": [f"t{i}" for i in range(400)], "label": y,
                      "predicted": pred}).to_csv(folder / "predictions.csv", index=False)
        return {"strategy": name, "status": "ok", "run": str(folder),
                "accuracy": float((pred == y).mean()), "accuracy_sd": sd}

    rows = [run("a", 0.9, 0.005), run("b", 0.86, 0.05), run("c", 0.6, 0.005)]
    paired_differences(rows)
    a, b, c = (r["accuracy_vs_best"] for r in rows)
    assert a == "best"
    assert b["within_seed_spread"] and "within_seed_spread" not in c  # 4 pts < sd 5 pts
    assert c["ci95"][1] < 0 and c["difference"] < b["difference"]


def test_temperature_fitted_on_validation_and_used_everywhere(tiny_bert, toy_csv, tmp_path,
                                                                capsys, caplog):
    run = tmp_path / "run"
    assert main(["train", "--model", str(tiny_bert), "--data", str(toy_csv), "--epochs", "1",
                 "--lr", "3e-4", "--out", str(run), "--quiet"]) == 0
    t = json.loads((run / "calibration.json").read_text())["temperature"]
    m = json.loads((run / "metrics.json").read_text())
    assert m["temperature"] == round(t, 4) and t != 1.0 and "ece_before_temperature" in m
    clf = textune.load(run)
    texts = ["good film", "awful dull plot", "the story"]
    from textune.metrics import softmax

    assert clf.temperature == t
    assert np.allclose(clf.predict_proba(texts), softmax(clf.logits(texts) / t), atol=1e-6)
    # the test rows' probabilities in predictions.csv are the calibrated ones
    pred = pd.read_csv(run / "predictions.csv", keep_default_na=False)
    got = clf.predict_proba(pred["text"].tolist()[:5])
    assert np.allclose(got, pred[["p_neg", "p_pos"]].to_numpy()[:5], atol=2e-3)
    plain = tmp_path / "plain"
    assert main(["train", "--model", str(tiny_bert), "--data", str(toy_csv), "--epochs", "1",
                 "--lr", "3e-4", "--calibration", "none", "--out", str(plain), "--quiet"]) == 0
    assert not (plain / "calibration.json").exists() and textune.load(plain).temperature == 1.0
    assert "temperature" not in json.loads((plain / "metrics.json").read_text())
    # 20 validation rows are too few to fit it on: left at 1, and said so
    small, data = tmp_path / "small", write_csv(tmp_path / "small.csv", toy_rows(200))
    caplog.set_level("INFO", logger="textune")
    assert main(["train", "--model", str(tiny_bert), "--data", str(data), "--epochs", "1",
                 "--out", str(small)]) == 0
    assert not (small / "calibration.json").exists()
    assert "probabilities not calibrated: the validation split has 20 rows" in caplog.text


def test_learning_curve_shares_test_rows_and_pairs_the_steps(tiny_bert, toy_csv, tmp_path,
                                                             capsys):
    out = tmp_path / "curve"
    code = main(["curve", "--model", str(tiny_bert), "--data", str(toy_csv), "--strategy",
                 "full", "--lr", "1e-3", "--epochs", "2", "--sizes", "24,96,all",
                 "--out", str(out), "--quiet"])
    assert code == 0
    shown = capsys.readouterr().out
    doc = json.loads((out / "curve.json").read_text())
    rows = doc["rows"]
    assert [r["rows"] for r in rows] == [24, 96, doc["training_rows_available"]] == \
        [json.loads((Path(r["run"]) / "metrics.json").read_text())["splits"]["train"]
         for r in rows]
    tests = [pd.read_csv(Path(r["run"]) / "predictions.csv")["text"] for r in rows]
    assert all(t.equals(tests[0]) for t in tests)  # every size scored on the same rows
    # 24 rows, 2 epochs barely move a random backbone; 800 learn the toy task
    assert rows[-1]["accuracy"] >= 0.9 > rows[0]["accuracy"]
    assert "gain" not in rows[0]
    for prev, r in zip(rows, rows[1:]):
        g = r["gain"]
        assert g["from_rows"] == prev["rows"]
        assert np.isclose(g["difference"], r["accuracy"] - prev["accuracy"], atol=1e-4)
        assert g["ci95"][0] <= g["difference"] <= g["ci95"][1]
    md = (out / "curve.md").read_text()
    assert "| 24 |" in md and " pts [" in md and "From 96 to" in md and md in shown + "\n"
    assert (out / "curve.png").stat().st_size > 5000
    assert main(["curve", "--model", str(tiny_bert), "--data", str(toy_csv), "--limit", "50",
                 "--out", str(tmp_path / "bad"), "--quiet"]) == 2
    assert "give them with --sizes" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()  # (refused before a folder was made)


def test_curve_sizes():
    from textune.errors import UserError
    from textune.learncurve import parse_sizes

    assert parse_sizes(None, 1000) == [125, 250, 500, 1000]
    assert parse_sizes(None, 100) == [32, 50, 100]
    assert parse_sizes("all, 200,50,200", 1000) == [50, 200, 1000]
    assert parse_sizes("5000", 1000) == [1000]
    for bad in ("1", "ten", ","):
        with pytest.raises(UserError, match="--sizes"):
            parse_sizes(bad, 1000)


def test_cross_validation_scores_every_row_once(tiny_bert, toy_csv, tmp_path, capsys):
    out = tmp_path / "cv"
    code = main(["cv", "--model", str(tiny_bert), "--data", str(toy_csv), "--folds", "3",
                 "--lr", "1e-3", "--epochs", "4", "--out", str(out), "--quiet"])
    assert code == 0
    assert "out of fold" in capsys.readouterr().out
    s = json.loads((out / "cv.json").read_text())
    assert [r["status"] for r in s["runs"]] == ["ok"] * 3
    pooled = pd.read_csv(out / "predictions.csv", keep_default_na=False)
    data = pd.read_csv(toy_csv, keep_default_na=False)
    # each row in exactly one fold's test split: the pooled texts are the data's texts
    assert sorted(pooled["text"]) == sorted(data["text"]) and set(pooled["fold"]) == {0, 1, 2}
    for k in range(3):
        run = json.loads((out / f"fold-{k}" / "metrics.json").read_text())
        assert run["n_eval"] == (pooled["fold"] == k).sum()
        assert run["splits"]["train"] + run["splits"]["val"] + run["n_eval"] == len(data)
    m = json.loads((out / "metrics.json").read_text())
    right = (pooled["label"] == pooled["predicted"]).mean()
    assert m["n_eval"] == len(data) and np.isclose(m["accuracy"], right)
    assert np.isclose(m["accuracy"], sum(r["accuracy"] * r["n_eval"] for r in s["runs"])
                      / len(data))
    assert m["accuracy"] >= 0.9 and m["accuracy_ci95"][0] < m["accuracy"] < m["accuracy_ci95"][1]
    assert s["pooled"]["accuracy"] == m["accuracy"] and s["accuracy_sd"] is not None
    assert "Mistakes (" in (out / "report.html").read_text()
    # a fold's run reloads and is evaluated on its own fold again
    assert main(["eval", str(out / "fold-1"), "--data", str(toy_csv), "--quiet"]) == 0
    assert f"n={(pooled['fold'] == 1).sum()}, test" in capsys.readouterr().out
    for extra, msg in ((["--test", str(toy_csv)], "cross-validation makes its test splits"),
                       (["--folds", "1"], "--folds 1: give 2 or more")):
        assert main(["cv", "--model", str(tiny_bert), "--data", str(toy_csv), *extra,
                     "--out", str(tmp_path / "bad"), "--overwrite", "--quiet"]) == 2
        assert msg in capsys.readouterr().err
        assert not (tmp_path / "bad").exists()
