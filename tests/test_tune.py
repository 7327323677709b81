"""textune tune: hyperparameters chosen on the validation split, on tiny models."""

import json
from pathlib import Path

import pandas as pd
import pytest

from textune.cli import build_parser, main
from textune.errors import UserError
from textune.tuning import choose, hints, parse_grid


def _tune_parser():
    return build_parser().parse_args(["tune", "--data", "x.csv", "--out", "o"]).grid_parser


def test_tune_chooses_on_validation_and_links_the_chosen_run(tiny_bert, toy_csv, tmp_path,
                                                             capsys):
    out = tmp_path / "tune"
    code = main(["tune", "--model", str(tiny_bert), "--data", str(toy_csv), "--strategy", "full",
                 "--grid", "lr=1e-6,1e-3", "--epochs", "2", "--seeds", "0,1", "--out", str(out),
                 "--quiet"])
    assert code == 0
    shown = capsys.readouterr().out
    doc = json.loads((out / "tune.json").read_text())
    rows = {r["settings"]["lr"]: r for r in doc["rows"]}
    assert list(rows) == ["1e-6", "1e-3"]
    for r in rows.values():
        assert [x["seed"] for x in r["runs"]] == [0, 1] and r["status"] == "ok"
        vals = [json.loads((Path(x["run"]) / "metrics.json").read_text())["best_val_macro_f1"]
                for x in r["runs"]]
        assert r["val_macro_f1"] == pytest.approx(sum(vals) / 2)
    # 1e-6 leaves a random backbone at chance; 1e-3 learns the toy task
    assert rows["1e-3"]["val_macro_f1"] > 0.8 > rows["1e-6"]["val_macro_f1"]
    assert doc["chosen"] == "lr-1e-3" and rows["1e-3"]["chosen"] and not rows["1e-6"]["chosen"]
    best_run = max(rows["1e-3"]["runs"], key=lambda x: x["best_val_macro_f1"])
    assert doc["chosen_run"] == best_run["run"]
    assert (out / "best").resolve() == Path(best_run["run"]).resolve()
    chosen_metrics = json.loads((out / "best" / "metrics.json").read_text())
    assert doc["test"]["accuracy"] == chosen_metrics["accuracy"]
    # every run on the same validation and test rows, whatever its seed
    tests = [pd.read_csv(Path(x["run"]) / "predictions.csv")["text"]
             for r in rows.values() for x in r["runs"]]
    assert all(t.equals(tests[0]) for t in tests)
    md = (out / "tune.md").read_text()
    assert "(chosen)" in md and "Chosen: lr=1e-3" in md and md in shown + "\n"
    assert (out / "tune.png").stat().st_size > 5000


def test_tune_refuses_bad_grids_before_training(tiny_bert, toy_csv, tmp_path, capsys):
    cases = [("seed=1,2", "--seeds"), ("limit=10,20", "textune curve"),
             ("strategy=lora,full", "textune compare"), ("lr=fast", "not a value of --lr"),
             ("head=linear,big", "choose from linear, mlp"), ("colour=red", "cannot be tuned"),
             ("lr", "give a train flag and its values"), ("epochs=0,2", "--epochs must be >= 1")]
    for spec, says in cases:
        out = tmp_path / spec.split("=")[0]
        code = main(["tune", "--model", str(tiny_bert), "--data", str(toy_csv), "--grid", spec,
                     "--out", str(out), "--quiet"])
        err = capsys.readouterr().err
        assert code == 2 and says in err, (spec, err)
        assert not out.exists()  # refused before anything was made


def test_parse_grid_converts_with_the_flags_own_rules():
    p = _tune_parser()
    grid = parse_grid(["lr=1e-4, 5e-4", "--batch-size=16,auto", "compile=on,off",
                       "lora_targets=query,value;query,key,value"], p)
    assert [(flag, dest) for flag, dest, _ in grid] == [
        ("--lr", "lr"), ("--batch-size", "batch_size"), ("--compile", "compile"),
        ("--lora-targets", "lora_targets")]
    assert [v for _, v in grid[0][2]] == [1e-4, 5e-4]
    assert [v for _, v in grid[1][2]] == [16, 0]  # auto
    assert [v for _, v in grid[2][2]] == [True, False]
    assert [v for _, v in grid[3][2]] == ["query,value", "query,key,value"]
    with pytest.raises(UserError, match="switch"):
        parse_grid(["compile=maybe"], p)
    with pytest.raises(UserError, match="twice"):
        parse_grid(["lr=1e-4", "lr=1e-3"], p)


def _row(lr, val, test, epoch=2, epochs=5):
    run = {"run": f"r{lr}", "best_val_macro_f1": val, "accuracy": test, "best_epoch": epoch,
           "epochs_run": epochs, "stopped_early": False}
    return {"settings": {"lr": str(lr)}, "values": {"lr": lr}, "name": f"lr-{lr}",
            "runs": [run], "val_macro_f1": val}


