"""`textune tune`: choose hyperparameters on the validation split, never on the test split.

One run per combination of ``--grid`` values (default: the learning rate at a third of, at,
and at three times the strategy's default), every run on the same splits. The combination
with the best validation macro-F1 (the mean over ``--seeds``) is chosen, and only its test
metrics are the result: choosing among K runs by their test scores would report the luckiest
of K draws as if it were one."""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import logging
import math
import re
from pathlib import Path

from .config import RunConfig
from .errors import UserError
from .multirun import run_recorded, table_cell

log = logging.getLogger(__name__)

# flags a grid may not vary, and where to go instead
NOT_IN_GRID = {
    **dict.fromkeys(["data", "val", "test", "text_col", "label_col", "text_pair_col",
                     "multi_label", "label_sep", "val_fraction", "test_fraction", "split_seed"],
                    "it changes the data or the splits, and the runs must share them"),
    "limit": "to see what more training rows give, use textune curve",
    "seed": "give --seeds 0,1,2 to average each combination over seeds",
    "strategy": "to set strategies side by side, use textune compare",
    "out": "--out is the folder of all the runs",
    **dict.fromkeys(["overwrite", "debug", "quiet", "grid", "seeds", "save_every",
                     "log_every"], "it does not change the training"),
}
TRUE, FALSE = {"on", "true", "yes", "1"}, {"off", "false", "no", "0"}


def parse_grid(specs: list[str], parser: argparse.ArgumentParser) -> list[tuple[str, str, list]]:
    """``--grid lr=1e-4,5e-4 --grid head=linear,mlp`` -> [(flag, dest, [(text, value), ...])],
    each value converted and checked by the flag's own argparse action (so a grid accepts
    what the flag accepts). Values are separated by commas, or by ``;`` when a value holds
    commas (``lora-targets=query,value;query,key,value``)."""
    grid, seen = [], set()
    for spec in specs:
        name, eq, values = spec.partition("=")
        flag = "--" + name.strip().lstrip("-").replace("_", "-")
        action = parser._option_string_actions.get(flag)
        if not eq or not values.strip():
            raise UserError(f"--grid {spec}: give a train flag and its values, e.g. --grid "
                            f"lr=1e-4,5e-4,1e-3")
        if action is None or action.dest in NOT_IN_GRID:
            why = NOT_IN_GRID.get(action.dest if action else "", "")
            raise UserError(f"--grid {spec}: {flag} cannot be tuned"
                            + (f": {why}" if why else "; give a train flag, e.g. lr, epochs, "
                               "batch-size, head, head-dropout, weight-decay, lora-r, "
                               "adapter-reduction"))
        if action.dest in seen:
            raise UserError(f"--grid {spec}: {flag} is in the grid twice; give its values in "
                            f"one --grid")
        seen.add(action.dest)
        texts = [v.strip() for v in values.split(";" if ";" in values else ",") if v.strip()]
        converted = []
        for t in dict.fromkeys(texts):
            if action.nargs == 0:  # a switch (--compile): on or off
                if t.lower() not in TRUE | FALSE:
                    raise UserError(f"--grid {spec}: {flag} is a switch; give on,off")
                converted.append((t.lower(), t.lower() in TRUE))
                continue
            try:
                v = action.type(t) if action.type else t
            except (ValueError, argparse.ArgumentTypeError) as e:
                raise UserError(f"--grid {spec}: {t!r} is not a value of {flag} ({e})") from None
            if action.choices and v not in action.choices:
                raise UserError(f"--grid {spec}: {t!r} is not a value of {flag}; choose from "
                                f"{', '.join(map(str, action.choices))}")
            converted.append((t, v))
        grid.append((flag, action.dest, converted))
    return grid


def default_lr_grid(base: RunConfig) -> list[tuple[str, str, list]]:
    """The learning rate at 1/3, 1 and 3 times ``--lr``, or the strategy's default (its decoder
    default for a causal LM): the hyperparameter that matters most, and that defaults miss most."""
    from .modeling import trust_remote_code

    with trust_remote_code(base.model.trust_remote_code):  # (the model's config, tokenizer)
        return _default_lr_grid(base)


def _default_lr_grid(base: RunConfig) -> list[tuple[str, str, list]]:
    from .strategies import get_strategy

    strategy = get_strategy(base.strategy.name)
    default = base.train.lr or strategy.default_lr
    if strategy.default_lr_decoder and not base.train.lr:
        from transformers import AutoConfig

        from .modeling import is_decoder, remote_code, resolve_model

        if is_decoder(AutoConfig.from_pretrained(resolve_model(base.model.model),
                                                 **remote_code())):
            default = strategy.default_lr_decoder
    if base.train.batch_tokens and not base.train.lr:
        default = _batch_tokens_default(base, default)
    values = [float(f"{default * k:.2g}") for k in (1 / 3, 1, 3)]
    return [("--lr", "lr", [(f"{v:g}", v) for v in values])]


