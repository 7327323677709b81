"""Data-parallel training through `accelerate launch` (2 CPU processes, gloo) matches the
single-process run with the same global batch; kill -9 mid-epoch + --resume matches an
uninterrupted run; SIGINT checkpoints and exits; a corrupt checkpoint is named, not loaded."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from textune.cli import main


def run_cli(*args: str, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", "textune.cli", *args], capture_output=True,
                          text=True, env=env, timeout=300, **kw)


def test_two_processes_match_one(tiny_bert, toy_csv, tmp_path):
    common = ["train", "--model", str(tiny_bert), "--data", str(toy_csv), "--strategy", "full",
              "--epochs", "2", "--batch-size", "16", "--lr", "3e-3", "--precision", "fp32",
              "--seed", "0", "--quiet"]
    one = run_cli(*common, "--out", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr[-2000:]
    two = run_cli(*common, "--num-processes", "2", "--out", str(tmp_path / "two"))
    assert two.returncode == 0, two.stderr[-3000:]
    m1 = json.loads((tmp_path / "one" / "metrics.json").read_text())
    m2 = json.loads((tmp_path / "two" / "metrics.json").read_text())
    # the same rows are evaluated once each: no duplicated or dropped rows
    assert m1["n_eval"] == m2["n_eval"] == sum(c["support"] for c in m2["per_class"].values())
    assert m2["steps"] == m1["steps"]  # same global batches -> same number of optimizer steps
    assert abs(m1["accuracy"] - m2["accuracy"]) <= 0.03, (m1["accuracy"], m2["accuracy"])
    assert "launching 2 processes" in two.stderr
    assert m1["processes"] == 1 and m2["processes"] == 2  # (two really ran, in one gloo group)
    print("one", m1["accuracy"], m1["steps"], "two", m2["accuracy"], m2["steps"])
    assert m1["accuracy"] > 0.9
    h1 = [json.loads(x) for x in (tmp_path / "one" / "history.jsonl").read_text().splitlines()]
    h2 = [json.loads(x) for x in (tmp_path / "two" / "history.jsonl").read_text().splitlines()]
    l1 = [r["loss"] for r in h1 if "loss" in r]
    l2 = [r["loss"] for r in h2 if "loss" in r]
    assert len(l1) == len(l2)  # history written once, by the main process
    assert abs(l1[-1] - l2[-1]) < 0.1 + 0.2 * l1[-1]
    assert not (tmp_path / "two" / "checkpoint").exists()  # finished: cleaned up once


def _train_args(tiny_bert, toy_csv, out: Path) -> list[str]:
    return ["train", "--model", str(tiny_bert), "--data", str(toy_csv), "--strategy", "full",
            "--epochs", "3", "--batch-size", "4", "--lr", "1e-3", "--precision", "fp32",
            "--save-every", "20", "--seed", "0", "--quiet", "--out", str(out)]


def _wait_for_checkpoint(out: Path, proc: subprocess.Popen, min_step: int) -> dict:
    """Poll until a checkpoint past ``min_step`` that sits inside an epoch is on disk."""
    deadline = time.time() + 240
    while time.time() < deadline:
        st = out / "checkpoint" / "state.json"
        if (out / "checkpoint" / "COMPLETE").exists() and st.exists():
            try:
                s = json.loads(st.read_text())
            except ValueError:
                s = {}
            if s.get("step", 0) >= min_step and s.get("batch_in_epoch", 0) > 0:
                return s
        if proc.poll() is not None:
            pytest.fail(f"training ended before it could be interrupted: {proc.returncode}")
        time.sleep(0.02)
    pytest.fail("no checkpoint appeared")


def _last_loss(out: Path) -> float:
    rows = [json.loads(x) for x in (out / "history.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r][-1]["loss"]


def test_kill_mid_epoch_and_resume_matches_uninterrupted(tiny_bert, toy_csv, tmp_path):
    ref = tmp_path / "ref"
    assert main(_train_args(tiny_bert, toy_csv, ref)) == 0
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "textune.cli",
                             *_train_args(tiny_bert, toy_csv, out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = _wait_for_checkpoint(out, proc, min_step=40)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "metrics.json").exists() and state["epoch"] < 3
    assert main(["train", "--resume", str(out), "--quiet"]) == 0
    a = json.loads((ref / "metrics.json").read_text())
    b = json.loads((out / "metrics.json").read_text())
    assert b["steps"] == a["steps"]
    assert b["accuracy"] == a["accuracy"] and b["macro_f1"] == a["macro_f1"]
    assert _last_loss(out) == pytest.approx(_last_loss(ref), abs=1e-4)


def test_sigint_saves_a_checkpoint_and_exits_cleanly(tiny_bert, toy_csv, tmp_path):
    out = tmp_path / "int"
    # a shell's background job inherits SIGINT ignored (and Python then keeps it ignored):
    # give the child the default disposition so Ctrl-C means what it means in a terminal
    proc = subprocess.Popen([sys.executable, "-m", "textune.cli",
                             *_train_args(tiny_bert, toy_csv, out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    _wait_for_checkpoint(out, proc, min_step=20)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "--resume" in err
    assert (out / "checkpoint" / "COMPLETE").exists()
    assert main(["train", "--resume", str(out), "--quiet"]) == 0
    assert (out / "metrics.json").exists()


@pytest.mark.parametrize("damage", ["truncate", "flip", "remove", "manifest"])
def test_corrupt_checkpoint_is_named_not_loaded(tiny_bert, toy_csv, tmp_path, capsys, damage):
    out = tmp_path / "c"
    proc = subprocess.Popen([sys.executable, "-m", "textune.cli",
                             *_train_args(tiny_bert, toy_csv, out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for_checkpoint(out, proc, min_step=20)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ck = out / "checkpoint"
    f = ck / "trainable.safetensors"
    if damage == "truncate":
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif damage == "flip":
        b = bytearray(f.read_bytes())
        b[-10] ^= 0xFF
        f.write_bytes(bytes(b))
    elif damage == "remove":
        (ck / "optim.pt").unlink()
    else:
        (ck / "COMPLETE").write_text("{not json")
    capsys.readouterr()
    assert main(["train", "--resume", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "checkpoint" in err
    if damage in ("truncate", "flip"):
        assert "trainable.safetensors" in err and "corrupt" in err
    assert not (out / "metrics.json").exists()


def test_compare_trains_each_run_in_several_processes(tiny_bert, toy_csv, tmp_path):
    """compare --num-processes 2: each strategy's run is `train --num-processes 2` (from its
    config), one after another, and its row holds that run's metrics."""
    out = tmp_path / "cmp"
    done = run_cli("compare", "--model", str(tiny_bert), "--data", str(toy_csv),
                   "--strategies", "frozen,full", "--epochs", "1", "--batch-size", "16",
                   "--precision", "fp32", "--num-processes", "2", "--quiet", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((out / "compare.json").read_text())["rows"]
    assert [r["strategy"] for r in rows] == ["frozen", "full"]
    for r in rows:
        m = json.loads((out / r["strategy"] / "metrics.json").read_text())
        assert r["status"] == "ok" and m["processes"] == 2, done.stderr[-3000:]
        assert r["accuracy"] == m["accuracy"] and m["n_eval"] == 100
    assert done.stderr.count("launching 2 processes") == 2


def test_saved_bytes_survives_a_folder_vanishing_while_it_is_listed(tmp_path):
    """With several processes, rank 0 swaps and removes its checkpoint folders while the others
    finish: counting the run's weights must not fail on a folder that went away (it did, on
    CI: rglob raised FileNotFoundError, the rank exited 1 after rank 0 wrote metrics.json)."""
    import shutil
    import threading

    from textune.api import saved_bytes

    (tmp_path / "head.safetensors").write_bytes(b"x" * 10)
    stop = threading.Event()

    def churn():
        while not stop.is_set():
            d = tmp_path / "checkpoint.tmp" / "sub"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(5):
                (d / f"f{i}.pt").write_bytes(b"y")
            shutil.rmtree(tmp_path / "checkpoint.tmp", ignore_errors=True)

    t = threading.Thread(target=churn)
    t.start()
    try:
        sizes = {saved_bytes(tmp_path) for _ in range(1500)}
    finally:
        stop.set()
        t.join()
    assert sizes == {10}
