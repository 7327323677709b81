"""Several runs, each in a process of its own (compare, curve, cv and tune use it), and
`textune compare`: every strategy on the same splits and seed, side by side. (Not named
compare.py: a submodule of that name would replace the ``textune.compare`` function.)"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import sys
from pathlib import Path

from .config import RunConfig
from .errors import UserError

log = logging.getLogger(__name__)

COLUMNS = [("strategy", "strategy"), ("accuracy", "accuracy [95% CI]"), ("macro_f1", "macro-F1"),
           ("accuracy_vs_best", "vs best: Δ accuracy [95% CI]"), ("train_seconds", "train s"),
           ("train_samples_per_second", "samples/s"),
           ("peak_memory_mb", "peak MB"), ("trainable_params", "trainable params"),
           ("saved_bytes", "saved size")]

METRICS = [k for k, _ in COLUMNS[1:] if k != "accuracy_vs_best"] + ["accuracy_ci95",
                                                                     "features_from_cache"]

# prompting baselines (no training): zero-shot, and 4 demonstrations per class
PROMPTS = {"prompt": 0, "prompt-fewshot": 4}


def _human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def compare(data, out, *, strategies=("frozen", "lora", "full"), seeds: list[int] | None = None,
            overwrite: bool = False, progress: bool = True, processes: int = 1, **options):
    """``textune compare`` from Python: train each strategy on the same splits of ``data`` (a
    file, a catalog name or a DataFrame) and return the table as a pandas DataFrame, one row a
    strategy (accuracy, macro-F1 and their intervals, time, memory, size; the paired
    differences are in ``out``/compare.md). ``options`` as in ``fit``; each run's folder is
    ``out``/STRATEGY (``out``/STRATEGY/seed-N with several ``seeds``)."""
    import pandas as pd

    from .api import prepare_out_dir

    if isinstance(strategies, str):
        strategies = [s.strip() for s in strategies.split(",") if s.strip()]
    base = RunConfig.from_options(data=data, out=out, **options).validate()
    check_strategies(base, list(strategies))  # (before a folder is made)
    rows = run_compare(base, list(strategies), prepare_out_dir(out, overwrite), seeds=seeds,
                       progress=progress, processes=processes)
    return pd.DataFrame(rows).set_index("strategy")


def check_strategies(base: RunConfig, strategies: list[str]) -> None:
    from .strategies import REGISTRY

    known = [*REGISTRY, *PROMPTS]
    unknown = [s for s in strategies if s not in known]
    if unknown:
        raise UserError(f"--strategies: unknown {unknown}; choose from {', '.join(known)}")
    if not strategies:
        raise UserError("--strategies: give at least one, e.g. frozen,lora,full")
    if base.data.multi_label and set(strategies) & set(PROMPTS):
        raise UserError("--strategies: the prompting baselines pick one label a text; with "
                        "--multi-label compare the trained strategies only")


def run_compare(base: RunConfig, strategies: list[str], out: Path, *,
                seeds: list[int] | None = None, progress: bool = True,
                processes: int = 1) -> list[dict]:
    """Train every strategy (once per seed in ``seeds``; default: the config's seed) on the
    same splits; writes compare.md / .json / .png after each run. One row per strategy.
    ``processes``: each training run data-parallel in that many processes. (Its callers ran
    :func:`check_strategies` before making ``out``.)"""
    seeds = list(dict.fromkeys(seeds or [base.train.seed]))
    if len(seeds) > 1 and base.data.split_seed is None:
        base.data.split_seed = seeds[0]  # every seed trains and tests on the same rows
    rows: list[dict] = []
    for name in strategies:
        runs = []
        # zero-shot prompting draws nothing at random: one run stands for every seed
        for seed in seeds[:1] if name == "prompt" else seeds:
            cfg = copy.deepcopy(base)
            cfg.strategy.name = name
            cfg.train.seed = seed
            cfg.out = str(out / name / f"seed-{seed}" if len(seeds) > 1 else out / name)
            log.info("=== %s%s ===", name, f" (seed {seed})" if len(seeds) > 1 else "")
            record, _ = run_recorded(cfg, progress, processes, METRICS, name)
            runs.append({"seed": seed, **record})
            write_outputs(out, [*rows, _row(name, runs, len(seeds) > 1)], base, seeds)
        rows.append(_row(name, runs, len(seeds) > 1))
    return rows


def _row(name: str, runs: list[dict], several: bool) -> dict:
    """A strategy's row: its run's metrics, or with several seeds their mean (accuracy's
    standard deviation over seeds beside it) and each run under ``runs``."""
    if not several:
        return {"strategy": name, **runs[0]}
    ok = [r for r in runs if r["status"] == "ok"]
    failed = [r for r in runs if r["status"] != "ok"]
    row: dict = {"strategy": name, "status": "ok" if not failed else
                 f"{'failed' if not ok else 'partly failed'} (seed {failed[0]['seed']}: "
                 f"{failed[0]['status'].removeprefix('failed: ')})",
                 "seeds": [r["seed"] for r in ok], "runs": runs}
    if ok:
        import numpy as np

        for k in ("accuracy", "macro_f1", "train_seconds", "train_samples_per_second"):
            vals = [r[k] for r in ok if r.get(k) is not None]
            row[k] = float(np.mean(vals)) if vals else None
        row["accuracy_sd"] = float(np.std([r["accuracy"] for r in ok], ddof=1)) \
            if len(ok) > 1 else None
        row["peak_memory_mb"] = max((r.get("peak_memory_mb") or 0) for r in ok)
        row["trainable_params"] = ok[0].get("trainable_params")
        row["saved_bytes"] = ok[0].get("saved_bytes")
    return row


# imported once by the fork server; each run's process starts from it with them loaded
PRELOAD = ["textune.api", "textune.prompting", "transformers.modeling_utils", "peft"]


def _context():
    """Linux: a fork server that imports torch, transformers and peft once (~7 s on 2 cores),
    each run a fresh fork of it (never of this process, so no CUDA state is inherited);
    elsewhere: spawn, a new interpreter per run."""
    import multiprocessing as mp

    if sys.platform.startswith("linux") and "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(PRELOAD)  # (no effect once the server runs)
        return ctx
    return mp.get_context("spawn")


def run_recorded(cfg: RunConfig, progress: bool, processes: int, keys, what: str
                 ) -> tuple[dict, dict]:
    """:func:`train_in_subprocess`, a failure logged as ``what`` (one must not lose the
    others): the run's record (``status``, ``run`` folder and the metrics named by ``keys``,
    as compare, curve, cv and tune tabulate them) and all its metrics."""
    status, m = train_in_subprocess(cfg, progress, processes)
    if status != "ok":
        log.error("%s failed: %s", what, status)
    return {"status": "ok" if status == "ok" else f"failed: {status}", "run": cfg.out,
            **{k: m.get(k) for k in keys}}, m


def train_in_subprocess(cfg: RunConfig, progress: bool, processes: int = 1
                        ) -> tuple[str, dict]:
    """A run in its own process (compare, curve, cv, tune): its peak memory is its own, and a
    crash (even an out-of-memory kill) of one run is reported instead of ending the others.
    ``processes`` > 1: `textune train` launched in that many data-parallel processes."""
    if processes > 1 and cfg.strategy.name not in PROMPTS:
        return _launched(cfg, progress, processes)
    ctx = _context()
    q = ctx.Queue()
    # the fork server kept the environment and folder it started with: pass today's
    p = ctx.Process(target=_worker, args=(cfg.to_dict(), progress, q, dict(os.environ),
                                          os.getcwd()))
    with _without_main_module():
        p.start()
    result = None
    while result is None:
        try:
            result = q.get(timeout=1.0)
        except Exception:  # queue.Empty: still running?
            if not p.is_alive():
                break
    p.join()
    if result is None:  # (killed by a signal: a negative exit code; SIGKILL is the OOM killer's)
        why = "killed: out of memory?" if p.exitcode == -9 else "its error is printed above"
        return f"process died (exit code {p.exitcode}; {why})", {}
    return result


@contextlib.contextmanager
def _without_main_module():
    """Start a run's process without re-importing the caller's ``__main__``, as
    multiprocessing otherwise does in every child: a user's script calling ``textune.tune``
    at its top level (no ``if __name__ == "__main__":``) would run again in each child and
    fail, and ``python -`` (a script on stdin) has no file to re-import. The run needs
    textune's own functions only."""
    from multiprocessing import spawn

    original = spawn.get_preparation_data

    def preparation(name):
        data = original(name)
        data.pop("init_main_from_path", None)
        data.pop("init_main_from_name", None)
        return data

    spawn.get_preparation_data = preparation
    try:
        yield
    finally:
        spawn.get_preparation_data = original