def _batch_tokens_default(base: RunConfig, default: float) -> float:
    """``--batch-tokens`` without ``--lr``: train scales the default learning rate to the rows
    its token budgets hold (api.batch_tokens_lr); the grid is centred there too, the rows
    counted on (up to) 2,000 training texts' lengths."""
    import numpy as np
    from transformers import AutoConfig

    from .api import batch_tokens_lr, load_splits
    from .data import choose_max_length, model_max_length, text_lengths
    from .modeling import load_tokenizer, remote_code, resolve_model

    src = resolve_model(base.model.model)
    tokenizer = load_tokenizer(src)
    cfg = copy.deepcopy(base)
    if cfg.data.split_seed is None:
        cfg.data.split_seed = cfg.split_seed
    train = load_splits(cfg).train
    lengths = text_lengths(tokenizer, train, seed=cfg.split_seed)
    cap = model_max_length(tokenizer, AutoConfig.from_pretrained(src, **remote_code()))
    width = cfg.data.max_length or choose_max_length(lengths, cap)
    lr, rows = batch_tokens_lr(default, np.minimum(lengths, width), cfg.train)
    log.info("--batch-tokens %d: ~%.0f rows per step, so train's default learning rate is "
             "%.2e (sqrt(%.0f/%d) x %.2e): the grid is centred there", cfg.train.batch_tokens,
             rows, lr, rows, cfg.train.batch_size, default)
    return lr


def combinations(base: RunConfig, grid: list[tuple[str, str, list]], apply) -> list[dict]:
    """Every combination of the grid's values: its settings (flag -> text), a folder name, and
    its RunConfig (``apply(dest_values)`` builds one from the base flags), validated."""
    out = []
    for combo in itertools.product(*[vals for _, _, vals in grid]):
        settings = {flag.removeprefix("--"): text for (flag, _, _), (text, _) in zip(grid, combo)}
        # a bad combination is an error now, before any folder is made or run trained
        cfg = apply({dest: v for (_, dest, _), (_, v) in zip(grid, combo)}).validate()
        name = "_".join(f"{k}-{v}" for k, v in settings.items())
        out.append({"settings": settings, "name": re.sub(r"[^A-Za-z0-9.+_-]", "-", name),
                    "values": {flag.removeprefix("--"): v for (flag, _, _), (_, v) in
                               zip(grid, combo)}, "config": cfg})
    return out


def tune(data, out, *, grid: dict[str, list] | None = None, seeds: list[int] | None = None,
         overwrite: bool = False, progress: bool = True, processes: int = 1, **options):
    """``textune tune`` from Python: train every combination of ``grid``'s values (option names
    as in ``fit``: ``{"lr": [1e-4, 5e-4], "head": ["linear", "mlp"]}``; default: the learning
    rate at 1/3, 1 and 3 times its default) on the same splits, choose on the validation
    split, and return the chosen run's classifier (its test metrics in ``.metrics``; the table
    in ``out``/tune.md). ``processes``: each run data-parallel in that many processes."""
    from .api import prepare_out_dir
    from .classifier import load
    from .config import frames_as_files

    options = frames_as_files({"data": data, **options})  # (once, not once a combination)
    data = options.pop("data")
    base = RunConfig.from_options(data=data, out=out, **options).validate()
    if grid:
        for name in grid:
            if name in NOT_IN_GRID:
                raise UserError(f"grid: {name} cannot be tuned: {NOT_IN_GRID[name]}")
        specs = [(f"--{n.replace('_', '-')}", n, [(str(v), v) for v in dict.fromkeys(vals)])
                 for n, vals in grid.items()]
    else:
        specs = default_lr_grid(base)
    combos = combinations(base, specs, lambda values: RunConfig.from_options(
        data=data, out=out, **{**options, **values}))
    root = prepare_out_dir(out, overwrite)
    summary = run_tune(base, combos, root, seeds=seeds, progress=progress, processes=processes)
    if "chosen" not in summary:
        raise RuntimeError(f"tune: no run finished; see {root / 'tune.md'}")
    return load(summary["chosen_run"])


