"""Run reports: PNG plots and a self-contained ``report.html`` (images embedded, opens offline)."""

from __future__ import annotations

import base64
import html
import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def read_history(run: Path) -> tuple[list[dict], list[dict]]:
    steps, epochs = [], []
    p = run / "history.jsonl"
    if p.exists():
        for line in p.read_text().splitlines():
            rec = json.loads(line)
            (epochs if "val_accuracy" in rec else steps).append(rec)
    return steps, epochs


def plot_training(run: Path, steps: list[dict], epochs: list[dict]) -> list[Path]:
    plt = _plt()
    out = []
    if steps:
        fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
        ax[0].plot([s["step"] for s in steps], [s["loss"] for s in steps], color="tab:blue")
        ax[0].set(title="training loss", xlabel="optimizer step", ylabel="cross-entropy")
        ax[1].plot([s["step"] for s in steps], [s["lr"] for s in steps], color="tab:orange")
        ax[1].set(title="learning rate", xlabel="optimizer step")
        ax[1].ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
        fig.tight_layout()
        out.append(_save(fig, run / "loss_lr.png"))
    if epochs:
        fig, ax = plt.subplots(figsize=(5, 3.6))
        e = [r["epoch"] for r in epochs]
        ax.plot(e, [r["val_accuracy"] for r in epochs], "o-", label="accuracy")
        ax.plot(e, [r["val_macro_f1"] for r in epochs], "s--", label="macro-F1")
        ax.set(title="validation per epoch", xlabel="epoch", ylim=(0, 1.02))
        ax.set_xticks(e)
        ax.legend(loc="lower right")
        fig.tight_layout()
        out.append(_save(fig, run / "validation.png"))
    return out


def plot_metrics(folder: Path, metrics: dict, prefix: str = "") -> list[Path]:
    plt = _plt()
    names = metrics["labels"]
    k = len(names)
    out = []
    if "confusion_matrix" in metrics:  # (none for multi-label: a row may have several tags)
        out.append(_confusion_plot(folder / f"{prefix}confusion_matrix.png", metrics))
    f1 = [metrics["per_class"][n]["f1"] for n in names]
    fig, ax = plt.subplots(figsize=(max(4, 0.8 * k + 2), 3.4))
    bars = ax.bar(range(k), f1, color="tab:green")
    ax.bar_label(bars, [f"{v:.2f}" for v in f1], fontsize=8)
    ax.axhline(metrics["macro_f1"], color="gray", ls="--", lw=1, label="macro-F1")
    ax.set_xticks(range(k), names, rotation=30, ha="right")
    ax.set(ylim=(0, 1.08), ylabel="F1", title="per-tag F1" if metrics.get("multi_label")
           else "per-class F1")
    ax.legend(loc="lower right")
    fig.tight_layout()
    out.append(_save(fig, folder / f"{prefix}per_class_f1.png"))
    return out


def _confusion_plot(path: Path, metrics: dict) -> Path:
    import numpy as np

    plt = _plt()
    names = metrics["labels"]
    cm = np.array(metrics["confusion_matrix"])
    k = len(names)
    fig, ax = plt.subplots(figsize=(1.2 + 0.7 * k, 1.0 + 0.6 * k))
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center",
                    color="white" if norm[i, j] > 0.6 else "black", fontsize=9)
    ax.set_xticks(range(k), names, rotation=40, ha="right")
    ax.set_yticks(range(k), names)
    ax.set(xlabel="predicted", ylabel="true", title=f"confusion matrix ({metrics['split']})"
           if len(str(metrics["split"])) < 30 else "confusion matrix")
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'


_CSS = """body{font-family:system-ui,sans-serif;max-width:980px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 10px;
text-align:right}th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}
img{max-width:100%;margin:.5em 0}code{background:#f4f4f4;padding:1px 4px}"""


def _table(rows: list[list], header: list[str]) -> str:
    h = "".join(f"<th>{html.escape(str(x))}</th>" for x in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(x))}</td>" for x in r) + "</tr>"
                   for r in rows)
    return f"<table><tr>{h}</tr>{body}</table>"