def _launched(cfg: RunConfig, progress: bool, processes: int) -> tuple[str, dict]:
    """The run as `textune train --num-processes N` would start it (accelerate launch), from its
    config in a file; its metrics from its folder."""
    import tempfile

    from .api import prepare_out_dir
    from .cli import run_launched

    fd, file = tempfile.mkstemp(prefix="textune-run-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(cfg.to_dict(), f)
        argv = ["train", "--config-file", file, "--out", cfg.out] + ([] if progress
                                                                      else ["--quiet"])
        try:
            prepare_out_dir(cfg.out, False)
            code = run_launched(argv, processes)
        except UserError as e:
            return str(e), {}
    finally:
        os.unlink(file)
    metrics = Path(cfg.out) / "metrics.json"
    if code == 0 and metrics.exists():
        return "ok", json.loads(metrics.read_text())
    return ("bad input (exit code 2; the message is above)" if code == 2
            else f"processes failed (exit code {code})"), {}


def _worker(cfg_dict: dict, progress: bool, q, environ: dict, cwd: str) -> None:
    from .api import train
    from .cli import setup_logging

    os.environ.clear()
    os.environ.update(environ)
    os.chdir(cwd)
    setup_logging(False)
    try:
        cfg = RunConfig.from_dict(cfg_dict)
        if cfg.strategy.name in PROMPTS:
            q.put(("ok", _prompt(cfg, progress)))
        else:
            q.put(("ok", train(cfg, progress=progress)))
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        q.put((msg if isinstance(e, UserError) else f"{type(e).__name__}: {msg}", {}))


def _prompt(cfg: RunConfig, progress: bool) -> dict:
    """The prompting baseline on the same data, splits (seed) and test rows as the others."""
    from .prompting import PromptArgs, run_prompt

    d = cfg.data
    return run_prompt(PromptArgs(model=cfg.model.model,
                                 trust_remote_code=cfg.model.trust_remote_code,
                                 data=d.data, val=d.val, test=d.test,
                                 text_col=d.text_col, label_col=d.label_col,
                                 shots=PROMPTS[cfg.strategy.name], seed=cfg.train.seed,
                                 split_seed=d.split_seed, val_fraction=d.val_fraction,
                                 test_fraction=d.test_fraction, out=cfg.out), progress=progress)


def paired_differences(rows: list[dict]) -> None:
    """How far each strategy's test accuracy is from the best one's, and how sure: from each
    row's predictions.csv (per test row: right or wrong, averaged over the row's seeds), a
    bootstrap over the test rows, the same resamples for every strategy. Sets
    ``accuracy_vs_best`` (the difference and its 95% interval, or "best") and, for rows of
    several seeds, ``accuracy_ci95``. Rows scored on other rows (a prompt run with --limit)
    get none."""
    import numpy as np

    from .metrics import bootstrap_means, interval
    from .report import read_predictions

    right, ref = {}, None
    for r in rows:
        r.pop("accuracy_vs_best", None)
        frames = [f for x in r.get("runs", [r]) if x["status"] == "ok"
                  and (f := read_predictions(x["run"])) is not None]
        if not frames or r.get("accuracy") is None:
            continue
        ref = frames[0] if ref is None else ref
        if any(len(f) != len(ref) or not f["text"].equals(ref["text"])
               or not f["label"].equals(ref["label"]) for f in frames):
            continue
        right[r["strategy"]] = np.mean([(f["predicted"] == f["label"]).to_numpy(float)
                                        for f in frames], axis=0)
    if not right:
        return
    names = list(right)
    means = bootstrap_means(np.stack([right[n] for n in names]))
    by_name = {r["strategy"]: r for r in rows}
    for n, m in zip(names, means):
        if "runs" in by_name[n]:
            by_name[n]["accuracy_ci95"] = interval(m)
    if len(names) < 2:
        return
    best = max(range(len(names)), key=lambda i: right[names[i]].mean())
    spread = by_name[names[best]].get("accuracy_sd") or 0
    for i, n in enumerate(names):
        if i == best:
            by_name[n]["accuracy_vs_best"] = "best"
            continue
        diff = float(right[n].mean() - right[names[best]].mean())
        by_name[n]["accuracy_vs_best"] = {"difference": round(diff, 4),
                                          "ci95": interval(means[i] - means[best])}
        # the interval counts the test rows' sampling, not the seeds': flag a difference
        # smaller than how much either strategy moves from seed to seed
        if abs(diff) < max(spread, by_name[n].get("accuracy_sd") or 0):
            by_name[n]["accuracy_vs_best"]["within_seed_spread"] = True


def _epochs(base: RunConfig) -> str:
    if base.train.epochs is not None:
        return str(base.train.epochs)
    from .strategies import REGISTRY

    own = [f"{n} {s.default_epochs}" for n, s in REGISTRY.items() if s.default_epochs != 3]
    return "each strategy's default (" + ", ".join(own + ["the others 3"]) + ")"


def table_cell(k: str, v, r: dict) -> str:
    """A markdown table cell: value ``v`` of column ``k`` in row ``r`` (compare, curve, cv)."""
    if v is None:
        return "-"
    if k == "saved_bytes":
        return _human_bytes(v)
    if k == "accuracy" and r.get("accuracy_ci95"):
        lo, hi = r["accuracy_ci95"]
        return f"{v:.4f} [{lo:.3f}, {hi:.3f}]"
    if k in ("accuracy", "macro_f1", "accuracy_sd"):
        return f"{v:.4f}"
    if k in ("accuracy_vs_best", "gain"):  # a paired difference: {difference, ci95}
        return v if isinstance(v, str) else (f"{100 * v['difference']:+.1f} pts "
                                             f"[{100 * v['ci95'][0]:+.1f}, {100 * v['ci95'][1]:+.1f}]"
                                             + (" †" if v.get("within_seed_spread") else ""))
    if isinstance(v, float):
        return f"{v:,.1f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def write_outputs(out: Path, rows: list[dict], base: RunConfig,
                  seeds: list[int] | None = None) -> None:
    seeds = seeds or [base.train.seed]
    several = len(seeds) > 1
    paired_differences(rows)
    (out / "compare.json").write_text(json.dumps(
        {"model": base.model.model, "data": base.data.data, "seed": base.train.seed,
         "seeds": seeds, "split_seed": base.split_seed, "epochs": base.train.epochs or "strategy default",
         "max_length": base.data.max_length, "rows": rows}, indent=2) + "\n")
    columns = COLUMNS[:3] + [("accuracy_sd", "sd over seeds")] + COLUMNS[3:] if several \
        else COLUMNS
    if several:
        intro = (f"Same splits (split seed {base.split_seed}); each strategy trained with seeds "
                 f"{', '.join(map(str, seeds))}; accuracy, macro-F1 and times are means over "
                 f"them (each run below the table); epochs {_epochs(base)}; metrics on the "
                 f"held-out test split.")
    else:
        intro = (f"Same splits and seed ({base.train.seed}); epochs {_epochs(base)}; metrics "
                 f"on the held-out test split. Each run's folder is beside this file.")
    lines = [f"# textune compare: {base.model.model} on {base.data.data}", "", intro, "",
             "Brackets: 95% bootstrap intervals over the test rows. `vs best` pairs each "
             "strategy's predictions with the most accurate one's on the same rows: an interval "
             "that excludes 0 is a difference this test set can tell; one that includes 0 is "
             "not." + (" `sd over seeds` is how much training itself varies; the intervals "
                       "count the test rows' sampling only, so a difference marked † (smaller "
                       "than either strategy's sd over seeds) needs more seeds to be sure."
                       if several else ""),
             *(["", "Multi-label: accuracy is exact match (every tag of a row right); "
                "macro-F1 averages the tags' F1."] if base.data.multi_label else []),
             *(["", "Each strategy ran at its default learning rate; `textune tune --strategy "
                "S` chooses one on the validation split."] if base.train.lr is None else []),
             "", "| " + " | ".join(h for _, h in columns) + " | status |",
             "|" + "---|" * (len(columns) + 1)]
    for r in rows:
        lines.append("| " + " | ".join(table_cell(k, r.get(k), r) for k, _ in columns)
                     + f" | {r['status']} |")
    if several:
        lines += ["", "| strategy | seed | accuracy | macro-F1 | train s | run | status |",
                  "|---|---|---|---|---|---|---|"]
        for r in rows:
            for x in r.get("runs", []):
                lines.append(f"| {r['strategy']} | {x['seed']} | "
                             + " | ".join(table_cell(k, x.get(k), {}) for k in
                                          ("accuracy", "macro_f1", "train_seconds"))
                             + f" | {Path(x['run']).relative_to(out)} | {x['status']} |")
    cached = sorted({r["strategy"] for r in rows for x in r.get("runs", [r])
                     if x.get("features_from_cache")})
    if cached:
        lines += ["", f"{', '.join(cached)}: backbone features of some rows were read from the "
                  "cache of earlier runs, so `train s` leaves out computing them "
                  "(TEXTUNE_FEATURE_CACHE=0 times them whole)."]
    (out / "compare.md").write_text("\n".join(lines) + "\n")
    plot_compare(out / "compare.png", rows)