def run_tune(base: RunConfig, combos: list[dict], out: Path, *, seeds: list[int] | None = None,
             progress: bool = True, processes: int = 1) -> dict:
    """Train every combination (once per seed) on the same splits; choose on validation;
    writes tune.md / .json / .png after each run and links ``out``/best to the chosen run."""
    from .api import load_splits

    seeds = list(dict.fromkeys(seeds or [base.train.seed]))
    if base.data.split_seed is None:
        base.data.split_seed = base.split_seed  # every combination and seed: the same rows
    for c in combos:
        c["config"].data.split_seed = base.data.split_seed
    n_val = len(load_splits(copy.deepcopy(base).validate()).val)
    rows = []
    total = len(combos) * len(seeds)
    for c in combos:
        runs = []
        for seed in seeds:
            cfg = copy.deepcopy(c["config"])
            cfg.train.seed = seed
            cfg.out = str(out / c["name"] / f"seed-{seed}" if len(seeds) > 1 else out / c["name"])
            done = len(rows) * len(seeds) + len(runs)
            log.info("=== run %d of %d: %s%s ===", done + 1, total,
                     " ".join(f"{k}={v}" for k, v in c["settings"].items()),
                     f" (seed {seed})" if len(seeds) > 1 else "")
            record, _ = run_recorded(cfg, progress, processes, (
                "best_val_macro_f1", "best_epoch", "epochs_run", "stopped_early", "accuracy",
                "accuracy_ci95", "macro_f1", "train_seconds"), c["name"])
            runs.append({"seed": seed, **record})
        rows.append(_row(c, runs))
        summary = choose(rows, n_val)
        write_outputs(out, summary, base, seeds)
    return summary


def _row(c: dict, runs: list[dict]) -> dict:
    import numpy as np

    ok = [r for r in runs if r["status"] == "ok" and r.get("best_val_macro_f1") is not None]
    vals = [r["best_val_macro_f1"] for r in ok]
    failed = [r for r in runs if r["status"] != "ok"]
    return {"settings": c["settings"], "values": c["values"], "name": c["name"], "runs": runs,
            "val_macro_f1": float(np.mean(vals)) if vals else None,
            "val_macro_f1_sd": float(np.std(vals, ddof=1)) if len(vals) > 1 else None,
            "train_seconds": float(np.mean([r["train_seconds"] for r in ok])) if ok else None,
            "status": "ok" if not failed else f"{'failed' if not ok else 'partly failed'}: "
                      f"{failed[0]['status'].removeprefix('failed: ')}"}


def choose(rows: list[dict], n_val: int) -> dict:
    """The combination with the best mean validation macro-F1 (ties: the first in grid order)
    and, of its seeds, the run with the best validation score: its test metrics are the
    result. ``noise``: half the width of a 95% interval of a proportion near the best score
    on ``n_val`` rows; differences smaller than it may be chance."""
    scored = [r for r in rows if r["val_macro_f1"] is not None]
    summary: dict = {"rows": rows, "n_val": n_val}
    if not scored:
        return summary
    best = max(scored, key=lambda r: r["val_macro_f1"])  # max keeps the first of equal ones
    run = max((x for x in best["runs"] if x.get("best_val_macro_f1") is not None),
              key=lambda x: x["best_val_macro_f1"])
    p = min(max(best["val_macro_f1"], 0.0), 1.0)
    noise = round(1.96 * math.sqrt(max(p * (1 - p), 1e-4) / max(n_val, 1)), 4)
    summary.update({"chosen": best["name"], "chosen_settings": best["settings"],
                    "chosen_run": run["run"], "noise": noise,
                    "test": {k: run.get(k) for k in ("accuracy", "accuracy_ci95", "macro_f1")},
                    "hints": hints(scored, best, run, noise)})
    for r in rows:
        r["chosen"] = r is best
    return summary


def hints(rows: list[dict], best: dict, run: dict, noise: float) -> list[str]:
    """What the scores say about the grid: all within ``noise`` of each other (the choice hardly
    matters); or signs it did not reach the best setting: the chosen value of a numeric flag is
    the smallest or largest of 3+ tried, the chosen run was best at its last epoch."""
    out = []
    spread = best["val_macro_f1"] - min(r["val_macro_f1"] for r in rows)
    if len(rows) > 1 and spread < noise:
        out.append(f"Every combination scored within {100 * spread:.1f} points of the chosen "
                   f"one, less than the validation split can tell: these settings hardly "
                   f"matter here, and any of them will do about as well.")
    for flag, v in best["values"].items() if spread >= noise else ():
        tried = sorted({r["values"][flag] for r in rows})
        if len(tried) < 3 or not all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                     for x in tried):
            continue
        if v in (tried[0], tried[-1]):
            edge = "smallest" if v == tried[0] else "largest"
            out.append(f"{flag}={best['settings'][flag]} is the {edge} value tried: a "
                       f"{'smaller' if edge == 'smallest' else 'larger'} one may be better "
                       f"still; extend the grid that way.")
    if run.get("best_epoch") and run["best_epoch"] == run.get("epochs_run") \
            and not run.get("stopped_early"):
        out.append(f"The chosen run was best at its last epoch ({run['best_epoch']}): more "
                   f"--epochs may help (put epochs in the grid, e.g. --grid "
                   f"epochs={run['best_epoch']},{2 * run['best_epoch']}).")
    return out