def caveats(metrics: dict) -> list[str]:
    """What makes a run's numbers less than they seem, from its metrics.json."""
    from .data import LONG_TEXTS_HINT, UNKNOWN_WARN

    out = []
    unk = metrics.get("unknown_token_share") or 0
    if unk > UNKNOWN_WARN:
        out.append(f"{unk:.0%} of the training tokens were unknown to the tokenizer: the "
                   f"model's vocabulary does not cover this text (another language or script?)")
    longer = metrics.get("texts_longer_than_max_length") or 0
    if longer > LONG_TEXTS_HINT and metrics.get("truncation") != "windows":
        out.append(f"{longer:.0%} of the training texts were longer than --max-length "
                   f"({metrics.get('max_length')} tokens): only "
                   f"{'the start' if metrics.get('truncation') == 'head' else 'part'} of each was "
                   f"read; --truncation windows reads all of each text")
    splits = metrics.get("splits") or {}
    for part in ("test", "val"):
        n = splits.get(f"{part}_in_train")
        if n:
            out.append(f"{n} of the {splits.get(part)} {part} texts also occur in the training "
                       f"data: the scores overstate how the model does on new text")
    dropped = splits.get("classes_dropped")
    if dropped:
        names = ", ".join(f"{y} ({n})" for y, n in list(dropped.items())[:10])
        out.append(f"{len(dropped)} classes with too few texts were left out "
                   f"(--drop-classes-under; rows in brackets): {names}"
                   f"{' and more' if len(dropped) > 10 else ''}. The classifier never predicts "
                   f"them, and the scores do not count their rows")
    seen = (metrics.get("teacher") or {}).get("test_rows_teacher_trained_on")
    if seen:
        out.append(f"{seen} of the {metrics.get('n_eval')} test texts were in the teacher's "
                   f"training data: the teacher's test score, and this run's difference to it, "
                   f"flatter the teacher")
    ci = metrics.get("accuracy_ci95")
    if ci and ci[1] - ci[0] > 2 * WIDE_CI:
        out.append(f"only {metrics['n_eval']} rows were evaluated: accuracy is known to about "
                   f"±{(ci[1] - ci[0]) / 2:.0%} (95% CI {ci[0]:.3f}–{ci[1]:.3f}), so smaller "
                   f"differences between runs are noise; evaluate on more rows (--test FILE)")
    return out


WIDE_CI = 0.05  # a caveat when accuracy's 95% interval is wider than ± this


def _ci(metrics: dict, key: str) -> str:
    ci = metrics.get(f"{key}_ci95")
    return f" (95% CI {ci[0]:.4f}–{ci[1]:.4f})" if ci else ""


MISTAKES_SHOWN = 15
PREDICTIONS = "predictions.csv"
"""Every held-out row of a run or eval folder: text, label, predicted, p_<class>."""


def read_predictions(folder: str | Path):
    """A folder's predictions.csv as a frame of strings (empty cells as ""), or None."""
    import pandas as pd

    p = Path(folder) / PREDICTIONS
    return pd.read_csv(p, keep_default_na=False, dtype=str) if p.exists() else None


def mistakes(folder: Path, multi_label: bool = False) -> list[str]:
    """The report's table of the held-out rows the classifier got wrong, most confident first
    (from the folder's predictions.csv), and how many there are. Multi-label: rows with any
    tag wrong, in file order (no single confidence ranks them)."""
    df = read_predictions(folder)
    if df is None or not {"text", "label", "predicted"} <= set(df.columns):
        return []
    wrong = df[df["label"] != df["predicted"]].copy()
    head = f"<h2>Mistakes ({len(wrong)} of {len(df)} rows)</h2>"
    if wrong.empty:
        return [head, "<p>None.</p>"]
    probs = [] if multi_label else [c for c in df.columns if c.startswith("p_")]
    header = ["text", "label", "predicted"]
    if probs:  # most confident mistakes first: label noise, or what the model learned wrong
        wrong["confidence"] = wrong[probs].astype(float).max(axis=1)
        wrong = wrong.sort_values("confidence", ascending=False, kind="stable")
        header.append("confidence")
    rows = []
    for _, r in wrong.head(MISTAKES_SHOWN).iterrows():
        text = r["text"] if len(r["text"]) <= 300 else r["text"][:297] + "..."
        if r.get("text_pair"):
            text += "  ||  " + r["text_pair"][:150]
        rows.append([text, r["label"], r["predicted"],
                     *([f"{r['confidence']:.3f}"] if probs else [])])
    note = (f"<p>The {min(len(wrong), MISTAKES_SHOWN)} most confident; all rows are in "
            f"<code>predictions.csv</code>. Confident mistakes are often wrong labels.</p>"
            if probs else "<p>All rows are in <code>predictions.csv</code>.</p>")
    return [head, note, _table(rows, header)]


def by_confidence(metrics: dict) -> list[str]:
    """The accuracy-coverage table: how right the model is on the rows it is sure of."""
    rows = metrics.get("by_confidence")
    if not rows:
        return []
    body = [[f"{r['min_confidence']:g}" if r["min_confidence"] else "any",
             f"{r['coverage']:.1%} ({r['rows']:,})",
             "-" if r["accuracy"] is None else f"{r['accuracy']:.4f}"] for r in rows]
    note = ("Accuracy on the rows whose top probability" + (" (after the fitted temperature)"
            if metrics.get("temperature") else "") + " is at least each level, and how many "
            "rows that is. <code>textune predict --min-confidence P</code> labels only those "
            "rows and leaves the rest blank, for a person to decide.")
    return ["<h2>Accuracy by confidence</h2>", f"<p>{note}</p>",
            _table(body, ["top probability at least", "rows kept", "accuracy on them"])]


