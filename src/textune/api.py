"""The jobs behind the CLI: ``train`` (data -> run folder with metrics) and ``evaluate_run``."""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import __version__, cpu, loop
from .classifier import CALIBRATION, Classifier, build_model, load
from .config import RunConfig, launched_rank
from .data import (
    LONG_TEXTS_HINT,
    TAG_JOIN,
    UNKNOWN_WARN,
    Encoded,
    Table,
    build_label_names,
    choose_max_length,
    drop_rare_classes,
    encode,
    limit_indices,
    model_max_length,
    read_table,
    resolve_data,
    save_labels,
    split_indices,
    text_lengths,
    unknown_share,
)
from .env import environment
from .errors import UserError
from .loop import (
    CKPT,
    FeatureData,
    amp_dtype,
    build_accelerator,
    predict_logits,
    resolve_precision,
)
from .metrics import (
    MIN_THRESHOLD_POSITIVES,
    calibration_error,
    classification_metrics,
    fit_temperature,
    fit_thresholds,
    sigmoid,
    softmax,
)
from .modeling import (
    classification_loss,
    count_params,
    load_tokenizer,
    quiet_transformers,
    remote_code,
    resolve_model,
    trust_remote_code,
)
from .strategies import get_strategy

log = logging.getLogger(__name__)


MARKER = ".textune-run"  # written into every folder textune creates: --overwrite may clear it


def is_textune_folder(p: Path) -> bool:
    """A folder textune made (the marker; or, from before it, a run/pretrain layout)."""
    return ((p / MARKER).exists() or (p / "pretrain_args.json").exists()
            or ((p / "config.json").exists() and (p / "labels.json").exists())
            or (p / "compare.json").exists())


def prepare_out_dir(out: str | Path, overwrite: bool) -> Path:
    """Create the run folder; never clobber anything that is not a textune run."""
    if not str(out):
        raise UserError("--out DIR is required: the folder the run is written to")
    p = Path(out)
    if p.exists() and not p.is_dir():
        raise UserError(f"--out {p}: is a file; choose a folder")
    if p.exists() and any(x.name != MARKER for x in p.iterdir()):
        if not overwrite:
            raise UserError(f"--out {p}: folder exists and is not empty; choose a new folder, "
                            f"pass --resume {p} to continue it, or --overwrite to replace it")
        if not is_textune_folder(p):
            raise UserError(f"--out {p}: not a textune run folder, so --overwrite will not "
                            f"delete it; choose another folder")
        shutil.rmtree(p)
    p.mkdir(parents=True, exist_ok=True)
    (p / MARKER).write_text("made by textune; `--overwrite` may delete this folder\n")
    return p


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class Splits:
    train: Table
    val: Table
    test: Table
    labels: list[str]
    split: dict


def load_splits(cfg: RunConfig) -> Splits:
    """Read the data and make train / val / test (stratified, duplicates kept together)."""
    d = cfg.data
    cols = {"text_col": d.text_col, "label_col": d.label_col, "pair_col": d.text_pair_col,
            "multi_label": d.multi_label, "label_sep": d.label_sep}
    main = read_table(resolve_data(d.data), **cols)
    if d.multi_label and d.label_sep is None:
        d.label_sep = main.label_sep  # (val / test files split as the training file)
        cols["label_sep"] = d.label_sep
    dropped = None
    if d.drop_classes_under:
        main, dropped = drop_rare_classes(main, d.drop_classes_under)
    val = read_table(resolve_data(d.val), **cols) if d.val else None
    test = read_table(resolve_data(d.test), **cols) if d.test else None
    tr, va, te = split_indices(main, d.val_fraction, d.test_fraction, cfg.split_seed,
                               need=(val is None, test is None),
                               fold=None if d.folds is None else (d.fold, d.folds))
    n_excluded = None
    if d.exclude_rows:
        drop = excluded_rows(d.exclude_rows, d.data, main)
        n_excluded = sum(main.rows[i] in drop for i in tr)
        tr = [i for i in tr if main.rows[i] not in drop]
        log.info("--exclude-rows: %d of the %d rows listed were in the training split and are "
                 "left out of it", n_excluded, len(drop))
    train = main.subset(tr)
    val = val or main.subset(va)
    test = test or main.subset(te)
    n_full = len(train)
    assert train.labels is not None
    train = train.subset(limit_indices(list(range(len(train))), train.labels, d.limit,
                                       cfg.split_seed))
    labels = build_label_names(train.labels)
    if len(labels) < 2:
        raise UserError(f"{d.data}: the training split has one {'tag' if d.multi_label else 'class'}"
                        f" only; check --label-col or raise --limit")
    if not d.multi_label and main.labels and _looks_multi_label(main.labels):
        log.warning("%s: labels like %r look like several tags a row; each combination is now "
                    "one class. For tags, pass --multi-label", d.data,
                    next(filter(_tag_list, main.labels)))
    split = {"train": len(train), "train_before_limit": n_full, "val": len(val),
             "test": len(test), "source": "files" if (d.val or d.test) else
             f"stratified split of {d.data} (seed {cfg.split_seed})" + (
                 f", test = fold {d.fold} of {d.folds}" if d.folds else "")}
    if n_excluded is not None:
        split["excluded_from_train"] = n_excluded
    if dropped:
        split["classes_dropped"] = dropped
    # (the split made here keeps duplicates together; files given by the user may overlap)
    seen = set(train.keys())
    for name, given, part in (("val", d.val, val), ("test", d.test, test)):
        if not given:
            continue
        n = sum(k in seen for k in part.keys())
        split[f"{name}_in_train"] = n
        if n:
            log.warning("%s: %d of its %d texts (%.0f%%) also occur in the training data: its "
                        "scores overstate how the model does on new text", given, n, len(part),
                        100 * n / len(part))
    return Splits(train, val, test, labels, split)


