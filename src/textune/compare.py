"""`textune compare`: every strategy on the same splits and seed, side by side."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

from .config import RunConfig
from .errors import UserError

log = logging.getLogger(__name__)

COLUMNS = [("strategy", "strategy"), ("accuracy", "accuracy [95% CI]"), ("macro_f1", "macro-F1"),
           ("accuracy_vs_best", "vs best: Δ accuracy [95% CI]"), ("train_seconds", "train s"),
           ("train_samples_per_second", "samples/s"),
           ("peak_memory_mb", "peak MB"), ("trainable_params", "trainable params"),
           ("saved_bytes", "saved size")]

METRICS = [k for k, _ in COLUMNS[1:] if k != "accuracy_vs_best"] + ["accuracy_ci95"]

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


def run_compare(base: RunConfig, strategies: list[str], out: Path, *,
                progress: bool = True) -> list[dict]:
    from .strategies import REGISTRY

    known = [*REGISTRY, *PROMPTS]
    unknown = [s for s in strategies if s not in known]
    if unknown:
        raise UserError(f"--strategies: unknown {unknown}; choose from {', '.join(known)}")
    if not strategies:
        raise UserError("--strategies: give at least one, e.g. frozen,lora,full")
    rows = []
    for name in strategies:
        cfg = copy.deepcopy(base)
        cfg.strategy.name = name
        cfg.out = str(out / name)
        log.info("=== %s ===", name)
        status, m = _train_in_subprocess(cfg, progress)
        if status == "ok":
            rows.append({"strategy": name, "status": "ok", "run": cfg.out,
                         **{k: m.get(k) for k in METRICS}})
        else:  # one failure must not lose the others
            log.error("%s failed: %s", name, status)
            rows.append({"strategy": name, "status": f"failed: {status}", "run": cfg.out})
        write_outputs(out, rows, base)
    return rows


def _train_in_subprocess(cfg: RunConfig, progress: bool) -> tuple[str, dict]:
    """Each strategy runs in its own process: its peak memory is its own, and a crash (even an
    out-of-memory kill) of one strategy is reported instead of ending the comparison."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_worker, args=(cfg.to_dict(), progress, q))
    p.start()
    result = None
    while result is None:
        try:
            result = q.get(timeout=1.0)
        except Exception:  # queue.Empty: still running?
            if not p.is_alive():
                break
    p.join()
    if result is None:
        return f"process died (exit code {p.exitcode}; out of memory?)", {}
    return result


def _worker(cfg_dict: dict, progress: bool, q) -> None:
    from .api import train
    from .cli import setup_logging

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
    from .prompt import PromptArgs, run_prompt

    d = cfg.data
    return run_prompt(PromptArgs(model=cfg.model.model, data=d.data, val=d.val, test=d.test,
                                 text_col=d.text_col, label_col=d.label_col,
                                 shots=PROMPTS[cfg.strategy.name], seed=cfg.train.seed,
                                 out=cfg.out), progress=progress)


def paired_differences(rows: list[dict]) -> None:
    """Each finished row's test accuracy minus the best row's, with a 95% interval from a paired
    bootstrap over the same test rows (their predictions.csv): ``accuracy_vs_best``. Rows
    scored on other rows (a prompt run with --limit) get none."""
    import numpy as np
    import pandas as pd

    from .metrics import bootstrap, interval

    preds = {}
    for r in rows:
        r.pop("accuracy_vs_best", None)
        p = Path(r.get("run", "")) / "predictions.csv"
        if r["status"] == "ok" and p.exists():
            preds[r["strategy"]] = pd.read_csv(p, keep_default_na=False, dtype=str)
    if len(preds) < 2:
        return
    by_name = {r["strategy"]: r for r in rows}
    best = max(preds, key=lambda k: by_name[k]["accuracy"])
    ref = preds[best]
    names = sorted(set(ref["label"]).union(*(set(d["predicted"]) for d in preds.values())))
    code = {n: i for i, n in enumerate(names)}
    y = ref["label"].map(code).to_numpy()
    for name, df in preds.items():
        if name == best:
            by_name[name]["accuracy_vs_best"] = "best"
            continue
        if (len(df) != len(ref) or not np.array_equal(df["text"].to_numpy(), ref["text"].to_numpy())
                or not np.array_equal(df["label"].to_numpy(), ref["label"].to_numpy())):
            continue
        acc, _ = bootstrap(y, [df["predicted"].map(code).to_numpy(),
                               ref["predicted"].map(code).to_numpy()], len(names))
        diff = float((df["predicted"] == df["label"]).mean()
                     - (ref["predicted"] == ref["label"]).mean())
        by_name[name]["accuracy_vs_best"] = {"difference": round(diff, 4),
                                             "ci95": interval(acc[0] - acc[1])}


def write_outputs(out: Path, rows: list[dict], base: RunConfig) -> None:
    paired_differences(rows)
    (out / "compare.json").write_text(json.dumps(
        {"model": base.model.model, "data": base.data.data, "seed": base.train.seed,
         "epochs": base.train.epochs, "max_length": base.data.max_length, "rows": rows},
        indent=2) + "\n")
    head = "| " + " | ".join(h for _, h in COLUMNS) + " | status |"
    lines = [f"# textune compare: {base.model.model} on {base.data.data}", "",
             f"Same splits and seed ({base.train.seed}); epochs {base.train.epochs}; metrics on "
             f"the held-out test split. Each run's folder is beside this file.", "",
             "Brackets: 95% bootstrap intervals over the test rows. `vs best` pairs each run's "
             "predictions with the most accurate run's on the same rows: an interval that "
             "excludes 0 is a difference this test set can tell; one that includes 0 is not.",
             "",
             head, "|" + "---|" * (len(COLUMNS) + 1)]
    for r in rows:
        cells = []
        for k, _ in COLUMNS:
            v = r.get(k)
            if v is None:
                cells.append("-")
            elif k == "saved_bytes":
                cells.append(_human_bytes(v))
            elif k == "accuracy" and r.get("accuracy_ci95"):
                lo, hi = r["accuracy_ci95"]
                cells.append(f"{v:.4f} [{lo:.3f}, {hi:.3f}]")
            elif k in ("accuracy", "macro_f1"):
                cells.append(f"{v:.4f}")
            elif k == "accuracy_vs_best":
                cells.append(v if isinstance(v, str) else
                             f"{100 * v['difference']:+.1f} pts [{100 * v['ci95'][0]:+.1f}, "
                             f"{100 * v['ci95'][1]:+.1f}]")
            elif isinstance(v, float):
                cells.append(f"{v:,.1f}")
            elif isinstance(v, int):
                cells.append(f"{v:,}")
            else:
                cells.append(str(v))
        lines.append("| " + " | ".join(cells) + f" | {r['status']} |")
    (out / "compare.md").write_text("\n".join(lines) + "\n")
    plot_compare(out / "compare.png", rows)


def plot_compare(path: Path, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok"]
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
    failed = [r["strategy"] for r in rows if r["status"] != "ok"]
    title = "accuracy (95% CI) vs training time (point area ~ trainable parameters)"
    ax.set(xlabel="training seconds", ylabel="test accuracy", title=title)
    ax.title.set_fontsize(10)
    if failed:
        ax.text(0.02, 0.02, "failed: " + ", ".join(failed), transform=ax.transAxes, color="red")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