def plot_compare(path: Path, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.get("accuracy") is not None]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    if ok:
        biggest = max(max(r.get("trainable_params") or 1 for r in ok), 1)
        for i, r in enumerate(sorted(ok, key=lambda r: r["accuracy"])):
            size = 60 + 1400 * ((r.get("trainable_params") or 1) / biggest) ** 0.5
            ax.scatter(r["train_seconds"], r["accuracy"], s=size, alpha=0.55)
            if r.get("accuracy_ci95"):
                lo, hi = r["accuracy_ci95"]
                ax.errorbar(r["train_seconds"], r["accuracy"], fmt="none", ecolor="0.35",
                            yerr=[[r["accuracy"] - lo], [hi - r["accuracy"]]], capsize=3)
            ax.annotate(f"{r['strategy']} ({r.get('trainable_params', 0):,} params)",
                        (r["train_seconds"], r["accuracy"]), textcoords="offset points",
                        xytext=(10, -14 if i % 2 else 10), fontsize=8)
        xs = [r["train_seconds"] for r in ok]
        ys = [r["accuracy"] for r in ok]
        ax.set_xlim(0, max(xs) * 1.35 + 1)
        lows = [(r.get("accuracy_ci95") or [r["accuracy"]])[0] for r in ok]
        highs = [(r.get("accuracy_ci95") or [0, r["accuracy"]])[1] for r in ok]
        ax.set_ylim(max(0, min(lows) - 0.05), min(1.0, max(highs + ys) + 0.03))
    failed = [r["strategy"] for r in rows if r.get("accuracy") is None]
    title = "accuracy (95% CI) vs training time (point area ~ trainable parameters)"
    ax.set(xlabel="training seconds", ylabel="test accuracy", title=title)
    ax.title.set_fontsize(10)
    if failed:
        ax.text(0.02, 0.02, "failed: " + ", ".join(failed), transform=ax.transAxes, color="red")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