def write_outputs(out: Path, summary: dict, base: RunConfig, seeds: list[int]) -> None:
    rows, several = summary["rows"], len(seeds) > 1
    (out / "tune.json").write_text(json.dumps(
        {"model": base.model.model, "data": base.data.data, "strategy": base.strategy.name,
         "split_seed": base.split_seed, "seeds": seeds, "selected_by": "validation macro-F1",
         **summary}, indent=2, default=str) + "\n")
    flags = list(rows[0]["settings"]) if rows else []
    lines = [f"# textune tune: {base.strategy.name} {base.model.model} on {base.data.data}", "",
             f"Every combination trained on the same splits (split seed {base.split_seed}"
             + (f"; seeds {', '.join(map(str, seeds))}, validation scores averaged over them"
                if several else f"; seed {seeds[0]}") + "). Chosen by validation macro-F1 "
             f"(best epoch, {summary['n_val']:,} validation rows); the test split was not "
             "looked at to choose.", "",
             "| " + " | ".join(flags) + " | validation macro-F1 "
             + ("| sd over seeds " if several else "") + "| best epoch | train s | status |",
             "|" + "---|" * (len(flags) + (5 if several else 4))]
    for r in rows:
        cells = [r["settings"][f] for f in flags]
        val = table_cell("macro_f1", r["val_macro_f1"], r)
        cells.append(f"**{val}** (chosen)" if r.get("chosen") else val)
        if several:
            cells.append(table_cell("accuracy_sd", r["val_macro_f1_sd"], r))
        epochs = [str(x["best_epoch"]) for x in r["runs"] if x.get("best_epoch")]
        cells += ["/".join(epochs) or "-", table_cell("train_seconds", r["train_seconds"], r),
                  r["status"]]
        lines.append("| " + " | ".join(cells) + " |")
    if "chosen" in summary:
        t = summary["test"]
        lines += ["", f"Chosen: {' '.join(f'{k}={v}' for k, v in summary['chosen_settings'].items())}"
                  f" (run `{Path(summary['chosen_run']).relative_to(out)}`, linked as `best`). "
                  f"Test: accuracy {table_cell('accuracy', t['accuracy'], t)}, macro-F1 "
                  f"{table_cell('macro_f1', t['macro_f1'], t)}.", "",
                  f"Validation differences under about {100 * summary['noise']:.1f} points (the "
                  f"half-width of a 95% interval at this score on {summary['n_val']:,} rows) may "
                  f"be chance: between such combinations, prefer the cheaper one, or add seeds "
                  f"(--seeds 0,1,2) or validation rows. Each run's folder has its own test "
                  f"metrics; choosing by them would overstate the accuracy to expect.",
                  *[f"\n{h}" for h in summary["hints"]]]
    (out / "tune.md").write_text("\n".join(lines) + "\n")
    link_best(out, summary.get("chosen_run"))
    plot_tune(out / "tune.png", rows, base)


def link_best(out: Path, run: str | None) -> None:
    """``out``/best -> the chosen run (a relative symlink; best.txt where links are refused)."""
    best = out / "best"
    if best.is_symlink() or best.exists():
        best.unlink()
    if run is None:
        return
    try:
        best.symlink_to(Path(run).relative_to(out), target_is_directory=True)
    except OSError:
        (out / "best.txt").write_text(str(run) + "\n")


def plot_tune(path: Path, rows: list[dict], base: RunConfig) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 0.9 + 0.42 * max(len(rows), 2)))
    labels = [" ".join(f"{k}={v}" for k, v in r["settings"].items()) for r in rows]
    vals = [r["val_macro_f1"] or 0 for r in rows]
    err = [r["val_macro_f1_sd"] or 0 for r in rows]
    colors = ["tab:green" if r.get("chosen") else "tab:blue" for r in rows]
    ax.barh(range(len(rows)), vals, xerr=err if any(err) else None, color=colors, alpha=0.75,
            capsize=3)
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.invert_yaxis()
    scored = [v for v, r in zip(vals, rows) if r["val_macro_f1"] is not None]
    if scored:
        ax.set_xlim(max(0, min(scored) - 0.05), min(1, max(scored) + 0.03))
    ax.set(xlabel="validation macro-F1 (chosen: green)",
           title=f"tune: {base.strategy.name}, {Path(str(base.model.model)).name}")
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
