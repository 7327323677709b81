"""`textune curve`: would more labelled data help? One strategy trained on growing samples of
the training split (--sizes, default doublings up to all of it), every run scored on the same
validation and test rows, with the gain of each step and its paired 95% interval."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

from .config import RunConfig
from .errors import UserError
from .multirun import run_recorded, table_cell

log = logging.getLogger(__name__)

STEPS = 4  # default sizes: all training rows, and halvings of it (down to 1/8)


def parse_sizes(spec: str | None, n_train: int) -> list[int]:
    """``--sizes 250,500,all`` -> sorted distinct row counts, none above ``n_train``; without
    it, ``n_train`` and its halvings (four sizes, none under 32 rows)."""
    if not spec:
        sizes = [max(32, n_train >> k) for k in range(STEPS)]
    else:
        sizes = []
        for s in spec.split(","):
            s = s.strip().lower()
            if not s:
                continue
            if s == "all":
                sizes.append(n_train)
                continue
            try:
                n = int(s)
            except ValueError:
                raise UserError(f"--sizes {spec}: give training row counts separated by commas, "
                                f"e.g. 250,500,1000,all") from None
            if n < 2:
                raise UserError(f"--sizes {spec}: {n} rows cannot train a classifier; give 2 or "
                                f"more")
            if n > n_train:
                log.warning("--sizes: %d is more than the %d training rows; using all of them",
                            n, n_train)
            sizes.append(min(n, n_train))
    sizes = sorted(set(sizes))
    if not sizes:
        raise UserError("--sizes: give at least one row count, e.g. 250,500,1000,all")
    return sizes


def curve(data, out, *, sizes=None, overwrite: bool = False, progress: bool = True,
          processes: int = 1, **options):
    """``textune curve`` from Python: one strategy (``options`` as in ``fit``; ``strategy="full"``
    by default) trained on growing samples of ``data``'s training split (``sizes``: row counts,
    a list or "250,500,all"; default all of it and its halvings), each scored on the same test
    rows. Returns a DataFrame, one row a size: accuracy with its interval, macro-F1, the gain
    over the size before and its paired interval; ``.attrs["verdict"]`` says what the last step
    means for labelling more. Writes curve.md / .json / .png and a run folder a size under
    ``out``."""
    import pandas as pd

    from .api import prepare_out_dir

    if sizes is not None and not isinstance(sizes, str):
        sizes = ",".join(str(n) for n in sizes)
    base = RunConfig.from_options(data=data, out=out, **options).validate()
    check_curve(base)
    rows = run_curve(base, sizes, prepare_out_dir(out, overwrite), progress=progress,
                     processes=processes)
    flat = []
    for r in rows:
        r = dict(r)
        gain = r.pop("gain", None) or {}
        flat.append({**r, "gain": gain.get("difference"), "gain_ci95": gain.get("ci95")})
    table = pd.DataFrame(flat).set_index("rows")
    table.attrs["verdict"] = verdict(rows)
    return table


def check_curve(base: RunConfig) -> None:
    if base.data.limit is not None:
        raise UserError("--limit: curve sets the training rows of each run itself; give them "
                        "with --sizes (e.g. --sizes 250,500,1000)")


def run_curve(base: RunConfig, sizes: str | None, out: Path, *, progress: bool = True,
              processes: int = 1) -> list[dict]:
    """Train ``base`` once per training size on fixed splits; writes curve.md / .json / .png
    after each run. One row per size. (Its callers ran :func:`check_curve` before making
    ``out``.)"""
    from .api import load_splits

    if base.data.split_seed is None:
        base.data.split_seed = base.split_seed  # (every size: the same validation and test)
    probe = copy.deepcopy(base)
    probe.data.limit = None
    n_train = len(load_splits(probe).train)
    rows: list[dict] = []
    for n in parse_sizes(sizes, n_train):
        cfg = copy.deepcopy(base)
        cfg.data.limit = None if n == n_train else n
        cfg.out = str(out / f"rows-{n}")
        log.info("=== %s on %d training rows ===", cfg.strategy.name, n)
        record, _ = run_recorded(cfg, progress, processes, (
            "accuracy", "accuracy_ci95", "macro_f1", "train_seconds", "n_eval"), f"{n} rows")
        rows.append({"rows": n, **record})
        write_outputs(out, rows, base, n_train)
    return rows


def step_gains(rows: list[dict]) -> None:
    """Each size's accuracy gain over the size before it, with a 95% interval from a paired
    bootstrap over the shared test rows (from the runs' predictions.csv): sets ``gain``."""
    import numpy as np

    from .metrics import bootstrap_means, interval
    from .report import read_predictions

    read = [(r, read_predictions(r["run"])) for r in rows if r["status"] == "ok"]
    ok = [r for r, f in read if f is not None]
    frames = [f for _, f in read if f is not None]
    for prev, r, fp, f in zip(ok, ok[1:], frames, frames[1:]):
        if len(f) != len(fp) or not f["text"].equals(fp["text"]):
            continue
        right = np.stack([(x["predicted"] == x["label"]).to_numpy(float) for x in (fp, f)])
        means = bootstrap_means(right)
        r["gain"] = {"from_rows": prev["rows"], "difference": round(float(right[1].mean() -
                                                                         right[0].mean()), 4),
                     "ci95": interval(means[1] - means[0])}


def verdict(rows: list[dict]) -> str:
    """What the last step of the curve says about labelling more data."""
    last = next((r for r in reversed(rows) if r.get("gain")), None)
    if last is None:
        return ""
    g = last["gain"]
    lo, hi = g["ci95"]
    step = f"From {g['from_rows']:,} to {last['rows']:,} training rows, accuracy moved " \
           f"{100 * g['difference']:+.1f} points [95% CI {100 * lo:+.1f}, {100 * hi:+.1f}]"
    if lo > 0:
        return step + ": still rising; more labelled data is likely to help."
    if hi < 0:
        return step + ": it fell, which more data rarely causes; check the runs (seed noise, " \
                      "too few epochs for the larger sets?)."
    return step + ": no gain this test set can tell; the curve has flattened at its " \
                  "resolution (more data may still help a little; a bigger model or another " \
                  "strategy may help more)."


def write_outputs(out: Path, rows: list[dict], base: RunConfig, n_train: int) -> None:
    step_gains(rows)
    (out / "curve.json").write_text(json.dumps(
        {"model": base.model.model, "data": base.data.data, "strategy": base.strategy.name,
         "split_seed": base.split_seed, "training_rows_available": n_train,
         "epochs": base.epochs, "rows": rows}, indent=2) + "\n")
    lines = [f"# textune curve: {base.strategy.name} {base.model.model} on {base.data.data}", "",
             f"The same validation and test rows for every size (split seed {base.split_seed}); "
             f"each size a stratified sample of the {n_train:,} training rows; epochs "
             f"{base.epochs}. Brackets: 95% bootstrap intervals over the test rows; the "
             f"gain pairs each run with the one before it on the same rows.", "",
             "| training rows | accuracy [95% CI] | macro-F1 | gain over the previous size | "
             "train s | status |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append("| " + " | ".join(table_cell(k, r.get(k), r) for k in (
            "rows", "accuracy", "macro_f1", "gain", "train_seconds")) + f" | {r['status']} |")
    v = verdict(rows)
    if v:
        lines += ["", v]
    (out / "curve.md").write_text("\n".join(lines) + "\n")
    plot_curve(out / "curve.png", rows, base)


def plot_curve(path: Path, rows: list[dict], base: RunConfig) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.get("accuracy") is not None]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    if ok:
        x = [r["rows"] for r in ok]
        y = [r["accuracy"] for r in ok]
        err = [[a - (r.get("accuracy_ci95") or [a, a])[0] for a, r in zip(y, ok)],
               [(r.get("accuracy_ci95") or [a, a])[1] - a for a, r in zip(y, ok)]]
        ax.errorbar(x, y, yerr=err, fmt="o-", capsize=3, label="accuracy (95% CI)")
        ax.plot(x, [r["macro_f1"] for r in ok], "s--", alpha=0.7, label="macro-F1")
        ax.set_xscale("log", base=2)
        ax.set_xticks(x, [f"{n:,}" for n in x])
        ax.legend(loc="lower right")
    ax.set(xlabel="training rows", ylabel="test score",
           title=f"learning curve: {base.strategy.name}, {Path(str(base.model.model)).name}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