def write_report(folder: str | Path, metrics: dict | None = None, title: str | None = None) -> Path:
    """Build PNGs and ``report.html`` for a run (train) or an eval folder."""
    folder = Path(folder)
    if metrics is None:
        p = folder / "metrics.json"
        if not p.exists():
            from .errors import UserError

            raise UserError(f"{folder}: no metrics.json; pass a finished run or eval folder")
        metrics = json.loads(p.read_text())
    steps, epochs = read_history(folder)
    images = plot_training(folder, steps, epochs) + plot_metrics(folder, metrics)
    cfg = folder / "config.json"
    multi = bool(metrics.get("multi_label"))
    summary = [["exact-match accuracy (every tag right)" if multi else "accuracy",
                f"{metrics['accuracy']:.4f}{_ci(metrics, 'accuracy')}"],
               ["macro-F1", f"{metrics['macro_f1']:.4f}{_ci(metrics, 'macro_f1')}"],
               *([["micro-F1", f"{metrics['micro_f1']:.4f}"],
                  ["hamming loss (wrong tag decisions)", f"{metrics['hamming_loss']:.4f}"]]
                 if multi else []),
               ["evaluated on", f"{metrics['split']} (n={metrics['n_eval']})"]]
    if "macro_f1_at_0.5" in metrics:
        summary.append(["macro-F1 at thresholds 0.5", f"{metrics['macro_f1_at_0.5']:.4f} "
                        f"(the chosen thresholds give {metrics['macro_f1']:.4f})"])
    if "ece" in metrics:
        before = metrics.get("ece_before_temperature")
        summary.append(["calibration error (ECE)", f"{metrics['ece']:.4f}" + (
            f" (temperature {metrics['temperature']:.2f}; {before:.4f} before it)"
            if before is not None else "")])
    for key, label in (("model", "model"), ("strategy", "strategy"), ("train_seconds", "train s"),
                       ("train_samples_per_second", "samples/s"),
                       ("trainable_params", "trainable params"), ("total_params", "total params"),
                       ("peak_memory_mb", "peak memory MB"), ("best_epoch", "best epoch"),
                       ("device", "device")):
        if key in metrics:
            v = metrics[key]
            summary.append([label, json.dumps(v) if isinstance(v, dict) else
                            (f"{v:,}" if isinstance(v, int) else v)])
    env = metrics.get("environment")
    if env:
        summary.append(["ran on", ", ".join(x for x in (
            env.get("device_name"), env.get("cpu_capability"), "AMX" if env.get("cpu_amx") else
            None, f"{env['threads']} threads" if env.get("threads") else None,
            *(f"{p} {env[p]}" for p in ("torch", "transformers", "peft") if env.get(p))) if x)])
    t = metrics.get("teacher")
    if t:
        vs = t.get("student_minus_teacher") or {}
        summary.append(["distilled from", f"{t['run']} ({t.get('model')}, {t.get('strategy')}): "
                        f"{t['unlabelled_rows']:,} unlabelled texts, {t['targets']} targets; "
                        f"the teacher's test accuracy {t['test_accuracy']:.4f} on these rows"
                        + (f", this run minus the teacher {vs['difference']:+.4f} (95% CI "
                           f"{vs['ci95'][0]:+.4f} to {vs['ci95'][1]:+.4f})" if vs else "")])
    thresholds = metrics.get("thresholds") or []
    per_class = [[n, f"{c['precision']:.3f}", f"{c['recall']:.3f}", f"{c['f1']:.3f}", c["support"],
                  *([f"{thresholds[i]:g}"] if thresholds else [])]
                 for i, (n, c) in enumerate(metrics["per_class"].items())]
    warn = caveats(metrics)
    parts = [f"<h1>{html.escape(title or 'textune report: ' + folder.name)}</h1>",
             *(["<h2>Caveats</h2><ul>" + "".join(f"<li>{html.escape(w)}</li>" for w in warn)
                + "</ul>"] if warn else []),
             _table(summary, ["", "value"]), f"<h2>Per {'tag' if multi else 'class'}</h2>",
             _table(per_class, ["tag" if multi else "class", "precision", "recall", "F1",
                                "support", *(["threshold"] if thresholds else [])]),
             *by_confidence(metrics), *mistakes(folder, multi), "<h2>Plots</h2>",
             *(_img(p) for p in images)]
    if cfg.exists():
        parts += ["<h2>Configuration</h2>", f"<pre>{html.escape(cfg.read_text())}</pre>"]
    doc = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(folder.name)}"
           f"</title><style>{_CSS}</style></head><body>{''.join(parts)}</body></html>")
    out = folder / "report.html"
    out.write_text(doc, encoding="utf-8")
    return out
