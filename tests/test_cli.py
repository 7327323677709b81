"""The command line: bad input gives one line and exit code 2; nothing is overwritten."""

import json
import subprocess
import sys

import pytest

from textune.cli import main

from .conftest import write_csv


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("textune: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def test_missing_file(capsys, tmp_path):
    code, _, err = run_cli(capsys, "train", "--data", str(tmp_path / "nope.csv"), "--out",
                           str(tmp_path / "o"))
    assert code == 2 and "nope.csv" in one_line_error(err)


def test_missing_columns_are_listed(capsys, tmp_path, tiny_bert):
    p = write_csv(tmp_path / "a.csv", [("x", "y")] * 4, header=("foo", "bar"))
    code, _, err = run_cli(capsys, "train", "--model", str(tiny_bert), "--data", str(p),
                           "--out", str(tmp_path / "o"))
    line = one_line_error(err)
    assert code == 2 and "foo, bar" in line and "--text-col" in line


def test_unseen_label_in_test_file(capsys, tmp_path, tiny_bert, toy_csv):
    bad = write_csv(tmp_path / "t.csv", [("good film", "pos"), ("bad", "meh")])
    code, _, err = run_cli(capsys, "train", "--model", str(tiny_bert), "--data", str(toy_csv),
                           "--test", str(bad), "--out", str(tmp_path / "o"), "--epochs", "1")
    line = one_line_error(err)
    assert code == 2 and "meh" in line and "t.csv" in line


def test_too_small_class(capsys, tmp_path, tiny_bert):
    p = write_csv(tmp_path / "a.csv", [(f"good {i}", "pos") for i in range(10)] + [("x", "rare")])
    code, _, err = run_cli(capsys, "train", "--model", str(tiny_bert), "--data", str(p),
                           "--out", str(tmp_path / "o"))
    assert code == 2 and "'rare'" in one_line_error(err)


def test_unknown_model_lists_catalog(capsys, tmp_path, toy_csv):
    code, _, err = run_cli(capsys, "train", "--model", "./no/such/model", "--data", str(toy_csv),
                           "--out", str(tmp_path / "o"))
    assert code == 2 and "no/such/model" in one_line_error(err)
    code, _, err = run_cli(capsys, "train", "--model", "bad/hub/id/x", "--data", str(toy_csv),
                           "--out", str(tmp_path / "o"))
    assert code == 2 and "minilm-l6" in one_line_error(err)
    code, _, err = run_cli(capsys, "plan", "--model", "bad/hub/id/x")
    assert code == 2 and "minilm-l6" in one_line_error(err)


def test_hub_id_without_network_uses_the_cache_or_says_so(capsys, tmp_path, tiny_bert, toy_csv,
                                                         monkeypatch):
    import shutil
    import time

    from huggingface_hub import constants

    from textune import modeling

    monkeypatch.setattr(modeling, "hub_reachable", lambda timeout=5.0: False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    t = time.perf_counter()
    code, _, err = run_cli(capsys, "train", "--model", "someorg/tiny", "--data", str(toy_csv),
                           "--out", str(tmp_path / "o"))
    line = one_line_error(err)
    assert code == 2 and "cannot be reached" in line and "minilm-l6" in line
    assert time.perf_counter() - t < 10  # (no minute of retries)
    # the same id, cached the way huggingface_hub lays it out: trains from the cached copy
    repo = tmp_path / "hf" / "models--someorg--tiny"
    shutil.copytree(tiny_bert, repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    code, _, err = run_cli(capsys, "train", "--model", "someorg/tiny", "--data", str(toy_csv),
                           "--epochs", "1", "--out", str(tmp_path / "o"))
    assert code == 0, err
    assert json.loads((tmp_path / "o" / "config.json").read_text())["model"]["model"] == \
        "someorg/tiny"  # (the id, not this machine's cache path)
    monkeypatch.setattr(modeling, "hub_reachable", lambda timeout=5.0: True)
    assert modeling.resolve_model("someorg/tiny") == "someorg/tiny"  # online: the hub decides


def test_hub_offline_mode_is_not_reachable(monkeypatch):
    from huggingface_hub import constants

    from textune.modeling import hub_reachable

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert hub_reachable() is False


def test_unknown_strategy(capsys, tmp_path, tiny_bert, toy_csv):
    code, _, err = run_cli(capsys, "train", "--model", str(tiny_bert), "--data", str(toy_csv),
                           "--strategy", "magic", "--out", str(tmp_path / "o"))
    assert code == 2 and "full" in one_line_error(err)


def test_existing_output_is_never_overwritten(capsys, tmp_path, tiny_bert, toy_csv):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    code, _, err = run_cli(capsys, "train", "--model", str(tiny_bert), "--data", str(toy_csv),
                           "--out", str(out))
    assert code == 2 and "not empty" in one_line_error(err)
    code, _, err = run_cli(capsys, "train", "--model", str(tiny_bert), "--data", str(toy_csv),
                           "--out", str(out), "--overwrite")
    assert code == 2 and "not a textune run" in one_line_error(err)
    assert (out / "precious.txt").read_text() == "keep me"


def test_overwrite_spares_model_folders_and_clears_interrupted_runs(capsys, tmp_path,
                                                                     tiny_bert, toy_csv):
    import shutil

    from textune.api import MARKER, prepare_out_dir

    # a Hugging Face model folder (config.json, weights) is not a run: --overwrite refuses
    model_copy = tmp_path / "my-model"
    shutil.copytree(tiny_bert, model_copy)
    before = sorted(p.name for p in model_copy.iterdir())
    code, _, err = run_cli(capsys, "train", "--model", str(tiny_bert), "--data", str(toy_csv),
                           "--out", str(model_copy), "--overwrite")
    assert code == 2 and "not a textune run" in one_line_error(err)
    assert sorted(p.name for p in model_copy.iterdir()) == before
    # a run killed before it wrote anything but its marker and a log can be replaced
    run = prepare_out_dir(tmp_path / "killed", False)
    assert (run / MARKER).exists()
    (run / "history.jsonl").write_text("{}\n")
    assert prepare_out_dir(run, True) == run and not (run / "history.jsonl").exists()
    # a folder holding only the marker counts as empty
    assert prepare_out_dir(run, False) == run


def test_train_eval_predict_roundtrip(capsys, tmp_path, tiny_bert, toy_csv):
    out = tmp_path / "run"
    code, stdout, _ = run_cli(capsys, "train", "--model", str(tiny_bert), "--data", str(toy_csv),
                              "--out", str(out), "--epochs", "3", "--lr", "1e-3",
                              "--batch-size", "16", "--quiet")
    assert code == 0 and "accuracy" in stdout
    m = json.loads((out / "metrics.json").read_text())
    for k in ("accuracy", "macro_f1", "per_class", "confusion_matrix", "split", "n_eval",
              "train_seconds", "train_samples_per_second", "trainable_params", "total_params"):
        assert k in m, k
    code, stdout, _ = run_cli(capsys, "eval", str(out), "--data", str(toy_csv), "--out",
                              str(tmp_path / "ev"), "--quiet")
    assert code == 0 and (tmp_path / "ev" / "metrics.json").exists()
    inp = write_csv(tmp_path / "new.csv", [("good film",), ("awful plot",)], header=("text",))
    code, _, _ = run_cli(capsys, "predict", str(out), "--input", str(inp), "--output",
                         str(tmp_path / "p.jsonl"), "--quiet")
    rows = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert code == 0 and [r["label"] for r in rows] == ["pos", "neg"]
    assert abs(rows[0]["p_pos"] + rows[0]["p_neg"] - 1) < 1e-4
    # the same output file again: refused, kept
    code, _, err = run_cli(capsys, "predict", str(out), "--input", str(inp), "--output",
                           str(tmp_path / "p.jsonl"))
    assert code == 2 and "exists" in one_line_error(err)


def test_predict_keeps_every_row_and_column(capsys, tmp_path, tiny_bert, monkeypatch):
    import io

    pd = pytest.importorskip("pandas")
    rows = [(f"good film {i}", f"more {i}", "pos") for i in range(30)] + \
        [(f"bad cast {i}", f"less {i}", "neg") for i in range(30)]
    data = write_csv(tmp_path / "pairs.csv", rows, header=("body", "context", "y"))
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--model", str(tiny_bert), "--data", str(data),
                           "--text-col", "body", "--text-pair-col", "context", "--label-col", "y",
                           "--epochs", "1", "--out", str(out), "--quiet")
    assert code == 0, err
    # the run's own column names are found again; other columns and empty rows are kept
    inp = write_csv(tmp_path / "new.csv", [("7", "good film", "more film", "pos"),
                                           ("8", "", "", "neg"),
                                           ("9", "bad cast", "less cast", "neg")],
                    header=("id", "body", "context", "label"))
    for suffix in (".csv", ".jsonl", ".xlsx"):
        if suffix == ".xlsx":
            pytest.importorskip("openpyxl")
        dest = tmp_path / f"p{suffix}"
        code, _, err = run_cli(capsys, "predict", str(out), "--input", str(inp), "--output",
                               str(dest), "--quiet")
        assert code == 0, err
        got = {".csv": lambda p: pd.read_csv(p, dtype={"id": str}),
               ".jsonl": lambda p: pd.read_json(p, lines=True, dtype={"id": str}),
               ".xlsx": lambda p: pd.read_excel(p, dtype={"id": str})}[suffix](dest)
        assert list(got.columns) == ["id", "body", "context", "label", "predicted_label",
                                     "p_neg", "p_pos"]
        assert list(got["id"]) == ["7", "8", "9"] and list(got["label"]) == ["pos", "neg", "neg"]
        assert got["predicted_label"].isna().tolist() == [False, True, False]
        assert got["p_pos"].isna().tolist() == [False, True, False]
        assert abs(got["p_pos"][0] + got["p_neg"][0] - 1) < 1e-5
    # a failed write (--overwrite) leaves the old file; a format that cannot be written here
    # is refused before any work
    dest = tmp_path / "p.csv"
    before = dest.read_text()

    def broken(self, *a, **k):
        raise OSError("disk full")

    with monkeypatch.context() as m:
        m.setattr(pd.DataFrame, "to_csv", broken)
        with pytest.raises(OSError):
            run_cli(capsys, "predict", str(out), "--input", str(inp), "--output", str(dest),
                    "--overwrite", "--quiet")
    assert dest.read_text() == before and [p.name for p in tmp_path.glob(".p.tmp*")] == []
    import importlib.util

    if importlib.util.find_spec("pyarrow") is None:
        code, _, err = run_cli(capsys, "predict", str(out), "--input", str(inp), "--output",
                               str(tmp_path / "p.parquet"))
        assert code == 2 and "pyarrow" in one_line_error(err)
    # --output in folders not made yet: made; under a file, or a folder itself: one line, first
    dest = tmp_path / "new" / "dir" / "p.csv"
    code, _, err = run_cli(capsys, "predict", str(out), "--input", str(inp), "--output",
                           str(dest), "--quiet")
    assert code == 0 and len(pd.read_csv(dest)) == 3, err
    for bad, said in ((inp / "p.csv", "is a file"), (tmp_path / "new", "is a folder")):
        code, _, err = run_cli(capsys, "predict", str(out), "--input", str(inp), "--output",
                               str(bad), "--overwrite", "--quiet")
        assert code == 2 and said in one_line_error(err)
    # pairs are required: stdin lines (single texts) and the Python API without pairs= refuse
    monkeypatch.setattr("sys.stdin", io.StringIO("good film\n"))
    code, _, err = run_cli(capsys, "predict", str(out), "--input", "-")
    assert code == 2 and "text pairs" in one_line_error(err)
    import textune
    from textune.errors import UserError

    clf = textune.load(out)
    with pytest.raises(UserError, match="pairs="):
        clf.predict(["good film"])
    assert clf.predict(["good film"], ["more film"]) in (["pos"], ["neg"])
    code, _, err = run_cli(capsys, "serve", str(out), "--port", "0")  # refused before listening
    assert code == 2 and "text pairs" in one_line_error(err)


def test_text_the_vocabulary_does_not_cover_is_flagged(capsys, tmp_path, tiny_bert, caplog):
    from transformers import AutoTokenizer

    from textune.data import Table, encode, unknown_share

    tok = AutoTokenizer.from_pretrained(tiny_bert)
    known = encode(tok, Table(["good film", "bad plot"], None, None, "x"), 16)
    assert unknown_share(known, tok) == 0.0  # ([CLS] and [SEP] are not counted)
    half = encode(tok, Table(["good 好", "bad 坏"], None, None, "x"), 16)
    assert unknown_share(half, tok) == 0.5
    rows = [(f"好 {i} 的", "pos") for i in range(40)] + [(f"坏 {i} 了", "neg") for i in range(40)]
    data = write_csv(tmp_path / "zh.csv", rows)
    code, _, err = run_cli(capsys, "train", "--model", str(tiny_bert), "--data", str(data),
                           "--epochs", "1", "--out", str(tmp_path / "o"), "--quiet")
    assert code == 0, err
    assert "of the training tokens are [UNK]" in caplog.text
    m = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert m["unknown_token_share"] > 0.5
    assert "were unknown to the tokenizer" in (tmp_path / "o" / "report.html").read_text()


def test_test_file_overlapping_training_is_flagged(capsys, tmp_path, tiny_bert, caplog):
    from .conftest import toy_rows

    rows = toy_rows(200)
    train = write_csv(tmp_path / "train.csv", rows)
    fresh = [(f"{t} unseen{i}", y) for i, (t, y) in enumerate(toy_rows(10, seed=7))]
    test = write_csv(tmp_path / "test.csv", [(t.upper(), y) for t, y in rows[:10]] + fresh)
    val = write_csv(tmp_path / "val.csv", [(f"{t} other{i}", y) for i, (t, y) in
                                           enumerate(toy_rows(20, seed=8))])
    code, _, err = run_cli(capsys, "train", "--model", str(tiny_bert), "--data", str(train),
                           "--val", str(val), "--test", str(test), "--epochs", "1",
                           "--out", str(tmp_path / "o"), "--quiet")
    assert code == 0, err
    assert "test.csv: 10 of its 20 texts (50%) also occur in the training data" in caplog.text
    m = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert m["splits"]["test_in_train"] == 10 and m["splits"]["val_in_train"] == 0
    report = (tmp_path / "o" / "report.html").read_text()
    assert "Caveats" in report and "10 of the 20 test texts also occur" in report


def test_predict_txt_is_one_text_per_line(capsys, tmp_path, tiny_bert, toy_csv, monkeypatch):
    import io

    out = tmp_path / "run"
    assert run_cli(capsys, "train", "--model", str(tiny_bert), "--data", str(toy_csv),
                   "--epochs", "1", "--out", str(out), "--quiet")[0] == 0
    (tmp_path / "lines.txt").write_text("good film, really\n\nawful plot\n")
    code, stdout, err = run_cli(capsys, "predict", str(out), "--input",
                                str(tmp_path / "lines.txt"), "--quiet")
    assert code == 0, err
    rows = stdout.splitlines()
    assert rows[0].startswith("text,label,") and len(rows) == 4  # header + 3 lines, one blank
    assert rows[1].startswith('"good film, really",') and rows[2].startswith(",,")
    # a .txt with a header naming the text column is a table, as before
    (tmp_path / "table.txt").write_text("id\ttext\n1\tgood film\n")
    code, stdout, err = run_cli(capsys, "predict", str(out), "--input",
                                str(tmp_path / "table.txt"), "--quiet")
    assert code == 0 and stdout.splitlines()[0].startswith("id,text,label"), err
    # standard input: the same lines, the same rows (line N of the output answers line N)
    monkeypatch.setattr("sys.stdin", io.StringIO("good film, really\r\n\nawful plot\n"))
    code, piped, err = run_cli(capsys, "predict", str(out), "--input", "-", "--quiet")
    assert code == 0 and piped.splitlines() == rows, err


def test_real_process_exit_code(tmp_path):
    r = subprocess.run([sys.executable, "-m", "textune", "eval", str(tmp_path), "--data", "x"],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "not a textune run folder" in r.stderr


@pytest.mark.parametrize("flag,value", [("--epochs", "0"), ("--max-length", "2"),
                                        ("--limit", "1"), ("--num-processes", "0"),
                                        ("--lora-dropout", "1.5"), ("--batch-tokens", "10"),
                                        ("--max-windows", "0")])
def test_bad_flag_values(capsys, tmp_path, toy_csv, flag, value):
    code, _, err = run_cli(capsys, "train", "--data", str(toy_csv), "--out", str(tmp_path / "o"),
                           flag, value)
    assert code == 2 and flag in one_line_error(err)


@pytest.mark.parametrize("args,said", [
    (["train", "--lr", "abc"], "textune train: error: argument --lr: invalid float value"),
    (["plan", "--batch-size", "0"], "textune plan: error: argument --batch-size"),
    (["bogus"], "textune: error: argument command: invalid choice: 'bogus'"),
    (["train", "--learning-rate", "1e-4", "--num_train_epochs", "3"],
     "--learning-rate: did you mean --lr?; --num_train_epochs: did you mean --epochs?"),
    (["predict", "run", "--input", "x", "--min-confidnce", "0.9"],
     "textune predict: error: unrecognized arguments: --min-confidnce 0.9 (--min-confidnce: "
     "did you mean --min-confidence?)")])
def test_argparse_errors_are_one_line(capsys, args, said):
    """A bad value, an unknown command or flag: one line (the flag, a near or Trainer-named
    flag's textune name, where the options are listed), exit 2; not argparse's usage block."""
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and said in err, err
    assert "usage:" not in err and f"`{err.split(':')[0]} --help` lists the options" in err


def test_windows_refuse_text_pairs(capsys, tmp_path, toy_csv):
    code, _, err = run_cli(capsys, "train", "--data", str(toy_csv), "--out", str(tmp_path / "o"),
                           "--text-pair-col", "label", "--truncation", "windows")
    assert code == 2 and "--truncation windows: not for text pairs" in one_line_error(err)
    assert not (tmp_path / "o").exists()


@pytest.fixture
def toy_run(capsys, tmp_path, tiny_bert, toy_csv):
    """A tiny BERT fine-tuned on the toy data (for predict's options)."""
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--model", str(tiny_bert), "--data", str(toy_csv),
                           "--lr", "1e-3", "--epochs", "2", "--out", str(out), "--quiet")
    assert code == 0, err
    return out


def test_predict_uncertain_picks_the_rows_the_run_is_least_sure_of(capsys, tmp_path, toy_run,
                                                                    toy_csv):
    import numpy as np
    import pandas as pd

    import textune

    out = toy_run
    pool = pd.read_csv(toy_csv).head(200)
    texts = pool["text"].tolist()
    texts[5] = texts[7]  # a repeated text is offered once
    pool["text"] = texts
    pool.insert(0, "id", range(1000, 1200))
    pool.to_csv(tmp_path / "pool.csv", index=False)
    dest = tmp_path / "next.csv"
    code, _, err = run_cli(capsys, "predict", str(out), "--input", str(tmp_path / "pool.csv"),
                           "--uncertain", "20", "--output", str(dest), "--quiet")
    assert code == 0, err
    got = pd.read_csv(dest)
    assert list(got.columns) == ["row", "id", "text", "label", "predicted_label", "p_neg",
                                 "p_pos", "uncertainty"]
    assert len(got) == 20 and got["text"].is_unique
    assert (got["id"] == got["row"] + 1000).all()  # row: where it was in the input
    # the 20 smallest margins between the two classes, most unsure first
    clf = textune.load(out)
    p = clf.predict_proba(texts)
    unsure = 1 - np.abs(p[:, 0] - p[:, 1])
    assert np.allclose(got["uncertainty"], unsure[got["row"]], atol=1e-5)
    assert got["uncertainty"].is_monotonic_decreasing
    first_of = {t: i for i, t in reversed(list(enumerate(texts)))}
    rest = [i for i in range(200) if i not in set(got["row"]) and first_of[texts[i]] == i]
    assert unsure[rest].max() <= got["uncertainty"].min() + 1e-6
    code, _, err = run_cli(capsys, "predict", str(out), "--input", str(tmp_path / "pool.csv"),
                           "--uncertain", "0")
    assert code == 2 and "--uncertain 0" in one_line_error(err)


def test_multilabel_uncertainty_is_the_distance_to_the_nearest_threshold():
    import numpy as np

    from textune.classifier import Classifier

    clf = Classifier.__new__(Classifier)
    clf.multi_label, clf.thresholds = True, np.array([0.4, 0.5])
    u = clf.uncertainty(np.array([[0.4, 0.9], [0.7, 0.1], [1.0, 0.0]]))
    # row 0: tag a sits on its threshold; row 1: a is halfway up its room (0.3 of 0.6), b
    # 0.4 of 0.5 below; row 2: both as sure as can be
    assert np.allclose(u, [1.0, 0.5, 0.0])


def test_predict_min_confidence_leaves_unsure_rows_unlabelled(capsys, tmp_path, toy_run,
                                                              toy_csv):
    import json

    import numpy as np
    import pandas as pd

    import textune

    out = toy_run
    m = json.loads((out / "metrics.json").read_text())
    levels = {r["min_confidence"]: r for r in m["by_confidence"]}
    assert levels[0.0]["coverage"] == 1.0 and levels[0.0]["accuracy"] == round(m["accuracy"], 4)
    assert "Accuracy by confidence" in (out / "report.html").read_text()
    pool = pd.read_csv(toy_csv).head(100)
    pool.to_csv(tmp_path / "pool.csv", index=False)
    p = textune.load(out).predict_proba(pool["text"].tolist())
    level = float(np.quantile(p.max(1), 0.3))  # about 30% of the rows fall under it
    dest = tmp_path / "p.csv"
    code, _, err = run_cli(capsys, "predict", str(out), "--input", str(tmp_path / "pool.csv"),
                           "--min-confidence", f"{level:.6f}", "--output", str(dest), "--quiet")
    assert code == 0, err
    got = pd.read_csv(dest)
    unsure = p.max(1) < round(level, 6)
    assert got["predicted_label"].isna().tolist() == unsure.tolist() and 0 < unsure.sum() < 100
    assert got["p_pos"].notna().all()  # probabilities kept for every row
    assert f"{unsure.sum()} of 100 rows under confidence" in err
    for bad in ("0", "1.5"):
        code, _, err = run_cli(capsys, "predict", str(out), "--input", str(tmp_path / "pool.csv"),
                               "--min-confidence", bad)
        assert code == 2 and "--min-confidence" in one_line_error(err)


def test_predict_streams_slices_as_one_table_and_keeps_the_rows_done(capsys, tmp_path, toy_run,
                                                                      toy_csv, monkeypatch):
    import io

    import pandas as pd

    from textune import cli
    from textune.classifier import Classifier

    pool = pd.read_csv(toy_csv).head(23)
    pool.loc[[4, 5, 6, 17], "text"] = ""  # a slice (rows 3-5 of 3-row slices) without any text
    pool.insert(0, "id", range(len(pool)))
    pool.to_csv(tmp_path / "pool.csv", index=False)
    whole = {}
    for rows in (10_000, 3):
        monkeypatch.setattr(cli, "PREDICT_ROWS", rows)
        for fmt in ("p.csv", "p.jsonl", "p.tsv", "stdout-csv", "stdout-jsonl"):
            dest = tmp_path / f"{rows}-{fmt}"
            args = ["--output", str(dest)] if fmt.startswith("p.") else \
                ["--jsonl"] if fmt.endswith("jsonl") else []
            code, out, err = run_cli(capsys, "predict", str(toy_run), "--input",
                                     str(tmp_path / "pool.csv"), "--min-confidence", "0.6",
                                     *args, "--quiet")
            assert code == 0, err
            got = dest.read_text() if fmt.startswith("p.") else out
            assert whole.setdefault(fmt, got) == got, (rows, fmt)  # byte for byte
            assert "rows under confidence 0.6" in err
    table = pd.read_csv(io.StringIO(whole["p.csv"]))
    assert table["id"].tolist() == list(range(23)) and table["p_pos"].isna().sum() == 4
    assert pd.read_json(io.StringIO(whole["stdout-jsonl"]), lines=True)["id"].tolist() == \
        list(range(23))
    # stopped part way: nothing at --output, the rows done kept beside it, said in one line
    calls = []
    real = Classifier.predict_proba

    def dies(self, *args, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, *args, **kw)

    monkeypatch.setattr(Classifier, "predict_proba", dies)
    dest = tmp_path / "stopped.csv"
    code, _, err = run_cli(capsys, "predict", str(toy_run), "--input", str(tmp_path / "pool.csv"),
                           "--output", str(dest), "--quiet")
    partial = tmp_path / "stopped.partial.csv"
    assert code == 130 and not dest.exists() and partial.exists()
    assert f"after 6 of 23 rows; those rows' predictions are in {partial}" in err
    assert partial.read_text() == "\n".join(whole["p.csv"].splitlines()[:7]) + "\n"
    assert list(tmp_path.glob(".stopped.tmp*")) == []
    assert "the same command with --resume continues" in err
    calls.clear()  # stopped again: the first partial file is kept, the second beside it
    code, _, err = run_cli(capsys, "predict", str(toy_run), "--input", str(tmp_path / "pool.csv"),
                           "--output", str(dest), "--quiet")
    assert code == 130 and str(tmp_path / "stopped.partial2.csv") in err
    assert partial.read_text() == (tmp_path / "stopped.partial2.csv").read_text()
    assert "--resume" not in err  # (--resume reads stopped.partial.csv, not this one)
    # --resume: the kept rows, then the rest; the same bytes as one uninterrupted run
    monkeypatch.setattr(Classifier, "predict_proba", real)
    calls.clear()
    other = tmp_path / "other.csv"
    pool.iloc[::-1].to_csv(other, index=False)
    for args, said in ((["--input", str(other)], "differ at row 1"),
                       (["--input", str(tmp_path / "pool.csv"), "--uncertain", "3"],
                        "not with --uncertain"),
                       (["--input", str(tmp_path / "pool.csv"), "--output",
                         str(tmp_path / "none.csv")], "no " + str(tmp_path / "none.partial.csv")),
                       (["--input", str(tmp_path / "pool.csv"), "--output",
                         str(tmp_path / "p.parquet")], "written at the end")):
        if "--output" not in args:
            args += ["--output", str(dest)]
        code, _, err = run_cli(capsys, "predict", str(toy_run), *args, "--resume", "--quiet")
        assert code == 2 and said in one_line_error(err), args
    assert partial.exists() and not dest.exists()  # refused: nothing touched
    (tmp_path / "empty.partial.csv").write_text("")
    code, _, err = run_cli(capsys, "predict", str(toy_run), "--input", str(tmp_path / "pool.csv"),
                           "--output", str(tmp_path / "empty.csv"), "--resume", "--quiet")
    assert code == 2 and "cannot read" in one_line_error(err)
    code, _, err = run_cli(capsys, "predict", str(toy_run), "--input", str(tmp_path / "pool.csv"),
                           "--output", str(dest), "--resume", "--min-confidence", "0.6",
                           "--quiet")
    assert code == 0, err
    assert dest.read_text() == whole["p.csv"] and not partial.exists()
    assert "the first 6 rows from the stopped run" in err
    assert "rows predicted now (after the 6 resumed)" in err
    # JSON lines too (its cells read back as strings to compare the texts)
    monkeypatch.setattr(Classifier, "predict_proba", dies)
    dest = tmp_path / "stopped.jsonl"
    code, _, err = run_cli(capsys, "predict", str(toy_run), "--input", str(tmp_path / "pool.csv"),
                           "--output", str(dest), "--min-confidence", "0.6", "--quiet")
    assert code == 130 and (tmp_path / "stopped.partial.jsonl").exists()
    monkeypatch.setattr(Classifier, "predict_proba", real)
    code, _, err = run_cli(capsys, "predict", str(toy_run), "--input", str(tmp_path / "pool.csv"),
                           "--output", str(dest), "--min-confidence", "0.6", "--resume",
                           "--quiet")
    assert code == 0 and dest.read_text() == whole["p.jsonl"], err


def test_predict_into_a_closed_pipe_stops_quietly(tmp_path, toy_run):
    """`textune predict ... | head -1`: no traceback once head has its line."""
    rows = "\n".join(f"good film {i}" for i in range(20_000)) + "\n"
    proc = subprocess.run(f"{sys.executable} -m textune predict {toy_run} --input - --quiet | "
                          f"head -1", shell=True, input=rows, capture_output=True, text=True,
                          timeout=300)
    assert proc.stdout.startswith("text,label,") and "Traceback" not in proc.stderr, proc.stderr


def test_cache_lists_sizes_and_clears_only_the_parts_named(tmp_path, monkeypatch, capsys):
    home = tmp_path / "home"
    monkeypatch.setenv("TEXTUNE_HOME", str(home))
    (home / "features" / "k").mkdir(parents=True)
    (home / "features" / "k" / "f.npy").write_bytes(b"x" * 3 * 2**20)
    (home / "models" / "m").mkdir(parents=True)
    (home / "models" / "m" / "w.bin").write_bytes(b"x" * 2**20)
    assert main(["cache"]) == 0
    out = capsys.readouterr().out
    assert "features" in out and "3.0 MB" in out and "4.0 MB" in out  # (the total)
    assert main(["cache", "--clear", "features,teacher-labels"]) == 0
    assert "cleared features (3.0 MB)" in capsys.readouterr().out
    assert not (home / "features").exists() and (home / "models" / "m" / "w.bin").exists()
    assert main(["cache", "--clear", "runs"]) == 2
    assert "--clear runs: choose from" in capsys.readouterr().err
    assert (home / "models").exists()


def test_several_runs_and_prompt_refuse_bad_counts(tmp_path, capsys):
    for args, msg in ((["compare", "--data", "x.csv", "--num-processes", "0"],
                       "--num-processes 0: must be 1 or more"),
                      (["compare", "--data", "x.csv", "--strategies", "frozen,bogus"],
                       "--strategies: unknown ['bogus']; choose from full, frozen"),
                      (["cv", "--data", "x.csv", "--folds", "1"], "--folds 1: give 2 or more"),
                      (["curve", "--data", "x.csv", "--limit", "9"], "give them with --sizes"),
                      (["prompt", "--data", "x.csv", "--temperature-rows", "-1"],
                       "--temperature-rows must be 0 or more")):
        assert main([*args, "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err
        assert not (tmp_path / "o").exists()  # (refused before any folder is made)


def test_top_level_help_says_what_textune_is(capsys):
    from textune.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "for text classification" in out
    assert "module" not in out and "COMMAND --help" in out  # (was the module's docstring)


def test_env_says_what_precision_auto_picks(capsys, monkeypatch):
    import torch

    from textune.cli import main

    assert main(["env", "--json"]) == 0
    env = json.loads(capsys.readouterr().out)
    assert env["torch"] == torch.__version__ and env["threads"] == torch.get_num_threads()
    if not torch.cuda.is_available():
        assert env["precision_auto"] == ("bf16" if env["native_bf16"] else "fp32")
        monkeypatch.setenv("TEXTUNE_CPU_BF16", "0")
        assert main(["env"]) == 0
        out = capsys.readouterr().out
        assert "precision_auto  fp32" in out and "TEXTUNE_CPU_BF16=0 turns bf16 off" in out


def test_out_of_memory_is_one_line_with_the_fixes(monkeypatch, capsys):
    import torch

    from textune import cli

    def oom(a):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(cli, "cmd_list", oom)
    assert cli.main(["list"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("textune: error: out of GPU memory (CUDA out of memory. Tried to "
                          "allocate 2.00 GiB); lower --batch-size") and "--batch-size auto" in err

    def cpu_oom(a):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't "
                           "allocate memory: you tried to allocate 68719476736 bytes.")

    monkeypatch.setattr(cli, "cmd_list", cpu_oom)
    assert cli.main(["list"]) == 1
    assert "out of CPU memory" in capsys.readouterr().err

    def other(a):
        raise RuntimeError("something else")

    monkeypatch.setattr(cli, "cmd_list", other)  # not memory: the traceback stays
    with pytest.raises(RuntimeError, match="something else"):
        cli.main(["list"])