MIN_HEAD_STEPS = 100
"""A head on cached features trains for at least this many steps unless --epochs says otherwise:
20 epochs of 32 training rows are 20 steps, and left it short (rt-polarity, 16 rows a class:
docs/BENCHMARKS.md)."""


def default_epochs(strategy, rows: int, t) -> int:
    """The strategy's default epochs; for a head on cached features (frozen, contrastive), as
    many more as reach ``MIN_HEAD_STEPS`` optimizer steps on ``rows`` training rows."""
    epochs = strategy.default_epochs
    if strategy.precompute_features and t.max_steps is None:
        per_epoch = -(-rows // max(1, (t.batch_size or t.batch_size_target) * t.grad_accum))
        need = -(-MIN_HEAD_STEPS // per_epoch)
        if need > epochs:
            log.info("%d training rows: the head trains for %d epochs (%d steps; --epochs sets "
                     "it)", rows, need, need * per_epoch)
            epochs = need
    return epochs


def excluded_rows(path: str, data: str, main: Table) -> set[int]:
    """``--exclude-rows``: the ``row`` numbers in ``path``, checked against --data."""
    from .data import _frame

    df = _frame(Path(path))
    if "row" not in df.columns:
        raise UserError(f"--exclude-rows {path}: no `row` column (columns: "
                        f"{', '.join(map(str, df.columns[:8]))}); pass textune cv's "
                        f"label_issues.csv, or a file with the 0-based data rows in `row`")
    try:
        rows = {int(v) for v in df["row"].dropna()}
    except (TypeError, ValueError):
        raise UserError(f"--exclude-rows {path}: its `row` column must hold whole numbers (the "
                        f"0-based data rows of --data)") from None
    known = set(main.rows or ())
    unknown = sorted(r for r in rows if r not in known)
    if unknown:
        raise UserError(f"--exclude-rows {path}: row {unknown[0]} is not a row of --data {data} "
                        f"({len(unknown)} such): was the file made from this data?")
    return rows


def _tag_list(label: str) -> bool:
    """Whether a label reads as several tags: '[...]', 'a|b' or 'a;b'."""
    return (label.startswith("[") and label.endswith("]")) or "|" in label or ";" in label


def _looks_multi_label(labels: list[str]) -> bool:
    """Whether more than a few labels read as tag lists."""
    sample = labels[:2000]
    return sum(map(_tag_list, sample)) > max(2, len(sample) // 50)


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def train(cfg: RunConfig, *, progress: bool = True, resume: bool = False) -> dict:
    """Fine-tune, evaluate on the held-out test split, and write the run folder.

    Returns the metrics written to ``metrics.json``. ``progress=False``: no progress bars,
    transformers' own (loading weights) included.
    """
    import contextlib

    with contextlib.nullcontext() if progress else quiet_transformers(), \
            trust_remote_code(cfg.model.trust_remote_code):
        return _train(cfg, progress=progress, resume=resume)


def _train(cfg: RunConfig, *, progress: bool, resume: bool) -> dict:
    cfg.validate()
    # with several processes the launcher prepared the folder; only rank 0 writes to it
    rank = launched_rank()
    out = Path(cfg.out) if resume or rank else prepare_out_dir(cfg.out, False)
    t0 = time.perf_counter()
    src = resolve_model(cfg.model.model)
    tokenizer = load_tokenizer(src)
    splits = load_splits(cfg)
    pool = teacher_info = None
    if cfg.data.teacher:  # distillation: the teacher labels --unlabelled (teacher.py)
        from .teacher import label_pool

        pool, pool_targets, splits.labels, teacher_info, teacher_right = label_pool(
            cfg, splits, out if rank == 0 else None, progress)
        splits.split["unlabelled"] = len(pool)
    from transformers import AutoConfig

    cap = model_max_length(tokenizer, AutoConfig.from_pretrained(src, **remote_code()))
    lengths = text_lengths(tokenizer, splits.train if pool is None else Table(
        splits.train.texts + pool.texts, None, None if splits.train.pairs is None else
        splits.train.pairs + pool.pairs, "training texts"), seed=cfg.split_seed)
    if cfg.data.max_length is None:
        cfg.data.max_length = choose_max_length(lengths, cap)
        log.info("max length %d tokens (covers ~99%% of the training texts)", cfg.data.max_length)
    elif cfg.data.max_length > cap:
        raise UserError(f"--max-length {cfg.data.max_length}: the model takes at most {cap}")
    longer = float((lengths > cfg.data.max_length).mean())
    if longer > LONG_TEXTS_HINT and cfg.data.truncation != "windows" and splits.train.pairs is None:
        log.info("%.0f%% of the training texts are longer than %d tokens (median %d): only %s "
                 "of each is read; --truncation windows reads all of it", 100 * longer,
                 cfg.data.max_length,
                 int(np.median(lengths)), "the start" if cfg.data.truncation == "head"
                 else "the start and end")
    n_texts = len(splits.train) + len(splits.val) + len(splits.test)
    if n_texts > 50_000:  # (~37 s a million short texts on 2 cores)
        log.info("tokenizing %s texts", f"{n_texts:,}")
    enc = {name: encode(tokenizer, getattr(splits, name), cfg.data.max_length,
                        cfg.data.truncation, splits.labels, cfg.data.max_windows)
           for name in ("train", "val", "test")}
    if pool is not None:
        from .teacher import with_targets

        enc["train"] = with_targets(enc["train"], encode(
            tokenizer, pool, cfg.data.max_length, cfg.data.truncation, None,
            cfg.data.max_windows), pool_targets, len(splits.labels))
    if cfg.data.truncation == "windows":
        log.info("windows of %d tokens: %s", cfg.data.max_length, ", ".join(
            f"{name} {e.n_rows:,} texts -> {len(e):,}" for name, e in enc.items()))
    unk = unknown_share(enc["train"], tokenizer)
    if unk > UNKNOWN_WARN:
        log.warning("%.0f%% of the training tokens are %s to %s: its vocabulary does not cover "
                    "this text (another language or script?), and accuracy will suffer. Pick a "
                    "model made for this text, or pretrain one on it: textune pretrain --init "
                    "scratch", 100 * unk, tokenizer.unk_token, cfg.model.model)

    seed_everything(cfg.train.seed)
    model = build_model(cfg, len(splits.labels), src, for_training=True)
    cfg.model.pooling = model.pooling
    strategy = get_strategy(cfg.strategy.name, **cfg.strategy.options())
    model = strategy.setup(model)
    if cfg.strategy.name == "lora":
        cfg.strategy.lora_targets = strategy.options["targets"]
        cfg.strategy.lora_dropout = strategy.options["dropout"]
    from .modeling import is_decoder

    default = strategy.default_lr
    if strategy.default_lr_decoder and is_decoder(model.backbone.config):
        default = strategy.default_lr_decoder
    lr = cfg.train.lr or default
    if cfg.train.batch_tokens and not cfg.train.lr:
        # token budgets change the rows per step: scale the default learning rate by the square
        # root of the ratio to --batch-size (measured on rt-polarity: 4x rows at 2x lr matched
        # Trainer's accuracy with 32 rows, at the same lr it fell 2.7 points; docs/BENCHMARKS.md)
        lr, rows = batch_tokens_lr(default, enc["train"].lengths, cfg.train)
        log.info("--batch-tokens %d: ~%.0f rows per step; default lr %.2e scaled by "
                 "sqrt(%.0f/%d) to %.2e (--lr sets it)", cfg.train.batch_tokens, rows, default,
                 rows, cfg.train.batch_size, lr)
    cfg.train.lr = lr
    cfg.train.precision = resolve_precision(cfg.train.precision)
    accelerator = build_accelerator(cfg.train.precision)
    device = accelerator.device
    if cfg.train.compile and device.type != "cuda" and os.environ.get("TEXTUNE_CPU_COMPILE") != "1":
        # (measured, docs/BENCHMARKS.md: minilm-l6 on a 2-core AMX CPU, 2.1 compiled steps/s
        # against 6.7 eager, after 24 s of warm-up; TEXTUNE_CPU_COMPILE=1 compiles anyway)
        log.warning("--compile is for GPUs: on a CPU compiled steps measured 3x slower than "
                    "textune's eager ones; training eager")
        cfg.train.compile = False
    trainable, total = count_params(model)
    if cfg.train.batch_size == 0:
        b = auto_batch_size(model, enc["train"], cfg, accelerator, strategy.name)
        target = cfg.train.batch_size_target
        cfg.train.batch_size, cfg.train.grad_accum = b, max(1, -(-target // b))
        log.info("batch size auto: %d rows per step x %d accumulation = %d per optimizer step",
                 b, cfg.train.grad_accum, b * cfg.train.grad_accum)
    plan = memory_plan(model, cfg, accelerator, strategy.name)
    for line in plan.lines():
        log.info(line)
    log.info("%s on %s: %s of %s parameters train; %d train%s / %d val / %d test rows",
             strategy.name, device, f"{trainable:,}", f"{total:,}", len(splits.train),
             "" if pool is None else f" (+ {len(pool):,} labelled by the teacher)",
             len(splits.val), len(splits.test))

    if cfg.train.epochs is None:
        cfg.train.epochs = default_epochs(strategy, len(enc["train"]), cfg.train)
    if accelerator.is_main_process and not resume:
        cfg.model.model = resolve_model_key(cfg.model.model)
        for f in ("data", "val", "test", "unlabelled", "teacher"):  # absolute paths: the run
            # reloads from anywhere
            setattr(cfg.data, f, _data_key(getattr(cfg.data, f)))
        cfg.save(out / "config.json")
        save_labels(splits.labels, out / "labels.json")
        tokenizer.save_pretrained(out / "tokenizer")

    class_weights = None
    multi = cfg.data.multi_label
    y_train = enc["train"].labels
    counts = y_train.sum(0).astype(np.float64) if y_train.ndim == 2 else \
        np.bincount(y_train, minlength=len(splits.labels)).astype(np.float64)
    big, small = int(counts.argmax()), int(counts.argmin())
    if cfg.train.class_weights != "auto" and counts[big] >= 5 * counts[small]:
        log.info("imbalanced %s (%r: %d rows, %r: %d): macro-F1 picks the best epoch; "
                 "--class-weights auto also weighs the loss by inverse frequency",
                 "tags" if multi else "classes", splits.labels[big], counts[big],
                 splits.labels[small], counts[small])
    if cfg.train.class_weights == "auto":
        # multi-label: each tag's positive rows weigh (rows without it / rows with it)
        w = (len(y_train) - counts) / np.maximum(counts, 1) if multi else \
            counts.sum() / (len(counts) * np.maximum(counts, 1))
        class_weights = torch.tensor(w, dtype=torch.float32)
        log.info("%s weights %s", "positive-tag" if multi else "class",
                 np.round(class_weights.numpy(), 3).tolist())

    train_data: Encoded | FeatureData = enc["train"]
    val_data: Encoded | FeatureData = enc["val"]
    feature_seconds = 0.0
    features_cached = 0
    # (contrastive: the backbone trains on pairs first; the other strategies do nothing here)
    pre = strategy.prepare_backbone(model, enc["train"], cfg.train, accelerator, out, progress,
                                    resume)
    if strategy.precompute_features:
        from .featcache import FeatureCache

        tf = time.perf_counter()
        model.to(device)
        # (a backbone tuned in this run has no features stored anywhere)
        cache = None if pre else FeatureCache.for_backbone(
            src, model, device, amp_dtype(accelerator))
        train_data, val_data = (compute_features(model, enc[s], cfg, device, amp_dtype(accelerator),
                                                 progress, cache) for s in ("train", "val"))
        features_cached = train_data.from_cache + val_data.from_cache
        feature_seconds = time.perf_counter() - tf

    best_state: dict[str, torch.Tensor] = {}
    val_logits: dict[str, np.ndarray] = {}  # the last epoch's, and the best epoch's

    def on_best() -> None:  # `model` shares its parameters with whatever loop.fit() wraps it in
        best_state.clear()
        best_state.update({n: p.detach().cpu().clone() for n, p in model.named_parameters()
                           if p.requires_grad})
        if "last" in val_logits:
            val_logits["best"] = val_logits["last"]
        if accelerator.is_main_process:
            strategy.save(model, out)

    def evaluate(logits: np.ndarray) -> dict:
        val_logits["last"] = logits = enc["val"].pool(logits)  # (windows: a text's mean)
        return classification_metrics(enc["val"].row_labels, logits, splits.labels)

    state = loop.fit(model, train_data, val_data, cfg.train, lr=lr, accelerator=accelerator,
                     run_dir=out, evaluate=evaluate, on_best=on_best,
                     class_weights=class_weights, progress=progress, resume=resume,
                     soft_targets=pool is not None and not multi)
    model = accelerator.unwrap_model(model)
    if best_state:
        model.load_state_dict(best_state, strict=False)
        model.to(device)
    elif resume and state.best_epoch > 0:  # best was saved by the interrupted process
        model = strategy.load(_rebuild_for_load(cfg, splits, strategy, out), out).to(device)

    def best_val_logits() -> np.ndarray:
        """The best epoch's validation logits, scored again only for a resumed run (whose best
        epoch was scored by the earlier process)."""
        vl = val_logits.get("best")
        return vl if vl is not None else enc["val"].pool(predict_logits(
            model, enc["val"], cfg.train.eval_batch_size, device, amp_dtype(accelerator)))

    temperature, thresholds = 1.0, None
    if cfg.train.calibration in ("threshold", "per-tag") and len(enc["val"]):
        vl = best_val_logits()
        per_tag = cfg.train.calibration == "per-tag"
        thresholds = fit_thresholds(vl, enc["val"].row_labels, per_tag=per_tag)
        how = (f"each tag's own where it has {MIN_THRESHOLD_POSITIVES}+ positive rows there"
               if per_tag else "one for all tags")
        log.info("decision thresholds chosen on the validation split for the best F1 (%s): %s; "
                 "--calibration none keeps 0.5", how,
                 ", ".join(f"{n} {t:g}" for n, t in zip(splits.labels, thresholds)))
        if accelerator.is_main_process:
            (out / CALIBRATION).write_text(json.dumps(
                {"thresholds": dict(zip(splits.labels, thresholds.tolist())), "method": how,
                 "fitted_on": f"validation split ({len(enc['val'])} rows)"}, indent=2,
                ensure_ascii=False) + "\n")
    if cfg.train.calibration == "temperature" and len(enc["val"]):
        vl = best_val_logits()
        wrong = int((vl.argmax(1) != enc["val"].row_labels).sum())
        if len(vl) < MIN_CALIBRATION_ROWS or wrong == 0:
            # with no mistake to weigh, the likelihood only grows as the temperature falls:
            # the fit would make every probability ~1
            log.info("probabilities not calibrated: the validation split has %d rows and %d "
                     "mistakes (needs %d rows and a mistake)", len(vl), wrong,
                     MIN_CALIBRATION_ROWS)
        else:
            temperature = fit_temperature(vl, enc["val"].row_labels)
            log.info("temperature %.3f fitted on the validation split (probabilities "
                     "calibrated; --calibration none turns it off)", temperature)
        if accelerator.is_main_process and temperature != 1.0:
            (out / CALIBRATION).write_text(json.dumps(
                {"temperature": temperature, "fitted_on": f"validation split "
                 f"({len(enc['val'])} rows)"}, indent=2) + "\n")

    test_data = enc["test"]
    if strategy.precompute_features:  # the test rows' features: from the cache, or stored in it
        test_data = compute_features(model, test_data, cfg, device, amp_dtype(accelerator),
                                     progress, cache)
        features_cached += test_data.from_cache
    test_logits = enc["test"].pool(predict_logits(model, test_data, cfg.train.eval_batch_size,
                                                  device, amp_dtype(accelerator),
                                                  progress=progress, desc="test"))
    y_test = enc["test"].row_labels
    metrics = held_out_metrics(splits.test, y_test, test_logits / temperature,
                               splits.labels, out if accelerator.is_main_process else None,
                               thresholds=thresholds, label_sep=cfg.data.label_sep)
    if teacher_info is not None:
        from .teacher import versus_teacher

        chosen = sigmoid(test_logits) >= (0.5 if thresholds is None else thresholds) \
            if multi else test_logits.argmax(1)
        teacher_info["student_minus_teacher"] = vs = versus_teacher(y_test, chosen,
                                                                    teacher_right)
        log.info("student - teacher on the test split: %+.4f accuracy [%+.4f, %+.4f]",
                 vs["difference"], *vs["ci95"])
    if thresholds is not None:
        at_half = classification_metrics(y_test, test_logits, splits.labels)
        metrics["macro_f1_at_0.5"] = round(at_half["macro_f1"], 4)
        metrics["accuracy_at_0.5"] = round(at_half["accuracy"], 4)
    if temperature != 1.0:
        metrics["temperature"] = round(temperature, 4)
        metrics["ece_before_temperature"] = round(calibration_error(
            y_test, softmax(test_logits.astype(np.float64))), 4)
    train_seconds = state.train_seconds + feature_seconds + (pre["seconds"] if pre else 0.0)
    metrics.update({
        "split": "test",
        "splits": splits.split,
        "model": cfg.model.model,
        "strategy": strategy.describe(),
        "max_length": cfg.data.max_length,
        "truncation": cfg.data.truncation,
        "texts_longer_than_max_length": round(longer, 4),
        **({"windows": {name: len(e) for name, e in enc.items()}}
           if cfg.data.truncation == "windows" else {}),
        "unknown_token_share": round(unk, 4),
        "epochs_run": state.epoch,
        "steps": state.step,
        "best_epoch": state.best_epoch,
        "best_val_macro_f1": state.best_metric if state.best_metric > -1 else None,
        "stopped_early": state.stopped_early,
        "train_seconds": round(train_seconds, 3),
        "feature_seconds": round(feature_seconds, 3),
        "features_from_cache": features_cached,
        **({"contrastive_phase": pre} if pre else {}),
        **({"teacher": teacher_info} if teacher_info else {}),
        "train_samples_per_second": round(state.samples / max(train_seconds, 1e-9), 3),
        "total_seconds": round(time.perf_counter() - t0, 3),
        "trainable_params": trainable,
        "total_params": total,
        "peak_memory_mb": round(_peak_memory_mb(device), 1),
        "device": str(device),
        "precision": accelerator.mixed_precision,
        "processes": accelerator.num_processes,
        "batch_size": cfg.train.batch_size,
        "grad_accum": cfg.train.grad_accum,
        "memory_plan_mb": {k: round(v / 2**20, 1) for k, v in plan.as_dict().items()
                           if isinstance(v, float)},
        "saved_bytes": saved_bytes(out) if accelerator.is_main_process else 0,
        "textune_version": __version__,
        "environment": environment(device),
    })
    if accelerator.is_main_process:
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2, ensure_ascii=False) + "\n")
        shutil.rmtree(out / CKPT, ignore_errors=True)  # finished: the checkpoint is not needed
        _report(out, metrics)
    return metrics


MIN_CALIBRATION_ROWS = 50  # fewer validation rows than this: no temperature is fitted


def held_out_metrics(table: Table, y: np.ndarray, logits: np.ndarray, names: list[str],
                     folder: Path | None, *, thresholds: np.ndarray | None = None,
                     label_sep: str | None = None) -> dict:
    """Metrics of held-out rows with their 95% intervals and calibration error; with
    ``folder``, every row's prediction goes to its predictions.csv (for error analysis, the
    report's mistakes table and `compare`'s paired differences). Multi-label rows (``y`` 0/1
    rows): their tags joined by ``label_sep`` (default ``|``), sigmoid probabilities."""
    from .data import write_frame
    from .report import PREDICTIONS

    metrics = classification_metrics(y, logits, names, uncertainty=True, thresholds=thresholds)
    if folder is not None:
        import pandas as pd

        if np.ndim(y) == 2:
            probs = sigmoid(logits).round(4)
            given = tag_names(y > 0.5, names, label_sep)
            chosen = tag_names(probs >= (0.5 if thresholds is None else thresholds), names,
                               label_sep)
        else:
            probs = softmax(logits.astype(np.float64)).round(4)
            given, chosen = [names[i] for i in y], [names[i] for i in logits.argmax(1)]
        cols = {"text": table.texts, **({"text_pair": table.pairs} if table.pairs else {}),
                "label": given, "predicted": chosen}
        cols.update({f"p_{n}": probs[:, i] for i, n in enumerate(names)})
        write_frame(pd.DataFrame(cols), folder / PREDICTIONS)
    return metrics


def tag_names(chosen: np.ndarray, names: list[str], sep: str | None) -> list[str]:
    """Each row's tags (a 0/1 row of ``names``) as one string, joined by ``sep`` (or
    ``TAG_JOIN``)."""
    sep = sep or TAG_JOIN
    return [sep.join(names[j] for j in np.flatnonzero(row)) for row in chosen]


def _report(folder: Path, metrics: dict) -> None:
    from .report import write_report

    try:
        write_report(folder, metrics)
    except Exception as e:  # a plotting failure must not lose a finished run
        log.warning("report.html not written (%s); rebuild it with `textune report %s`", e, folder)


def memory_plan(model, cfg: RunConfig, accelerator, strategy: str):
    from .plan import estimate

    trainable, total = count_params(model)
    wbytes = next(model.backbone.parameters()).element_size()
    return estimate(model.backbone.config, total, trainable, strategy=strategy,
                    batch_size=cfg.plan_rows(), max_length=cfg.data.max_length or 512,
                    precision=str(accelerator.mixed_precision), device=str(accelerator.device),
                    gradient_checkpointing=cfg.model.gradient_checkpointing,
                    weight_bytes=wbytes, load_in_4bit=cfg.model.load_in_4bit)


def auto_batch_size(model, data: Encoded, cfg: RunConfig, accelerator, strategy: str) -> int:
    """The largest per-step batch (at most the target) that fits: tried on a GPU with the
    longest rows, estimated from the memory plan elsewhere."""
    import copy

    target = cfg.train.batch_size_target
    candidates = [b for b in (target, target // 2, target // 4, target // 8, target // 16,
                              target // 32, 1) if b >= 1]
    candidates = sorted(set(candidates), reverse=True)
    if strategy == "frozen":
        return target  # the head trains on cached features: tiny
    device = accelerator.device
    if device.type != "cuda":
        for b in candidates:
            c = copy.deepcopy(cfg)
            c.train.batch_size = b
            plan = memory_plan(model, c, accelerator, strategy)
            if plan.free is None or plan.total < 0.8 * plan.free:
                return b
        return 1
    from .loop import amp_dtype

    model.to(device).train()
    longest = np.argsort(-data.lengths)
    total_mem = torch.cuda.get_device_properties(device).total_memory
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    optimizer_bytes = 8 * trainable  # AdamW moments, not allocated yet
    for b in candidates:
        try:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            batch = {k: v.to(device) for k, v in data.collate(longest[:b].tolist()).items()}
            labels = batch.pop("labels")
            amp = amp_dtype(accelerator)
            with torch.autocast("cuda", dtype=amp or torch.float32, enabled=amp is not None):
                loss = classification_loss(model(**batch), labels)
            loss.backward()
            model.zero_grad(set_to_none=True)
            peak = torch.cuda.max_memory_allocated(device)
            if peak + optimizer_bytes < 0.9 * total_mem:
                return b
        except torch.cuda.OutOfMemoryError:
            model.zero_grad(set_to_none=True)
        finally:
            torch.cuda.empty_cache()
    raise UserError("--batch-size auto: not even one row of --max-length fits this GPU; lower "
                    "--max-length, add --gradient-checkpointing or --load-in-4bit")


def resolve_model_key(spec: str) -> str:
    """What to write in config.json so the run reloads elsewhere: catalog names and hub ids as
    given, local paths made absolute."""
    from . import hub

    p = Path(spec).expanduser()
    if spec in hub.CATALOG or not p.exists():
        return spec
    return str(p.resolve())


def fit(data, out: str | Path, *, overwrite: bool = False, progress: bool = True,
        **options) -> Classifier:
    """``textune train`` from Python: fine-tune on ``data`` (a file, a catalog name or a pandas
    DataFrame; ``val=``, ``test=``, ``unlabelled=`` alike), write the run folder ``out``, and
    return the trained classifier (its test metrics in ``.metrics``).
    ``options`` are the command's flags with underscores: ``model="minilm-l6"``,
    ``strategy="lora"``, ``epochs=3``, ``batch_size=32``, ``max_length=128``, ``lr=...``, ..."""
    cfg = RunConfig.from_options(data=data, out=out, **options)
    if overwrite:
        prepare_out_dir(cfg.out, True)
    train(cfg, progress=progress)
    return load(cfg.out)


def _rebuild_for_load(cfg, splits, strategy, out):
    saved = strategy.saved_backbone(out)
    return build_model(cfg, len(splits.labels), str(saved) if saved else None)


def batch_tokens_lr(default: float, lengths: np.ndarray, args) -> tuple[float, float]:
    """The learning rate ``--batch-tokens`` without ``--lr`` trains with: ``default`` scaled by
    sqrt(rows per step / --batch-size), the rows per step counted on the first epoch's batches
    of rows this long; and that row count."""
    from .data import batch_indices

    multiple = args.padding_multiple("cuda" if torch.cuda.is_available() else "cpu")
    batches = batch_indices(lengths, len(lengths), args.batch_tokens, shuffle=True,
                            seed=args.seed, max_tokens=args.batch_tokens, multiple=multiple)
    rows = len(lengths) / len(batches)
    return default * math.sqrt(rows / args.batch_size), rows


def saved_bytes(run: Path) -> int:
    """Size on disk of what reloading needs (weights, adapter, head), not of logs."""
    total = 0
    # os.walk, not rglob: with several processes a folder may vanish while it is listed (another
    # rank's checkpoint swap), which rglob raises on; the checkpoint is not counted anyway
    for root, dirs, files in os.walk(run):
        dirs[:] = [d for d in dirs if not d.startswith(CKPT)]
        for f in files:
            if f.endswith((".safetensors", ".bin", ".pt")):
                try:
                    total += os.stat(os.path.join(root, f)).st_size
                except FileNotFoundError:
                    pass
    return total


@torch.inference_mode()
def compute_features(model, data: Encoded, cfg: RunConfig, device, amp, progress,
                     cache=None) -> FeatureData:
    """Backbone features for every row, once: inference mode, length-sorted batches (token
    budgets on a GPU), written into one tensor that stays on the GPU unless it is huge. Rows
    an earlier run stored in ``cache`` (a ``featcache.FeatureCache``) are read, not computed;
    the others are added to it."""
    keep = device if device.type == "cuda" and len(data) * model.hidden_size * 4 < 2**31 \
        else torch.device("cpu")
    if cache is None or not len(data):
        return FeatureData(_backbone_features(model, data, cfg, device, amp, progress, keep),
                           data.labels)
    from .featcache import row_keys

    keys = row_keys(data)
    found, feats = cache.lookup(keys)
    missing = np.flatnonzero(~found)
    if len(missing):
        new = _backbone_features(model, data.select(missing), cfg, device, amp, progress, keep)
        feats[torch.as_tensor(missing)] = new.cpu()
        rank = torch.distributed.get_rank() if torch.distributed.is_available() and \
            torch.distributed.is_initialized() else 0
        if rank == 0:
            _, first = np.unique(keys[missing], axis=0, return_index=True)
            cache.add(keys[missing][first], new[torch.as_tensor(first, device=new.device)])
    if found.any():
        log.info("features: %s of %s rows from the cache of earlier runs, %s computed",
                 f"{int(found.sum()):,}", f"{len(data):,}", f"{len(missing):,}")
    return FeatureData(feats.to(keep), data.labels, from_cache=int(found.sum()))


def _backbone_features(model, data: Encoded, cfg: RunConfig, device, amp, progress,
                       keep: torch.device) -> torch.Tensor:
    from .loop import inference_batches, inference_outputs

    was_training = model.training
    model.eval()
    batches = inference_batches(data, cfg.train.eval_batch_size, device)
    if amp is not None and all(p.dtype == amp for p in model.backbone.parameters()
                               if p.is_floating_point()):
        amp = None  # bf16 weights already: autocast would only add dispatch time per op
    with cpu.autocast_weights(model, device, amp):
        parts = [f.float().to(keep) for _, f in
                 inference_outputs(model.features, data, batches, device, amp, progress,
                                   "features", cfg.train.eval_batch_size)]
    order = torch.as_tensor(np.concatenate(batches), device=keep)
    feats = torch.empty(len(data), model.hidden_size, device=keep)
    feats[order] = torch.cat(parts)
    model.train(was_training)
    return feats


def evaluate_run(run: str | Path, data, out: str | Path | None = None, *,
                 split: str = "auto", text_col=None, label_col=None, pair_col=None,
                 truncation: str | None = None, max_windows: int | None = None,
                 progress: bool = True) -> dict:
    """Metrics of a saved run on labelled data.

    ``split='auto'``: if ``data`` is the run's own training data, only its held-out test split
    (recomputed from the saved seed and fractions) is scored, so training rows never inflate
    the result; any other data is scored in full. ``'test'``, ``'val'``, ``'all'`` force it.
    ``truncation`` / ``max_windows``: read long texts another way than the run was trained
    (``Predictor.read_as``). ``data``: a file, a catalog name or a pandas DataFrame (the one a
    run was fitted on counts as its own data).
    """
    from .config import frames_as_files

    data = frames_as_files({"data": data})["data"]
    if split not in ("auto", "test", "val", "all"):
        raise UserError(f"--split {split}: choose auto, test, val or all")
    if out and Path(out).exists() and any(Path(out).iterdir()):
        raise UserError(f"--out {out}: folder exists and is not empty; choose a new folder")
    clf: Classifier = load(run)
    clf.read_as(truncation, max_windows)
    cfg = clf.config
    same = _data_key(data) == _data_key(cfg.data.data)
    if split in ("test", "val") and not same:
        raise UserError(f"--split {split}: only for the run's own data ({cfg.data.data}); "
                        f"other data is scored in full")
    if same and split != "all":
        part = "val" if split == "val" else "test"
        table = getattr(load_splits(cfg), part)
        split_name = f"{part} split of {data} (as in training)"
    else:
        table = clf.read_labelled(resolve_data(data), text_col, label_col, pair_col)
        split_name = f"all rows of {data}"
    t = time.perf_counter()
    y, logits = clf.scores(table, progress=progress)
    secs = time.perf_counter() - t
    o = prepare_out_dir(out, False) if out else None
    metrics = held_out_metrics(table, y, logits, clf.names, o, thresholds=clf.thresholds,
                               label_sep=cfg.data.label_sep)
    metrics.update({"split": split_name, "run": str(run), "seconds": round(secs, 3),
                    "truncation": cfg.data.truncation,
                    "examples_per_second": round(len(table) / secs, 2),
                    "environment": environment(clf.device)})
    if o:
        (o / "metrics.json").write_text(json.dumps(metrics, indent=2, ensure_ascii=False) + "\n")
        _report(o, metrics)
    return metrics


def _data_key(spec: str | None) -> str | None:
    from . import hub

    if spec is None:
        return None
    if spec in hub.CATALOG:
        return spec
    p = Path(spec).expanduser()
    return str(p.resolve()) if p.exists() else spec


__all__ = ["fit", "train", "evaluate_run", "load", "load_splits", "prepare_out_dir"]
