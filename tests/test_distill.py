"""Distillation (`train --teacher RUN --unlabelled FILE`): a finished run labels unlabelled
texts and the student learns from them; a prompt run can teach too."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

import textune
from textune.api import train
from textune.cli import main
from textune.config import DataArgs, ModelArgs, RunConfig, StrategyArgs, TrainArgs
from textune.data import Encoded
from textune.modeling import classification_loss
from textune.teacher import TEACHER_LABELS, targets, with_targets

from .conftest import toy_rows, write_csv


def test_soft_loss_is_cross_entropy_against_probabilities():
    logits = torch.randn(5, 3)
    y = torch.tensor([0, 2, 1, 1, 0])
    one_hot = torch.eye(3)[y]
    assert torch.allclose(classification_loss(logits, one_hot, soft=True),
                          classification_loss(logits, y))
    p = torch.softmax(torch.randn(5, 3), -1)
    manual = -(p * torch.log_softmax(logits, -1)).sum(1).mean()
    assert torch.allclose(classification_loss(logits, p, soft=True), manual)


def test_targets_and_training_rows_with_windows():
    class T:
        multi_label, thresholds = False, None

    probs = np.array([[0.7, 0.3], [0.2, 0.8]], dtype=np.float32)
    assert (targets(T, probs, "soft") == probs).all()
    assert (targets(T, probs, "hard") == np.array([[1, 0], [0, 1]])).all()
    T.multi_label, T.thresholds = True, np.array([0.5, 0.9])
    assert (targets(T, probs, "hard") == np.array([[1, 0], [0, 0]])).all()

    ids = [np.arange(3)] * 3
    labelled = Encoded(ids[:2], None, np.array([1, 0]), 0, rows=np.array([0, 1]))
    pool = Encoded(ids, None, None, 0, rows=np.array([0, 0, 1]))  # text 0 has two windows
    joined = with_targets(labelled, pool, probs, 2)
    assert joined.labels.dtype == np.float32
    assert np.allclose(joined.labels, [[0, 1], [1, 0], [0.7, 0.3], [0.7, 0.3], [0.2, 0.8]])
    assert joined.rows.tolist() == [0, 1, 2, 2, 3] and joined.n_rows == 4


@pytest.fixture
def files(tmp_path):
    """A teacher's 400 labelled rows; 8 labelled rows for the student; 400 unlabelled texts
    (20 of them also in the student's test file); a test file of 300."""
    rows = toy_rows(1120, seed=11)
    test = rows[800:1100]
    pool = [(t,) for t, _ in rows[400:780]] + [(t,) for t, _ in test[:20]]
    return {"teacher": write_csv(tmp_path / "teacher.csv", rows[:400]),
            "few": write_csv(tmp_path / "few.csv", rows[1100:1120]),
            "pool": write_csv(tmp_path / "pool.csv", pool, header=("text",)),
            "test": write_csv(tmp_path / "test.csv", test)}


def cfg_for(model, data, out, test, **data_kw) -> RunConfig:
    return RunConfig(DataArgs(str(data), test=str(test), val_fraction=0.4, max_length=16,
                              **data_kw), ModelArgs(str(model)), StrategyArgs("full"),
                     TrainArgs(epochs=6, lr=1e-3, batch_size=16, seed=0), str(out))


def test_student_learns_from_the_teachers_labels(tiny_bert, files, tmp_path):
    teacher = train(cfg_for(tiny_bert, files["teacher"], tmp_path / "t", files["test"]),
                    progress=False)
    assert teacher["accuracy"] >= 0.9
    alone = train(cfg_for(tiny_bert, files["few"], tmp_path / "alone", files["test"]),
                  progress=False)
    runs = {}
    for how in ("soft", "hard"):
        runs[how] = train(cfg_for(tiny_bert, files["few"], tmp_path / how, files["test"],
                                  unlabelled=str(files["pool"]), teacher=str(tmp_path / "t"),
                                  teacher_targets=how), progress=False)
    soft = runs["soft"]
    t = soft["teacher"]
    # the second student of the same teacher and pool reads the teacher's labels from the cache
    assert not t["from_cache"] and runs["hard"]["teacher"]["from_cache"]
    assert (pd.read_csv(tmp_path / "soft" / TEACHER_LABELS).equals(
        pd.read_csv(tmp_path / "hard" / TEACHER_LABELS)))
    # 12 labelled training rows teach a random 32-wide BERT little; 380 more labelled by the
    # teacher teach it the task (measured: alone 0.55, soft 0.98, hard 0.97)
    assert soft["accuracy"] >= alone["accuracy"] + 0.2, (alone["accuracy"], soft["accuracy"])
    assert runs["hard"]["accuracy"] >= alone["accuracy"] + 0.2
    assert t["unlabelled_rows"] == 380 and t["left_out_as_labelled"] == 20
    assert t["test_rows_teacher_trained_on"] == 0
    assert t["test_accuracy"] == pytest.approx(teacher["accuracy"], abs=1e-4)  # same test rows
    assert t["student_minus_teacher"]["difference"] == pytest.approx(
        soft["accuracy"] - teacher["accuracy"], abs=1e-4)
    lo, hi = t["student_minus_teacher"]["ci95"]
    assert lo <= t["student_minus_teacher"]["difference"] <= hi
    assert soft["splits"]["train"] == 12 and soft["splits"]["unlabelled"] == 380
    pool = pd.read_csv(tmp_path / "soft" / TEACHER_LABELS)
    assert len(pool) == 380 and set(pool["label"]) == {"neg", "pos"}
    assert np.allclose(pool[["p_neg", "p_pos"]].sum(axis=1), 1, atol=1e-3)
    test_texts = set(pd.read_csv(files["test"])["text"])
    assert not set(pool["text"]) & test_texts
    # the student reloads like any run; its config keeps where its teacher and pool were
    cfg = json.loads((tmp_path / "soft" / "config.json").read_text())
    assert cfg["data"]["teacher"] == str((tmp_path / "t").resolve())
    assert textune.load(tmp_path / "soft").predict(["a superb film"]) == ["pos"]


def test_two_processes_split_the_teachers_work(tiny_bert, files, tmp_path):
    """`--num-processes 2`: each process scores half the pool (not all of it), each on its own
    device, and both train on the whole pool's labels."""
    import os
    import subprocess
    import sys

    teacher = train(cfg_for(tiny_bert, files["teacher"], tmp_path / "t", files["test"]),
                    progress=False)
    out = tmp_path / "two"
    args = ["train", "--model", str(tiny_bert), "--data", str(files["few"]), "--test",
            str(files["test"]), "--val-fraction", "0.4", "--max-length", "16", "--strategy",
            "full", "--epochs", "2", "--lr", "1e-3", "--batch-size", "16", "--precision", "fp32",
            "--teacher", str(tmp_path / "t"), "--unlabelled", str(files["pool"]),
            "--num-processes", "2", "--out", str(out)]
    done = subprocess.run([sys.executable, "-m", "textune.cli", *args], capture_output=True,
                          text=True, timeout=300,
                          env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    assert done.returncode == 0, done.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert not m["teacher"]["from_cache"] and m["teacher"]["processes"] == 2
    assert m["splits"]["unlabelled"] == 380
    assert m["teacher"]["test_accuracy"] == pytest.approx(teacher["accuracy"], abs=1e-4)
    pool = pd.read_csv(out / TEACHER_LABELS)  # the halves put back in order
    expected = textune.load(tmp_path / "t").predict_proba(pool["text"].tolist())
    assert np.allclose(pool[["p_neg", "p_pos"]], expected, atol=2e-4)


@pytest.fixture
def causal_lm(tiny_llama, tmp_path):
    """The tiny LLaMA with its LM head saved (so every load is the same model)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=0, eos_token_id=1))
    folder = tmp_path / "lm"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_a_prompt_run_teaches(causal_lm, tiny_bert, files, tmp_path):
    out = tmp_path / "prompt"
    assert main(["prompt", "--model", str(causal_lm), "--data", str(files["teacher"]),
                 "--test", str(files["test"]), "--labels", "bad,good", "--shots", "2",
                 "--out", str(out), "--quiet"]) == 0
    prompted = json.loads((out / "metrics.json").read_text())
    from textune import load
    from textune.prompting import PromptClassifier

    clf = load(out)
    assert isinstance(clf, PromptClassifier)
    texts = pd.read_csv(files["test"])["text"].tolist()
    p = clf.predict_proba(texts)
    assert p.shape == (300, 2) and np.allclose(p.sum(1), 1, atol=1e-5)
    # the same texts, template, demonstrations and calibration: the prompt run's own accuracy
    y = (pd.read_csv(files["test"])["label"] == "pos").to_numpy()
    assert (p.argmax(1) == y).mean() == pytest.approx(prompted["accuracy"], abs=1e-9)
    # mean calibration with the run's offsets: a text scores the same alone as among others
    assert np.allclose(clf.predict_proba(texts[:1]), p[:1], atol=1e-5)
    # the CLI takes the prompt run like a trained one: predict, eval; export refuses it
    assert main(["predict", str(out), "--input", str(files["test"]), "--output",
                 str(tmp_path / "pred.csv"), "--quiet"]) == 0
    pred = pd.read_csv(tmp_path / "pred.csv")
    assert (pred["predicted_label"] == np.where(p.argmax(1) == 1, "pos", "neg")).all()
    assert np.allclose(pred["p_pos"], p[:, 1], atol=1e-5)
    assert main(["eval", str(out), "--data", str(files["teacher"]), "--out",
                 str(tmp_path / "ev"), "--quiet"]) == 0
    ev = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert ev["accuracy"] == pytest.approx(prompted["accuracy"], abs=1e-9) and ev["n_eval"] == 300
    assert main(["export", str(out), "--merge", "--out", str(tmp_path / "x"), "--quiet"]) == 2
    assert main(["predict", str(out), "--input", str(files["test"]), "--truncation", "windows",
                 "--quiet"]) == 2  # (a prompt reads heads)
    m = train(cfg_for(tiny_bert, files["few"], tmp_path / "s", files["test"],
                      unlabelled=str(files["pool"]), teacher=str(out)), progress=False)
    assert m["teacher"]["strategy"].startswith("prompt")
    assert m["teacher"]["test_accuracy"] == pytest.approx(prompted["accuracy"], abs=1e-4)


def test_distillation_refusals(tiny_bert, files, tmp_path, capsys):
    base = ["train", "--model", str(tiny_bert), "--data", str(files["few"]), "--test",
            str(files["test"]), "--quiet", "--max-length", "16"]
    cases = [
        (["--unlabelled", str(files["pool"])], "go together"),
        (["--unlabelled", str(files["pool"]), "--teacher", str(tmp_path)], "not a run folder"),
        (["--unlabelled", str(files["pool"]), "--teacher", str(tmp_path), "--strategy",
          "contrastive"], "contrastive"),
    ]
    other = write_csv(tmp_path / "other.csv", [(t, "x" if i % 2 else "y") for i, (t, _) in
                                               enumerate(toy_rows(60))])
    train(RunConfig(DataArgs(str(other), max_length=16), ModelArgs(str(tiny_bert)),
                    StrategyArgs("frozen"), TrainArgs(epochs=1), str(tmp_path / "xy")),
          progress=False)
    cases.append((["--unlabelled", str(files["pool"]), "--teacher", str(tmp_path / "xy")],
                  "not the teacher's"))
    for i, (extra, words) in enumerate(cases):
        assert main(base + extra + ["--out", str(tmp_path / f"r{i}")]) == 2, extra
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err, err


def test_a_teacher_that_trained_on_the_test_rows_is_flagged(tiny_bert, files, tmp_path, caplog):
    """A teacher split with another seed trained on about half the student's test rows: its test
    score flatters it, and the run says so."""
    cfg = cfg_for(tiny_bert, files["teacher"], tmp_path / "t", files["test"])
    cfg.data.test, cfg.train.epochs = None, 1
    train(cfg, progress=False)  # its own 80/10/10 split of teacher.csv
    student = cfg_for(tiny_bert, files["teacher"], tmp_path / "s", files["test"],
                      unlabelled=str(files["pool"]), teacher=str(tmp_path / "t"))
    student.data.test, student.data.split_seed, student.train.epochs = None, 5, 1
    m = train(student, progress=False)
    seen = m["teacher"]["test_rows_teacher_trained_on"]
    assert 0.3 * m["n_eval"] <= seen < m["n_eval"]  # (its training split: 50% of the rows)
    assert "in the teacher's training data" in caplog.text
    assert "flatter the teacher" in (tmp_path / "s" / "report.html").read_text()


def test_multi_label_student_learns_tags_from_a_teacher(tiny_bert, tmp_path):
    from .test_multilabel import tag_rows

    rows = tag_rows(1000, seed=3)
    teacher_csv = write_csv(tmp_path / "teacher.csv", rows[:500])
    few = write_csv(tmp_path / "few.csv", rows[500:530])
    pool = write_csv(tmp_path / "pool.csv", [(t,) for t, _ in rows[530:900]], header=("text",))
    test = write_csv(tmp_path / "test.csv", rows[900:])

    def run(data, out, **kw):
        cfg = cfg_for(tiny_bert, data, tmp_path / out, test, multi_label=True, **kw)
        cfg.train.epochs = 8
        return train(cfg, progress=False)

    teacher = run(teacher_csv, "t")
    alone = run(few, "alone")
    student = run(few, "s", unlabelled=str(pool), teacher=str(tmp_path / "t"))
    t = student["teacher"]
    assert t["test_accuracy"] == pytest.approx(teacher["accuracy"], abs=1e-4)
    # 24 labelled training rows against 370 more tagged by the teacher (measured macro-F1:
    # teacher 0.87, alone 0.58, student 0.77)
    assert student["macro_f1"] >= alone["macro_f1"] + 0.1, (alone["macro_f1"],
                                                           student["macro_f1"])
    labelled = pd.read_csv(tmp_path / "s" / TEACHER_LABELS, keep_default_na=False)
    assert len(labelled) == 370 and {"p_neg", "p_num", "p_pos"} <= set(labelled.columns)