def test_choice_ignores_the_test_split_and_says_when_the_grid_is_too_narrow():
    rows = [_row(1e-4, 0.80, 0.90), _row(3e-4, 0.84, 0.81), _row(1e-3, 0.83, 0.95)]
    s = choose(rows, n_val=500)
    assert s["chosen"] == "lr-0.0003" and s["test"]["accuracy"] == 0.81
    assert 0.03 < s["noise"] < 0.035  # 1.96 * sqrt(0.84 * 0.16 / 500)
    assert s["hints"] == []  # inside the grid, best before the last epoch
    rows = [_row(1e-4, 0.70, 0.7), _row(3e-4, 0.80, 0.8), _row(1e-3, 0.84, 0.8, epoch=5)]
    said = hints(rows, rows[2], rows[2]["runs"][0], noise=0.03)
    assert "largest value tried" in said[0] and "best at its last epoch (5)" in said[1]
    # all within the noise: the edge says nothing, the choice hardly matters
    close = [_row(1e-4, 0.80, 0.7), _row(3e-4, 0.805, 0.8), _row(1e-3, 0.81, 0.8)]
    said = hints(close, close[2], close[2]["runs"][0], noise=0.03)
    assert len(said) == 1 and "hardly matter" in said[0]
    # failed runs (no validation score) are never chosen; all failed: nothing is
    rows[2]["val_macro_f1"] = None
    assert choose(rows, 500)["chosen"] == "lr-0.0003"
    assert "chosen" not in choose([dict(rows[2])], 500)


def test_default_grid_is_the_learning_rate_around_the_strategy_default(tiny_bert, tiny_llama):
    from textune.config import RunConfig
    from textune.tuning import default_lr_grid

    def lrs(model, strategy, lr=None):
        cfg = RunConfig.from_options(data="x.csv", model=str(model), strategy=strategy, lr=lr)
        [(flag, _, values)] = default_lr_grid(cfg)
        assert flag == "--lr"
        return [v for _, v in values]

    assert lrs(tiny_bert, "full") == [1.7e-5, 5e-5, 1.5e-4]
    assert lrs(tiny_bert, "lora") == [1.7e-4, 5e-4, 1.5e-3]
    assert lrs(tiny_llama, "lora") == [3.3e-4, 1e-3, 3e-3]  # decoders' LoRA default
    assert lrs(tiny_llama, "lora", lr=1e-4) == [3.3e-5, 1e-4, 3e-4]  # around --lr


def test_tune_from_python_returns_the_chosen_classifier(tiny_bert, toy_csv, tmp_path):
    import textune

    clf = textune.tune(toy_csv, tmp_path / "t", model=str(tiny_bert), strategy="full",
                       grid={"lr": [1e-6, 1e-3]}, epochs=2, progress=False)
    doc = json.loads((tmp_path / "t" / "tune.json").read_text())
    assert doc["chosen"] == "lr-0.001" and clf.config.train.lr == 1e-3
    assert clf.metrics["accuracy"] == doc["test"]["accuracy"]
    assert clf.predict(["good film", "awful plot"]) == textune.load(tmp_path / "t" / "best") \
        .predict(["good film", "awful plot"])
    with pytest.raises(UserError, match="--seeds"):
        textune.tune(toy_csv, tmp_path / "u", model=str(tiny_bert), grid={"seed": [1, 2]})
    with pytest.raises(UserError, match="not a textune option"):
        textune.tune(toy_csv, tmp_path / "v", model=str(tiny_bert), grid={"colour": ["red"]})
    assert not (tmp_path / "u").exists() and not (tmp_path / "v").exists()


@pytest.mark.parametrize("how", ["script", "stdin"])
def test_tune_from_a_script_without_a_main_guard(how, tiny_bert, toy_csv, tmp_path):
    """A plain script calling textune.tune at its top level (no `if __name__ == "__main__":`),
    or one piped to `python -`: each run's process must not re-run or re-import it (it did:
    every run died, 'no run finished')."""
    import subprocess
    import sys

    code = (f"import textune\n"
            f"clf = textune.tune({str(toy_csv)!r}, {str(tmp_path / 't')!r}, "
            f"model={str(tiny_bert)!r}, strategy='frozen', grid={{'lr': [1e-2, 1e-1]}}, "
            f"epochs=2, progress=False)\n"
            f"print('chosen', clf.config.train.lr)\n")
    script = tmp_path / "quick.py"
    script.write_text(code)
    done = subprocess.run([sys.executable, str(script)] if how == "script" else
                          [sys.executable, "-"], input=None if how == "script" else code,
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("chosen") == 1  # (the script ran once, not once a run)
    rows = json.loads((tmp_path / "t" / "tune.json").read_text())["rows"]
    assert [run["status"] for r in rows for run in r["runs"]] == ["ok", "ok"]


def test_a_failed_combination_is_reported_and_never_chosen(tiny_bert, toy_csv, tmp_path, capsys):
    out = tmp_path / "t"
    code = main(["tune", "--model", str(tiny_bert), "--data", str(toy_csv), "--strategy", "lora",
                 "--grid", "lora-targets=no_such_module;query,value", "--epochs", "1",
                 "--out", str(out), "--quiet"])
    assert code == 0
    doc = json.loads((out / "tune.json").read_text())
    bad, good = doc["rows"]
    assert bad["status"].startswith("failed") and "no_such_module" in bad["status"]
    assert bad["val_macro_f1"] is None and good["status"] == "ok"
    assert doc["chosen"] == good["name"] == "lora-targets-query-value"
    md = (out / "tune.md").read_text()
    assert "| no_such_module | - |" in md and "failed" in md
