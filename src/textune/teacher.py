"""Distillation: a finished run (the teacher) labels unlabelled texts, and the run being trained
(the student) learns from its probabilities as well as from the labelled training rows.

    textune train --model minilm-l6 --data labelled.csv --unlabelled pool.csv --teacher RUN

The teacher is any finished ``textune train`` run (a LoRA decoder, a bigger encoder) or a
``textune prompt`` run (a zero-/few-shot LLM, rescored on the pool with its template,
demonstrations and calibration). Each unlabelled text becomes a training row whose target is
the teacher's probabilities (``--teacher-targets soft``, cross-entropy against them) or its
decision (``hard``). Labelled training rows keep their own labels; validation and test rows are
the user's labelled ones, so the student's metrics are real, and the teacher is scored on the
same test rows for the comparison. Pool texts that also occur in the labelled data are left out
of the pool (a test text must stay unseen, and a labelled row's own label beats a guess)."""

from __future__ import annotations

import gc
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch

from .data import Encoded, Table, read_inputs, resolve_data, same_text
from .errors import UserError

log = logging.getLogger(__name__)

TEACHER_LABELS = "teacher_labels.csv"
"""The pool as the teacher labelled it, in the student's run folder (text, label, p_*)."""


class Teacher:
    """A finished run as a teacher: what it predicts (``labels``, ``multi_label``,
    ``thresholds``, ``metrics``) read from its folder; the model itself is loaded only when a
    text has to be scored that the cache does not hold (``proba``)."""

    def __init__(self, path: str):
        run = Path(path)
        if not (run / "config.json").exists() or not (run / "labels.json").exists():
            raise UserError(f"--teacher {path}: not a run folder (no config.json / labels.json);"
                            f" pass the --out folder of a finished `textune train` or "
                            f"`textune prompt`")
        if not (run / "metrics.json").exists():
            raise UserError(f"--teacher {path}: the run has no metrics.json (did it finish?); "
                            f"train it to the end first")
        self.run = run.resolve()
        cfg = json.loads((run / "config.json").read_text(encoding="utf-8"))
        self.prompt = cfg.get("kind") == "prompt"
        data = {} if self.prompt else cfg.get("data", {})
        self.multi_label = bool(data.get("multi_label"))
        self.pairs = bool(data.get("text_pair_col"))
        self.labels = json.loads((run / "labels.json").read_text(encoding="utf-8"))
        self.metrics = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
        self.thresholds = None
        if self.multi_label:
            from .classifier import fitted_calibration

            t = fitted_calibration(run, self.labels)[1]
            self.thresholds = np.full(len(self.labels), 0.5) if t is None else t
        self._model = None
        self.processes = 1
        """How many processes scored the texts (`--num-processes`: each a share of them)."""

    def _classifier(self):
        if self._model is None:
            from .classifier import load
            from .loop import process_state

            # (with several processes, each on its own device: not all on the first GPU)
            state = process_state()
            self._model = load(self.run, device=str(state.device)
                               if state.num_processes > 1 else None)
        return self._model

    def proba(self, texts: list[str], pairs: list[str] | None = None,
              progress: bool = False) -> tuple[np.ndarray, float | None]:
        """The teacher's probabilities for ``texts``, kept in ``$TEXTUNE_HOME/teacher-labels``
        under the teacher run (its folder, and the times of its config and metrics) and the
        texts: a second student of the same teacher and pool (``compare``, ``tune``, another
        strategy) skips the teacher. Returns them and the seconds the teacher took to score
        them (loading it aside), None when they came from the cache."""
        import hashlib

        from . import featcache, hub

        h = hashlib.sha256(json.dumps([str(self.run)] + [(self.run / f).stat().st_mtime_ns
                                                         for f in ("config.json",
                                                                   "metrics.json")]).encode())
        for t, p in zip(texts, pairs or [None] * len(texts)):
            h.update(t.encode() + b"\x00" + (p or "").encode() + b"\x01")
        file = hub.home() / "teacher-labels" / f"{h.hexdigest()[:32]}.npy"
        if featcache.enabled() and file.exists():
            probs = np.load(file)
            if probs.shape == (len(texts), len(self.labels)):
                return probs, None
        probs, seconds, main = self._score(texts, pairs, progress)
        if featcache.enabled() and main:
            file.parent.mkdir(parents=True, exist_ok=True)
            tmp = file.with_name(f"{file.stem}.{os.getpid()}.tmp.npy")
            np.save(tmp, probs)
            os.replace(tmp, file)
        return probs, seconds

    def _score(self, texts: list[str], pairs: list[str] | None,
               progress: bool) -> tuple[np.ndarray, float, bool]:
        """The teacher's probabilities; with several processes (`--num-processes`) each scores
        every n-th text and all of them get the whole. Returns them, the seconds scoring took
        (the slowest process's) and whether this is the main process."""
        from .loop import process_state

        state = process_state()
        clf = self._classifier()
        n, rank = state.num_processes, state.process_index
        self.processes = n
        mine = slice(rank, None, n)
        if n > 1 and rank == 0:
            log.info("the teacher scores %s texts on each of %d processes",
                     f"{len(texts[mine]):,}", n)
        t0 = time.perf_counter()
        probs = clf.predict_proba(texts[mine], pairs[mine] if pairs else None,
                                  progress=progress and state.is_main_process)
        seconds = time.perf_counter() - t0
        if n > 1:
            from accelerate.utils import gather_object

            parts = gather_object([(rank, probs, seconds)])
            probs = np.empty((len(texts), len(self.labels)), dtype=np.float32)
            for r, p, _ in parts:
                probs[r::n] = p
            seconds = max(x for _, _, x in parts)
        return probs, seconds, state.is_main_process

    def trained_on(self) -> set[tuple[str, str | None]] | None:
        """The texts the teacher learned from (a train run's training split, a prompt run's
        demonstrations), as ``same_text`` keys; None where its data can no longer be read."""
        if self.prompt:
            return {same_text(d["text"], None) for d in self.metrics.get("demonstrations", [])}
        from .api import load_splits
        from .config import RunConfig

        quiet = logging.getLogger("textune")
        level = quiet.level
        quiet.setLevel(logging.ERROR)  # (its data's warnings were shown when it trained)
        try:
            train = load_splits(RunConfig.load(self.run / "config.json")).train
        except (UserError, OSError) as e:
            log.debug("the teacher's training data could not be read again: %s", e)
            return None
        finally:
            quiet.setLevel(level)
        return set(train.keys())

    def release(self) -> None:
        """Free the model's memory (before the student is built)."""
        self._model = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def describe(self) -> dict:
        strategy = self.metrics.get("strategy")
        own = self.metrics.get("accuracy")
        return {"run": str(self.run), "model": self.metrics.get("model"),
                "strategy": strategy.get("name") if isinstance(strategy, dict) else strategy,
                "own_test_accuracy": None if own is None else round(own, 4)}


def read_pool(path: str, text_col: str | None, pair_col: str | None) -> Table:
    """The unlabelled texts (any label column in the file is ignored)."""
    _, table, _ = read_inputs(resolve_data(path), text_col=text_col, pair_col=pair_col)
    return table


def leave_out_labelled(pool: Table, *labelled: Table) -> tuple[Table, int]:
    """``pool`` without the texts of the labelled tables (``same_text``: case and white space
    aside); and how many went."""
    seen = {k for tab in labelled for k in tab.keys()}
    keep = [i for i, k in enumerate(pool.keys()) if k not in seen]
    return pool.subset(keep), len(pool) - len(keep)


def targets(teacher, probs: np.ndarray, how: str) -> np.ndarray:
    """The student's float targets for the pool: the teacher's probabilities (``soft``) or its
    decisions as 0/1 rows (``hard``: one class a row, or multi-label the tags at or above the
    teacher's thresholds)."""
    if how == "soft":
        return probs.astype(np.float32)
    if teacher.multi_label:
        return (probs >= teacher.thresholds).astype(np.float32)
    return np.eye(probs.shape[1], dtype=np.float32)[probs.argmax(1)]


def teacher_logits(teacher, probs: np.ndarray) -> np.ndarray:
    """Logits whose softmax (sigmoid, multi-label) gives back ``probs``, for the metrics."""
    p = np.clip(probs.astype(np.float64), 1e-12, 1 - 1e-12)
    return np.log(p / (1 - p)) if teacher.multi_label else np.log(p)


def with_targets(labelled: Encoded, pool: Encoded, pool_targets: np.ndarray,
                 n_labels: int) -> Encoded:
    """The labelled training rows (their labels as 0/1 rows) and the pool's rows with the
    teacher's targets (per window, with ``--truncation windows``), as one training split of
    float targets."""
    y = labelled.labels
    if y.ndim == 1:
        y = np.eye(n_labels, dtype=np.float32)[y]
    per_seq = pool_targets if pool.rows is None else pool_targets[pool.rows]
    return Encoded(labelled.input_ids, labelled.token_type_ids, y.astype(np.float32),
                   labelled.pad_id, labelled.rows).join(
        Encoded(pool.input_ids, pool.token_type_ids, per_seq.astype(np.float32), pool.pad_id,
                pool.rows))


def label_pool(cfg, splits, out: Path | None, progress: bool):
    """Read ``--unlabelled``, let ``--teacher`` label it and the test split; returns the pool
    table, its targets, the label names the student uses (the teacher's) and the run's
    metrics entry (with the teacher's scores on this run's test rows), and per test row whether
    the teacher was right. ``splits.labels`` must be among the teacher's labels."""
    d = cfg.data
    teacher = Teacher(d.teacher)
    names = list(teacher.labels)
    if teacher.multi_label != bool(d.multi_label):
        kind = {True: "multi-label", False: "single-label"}
        raise UserError(f"--teacher {d.teacher}: the teacher is {kind[teacher.multi_label]}, "
                        f"this run {kind[bool(d.multi_label)]}; "
                        f"{'add' if teacher.multi_label else 'drop'} --multi-label")
    unknown = sorted(set(splits.labels) - set(names))
    if unknown:
        raise UserError(f"--teacher {d.teacher}: labels {unknown[:5]} of --data are not the "
                        f"teacher's ({', '.join(names[:10])}); the student learns the teacher's "
                        f"labels, so the labelled data must use them")
    if bool(d.text_pair_col) != teacher.pairs:
        raise UserError(f"--teacher {d.teacher}: the teacher and this run must both read text "
                        f"pairs (--text-pair-col) or both single texts")
    pool = read_pool(d.unlabelled, d.text_col, d.text_pair_col)
    pool, dropped = leave_out_labelled(pool, splits.train, splits.val, splits.test)
    if dropped:
        log.info("--unlabelled: %d of its texts are in the labelled data and were left out "
                 "(their own labels are used, or they are held out)", dropped)
    if not len(pool):
        raise UserError(f"--unlabelled {d.unlabelled}: no text left that is not in the labelled "
                        f"data; pass texts the labelled file does not have")
    log.info("teacher %s labels %s unlabelled texts (and the %d test rows, to compare)",
             d.teacher, f"{len(pool):,}", len(splits.test))
    seen = teacher.trained_on()
    overlap = None if seen is None else sum(k in seen for k in splits.test.keys())
    if overlap:
        log.warning("%d of the %d test texts were in the teacher's training data: the "
                    "teacher's test score overstates it (the student's does not: it never sees "
                    "them). For a fair comparison train the teacher on the same split (same "
                    "--data and --split-seed) or pass a --test file it never saw", overlap,
                    len(splits.test))
    probs, seconds = teacher.proba(pool.texts, pool.pairs, progress=progress)
    cached = seconds is None
    test_probs, _ = teacher.proba(splits.test.texts, splits.test.pairs)
    teacher.release()
    y_test = _test_labels(splits.test, names)
    from .metrics import classification_metrics

    tm = classification_metrics(y_test, teacher_logits(teacher, test_probs), names,
                                uncertainty=True, thresholds=teacher.thresholds)
    chosen = targets(teacher, probs, "hard")
    if out is not None:
        _write_pool(out / TEACHER_LABELS, pool, chosen, probs, names, teacher.multi_label)
    info = {**teacher.describe(), "targets": d.teacher_targets,
            "unlabelled_rows": len(pool), "left_out_as_labelled": dropped,
            "test_rows_teacher_trained_on": overlap,
            "from_cache": cached, **({} if cached else {
                "seconds": round(seconds, 3), "processes": teacher.processes,
                "texts_per_second": round(len(pool) / max(seconds, 1e-9), 1)}),
            "test_accuracy": round(tm["accuracy"], 4), "test_macro_f1": round(tm["macro_f1"], 4),
            "test_accuracy_ci95": tm.get("accuracy_ci95"),
            "pool_label_counts": dict(zip(names, chosen.sum(0).astype(int).tolist()))}
    log.info("teacher on the test split: accuracy %.4f, macro-F1 %.4f; the pool %s",
             tm["accuracy"], tm["macro_f1"], "from the cache of an earlier run" if cached else
             f"at {info['texts_per_second']:.0f} texts/s")
    right = _right(y_test, test_probs >= teacher.thresholds if teacher.multi_label
                   else test_probs.argmax(1))
    pool_targets = targets(teacher, probs, d.teacher_targets)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return pool, pool_targets, names, info, right


def _right(y: np.ndarray, chosen: np.ndarray) -> np.ndarray:
    """Per row: whether the decision is right (multi-label: every tag)."""
    return (chosen == (y > 0.5)).all(1) if np.ndim(y) == 2 else chosen == y


def versus_teacher(y: np.ndarray, chosen: np.ndarray, teacher_right: np.ndarray) -> dict:
    """The student's test accuracy minus the teacher's on the same rows, with a paired 95%
    bootstrap interval."""
    from .metrics import bootstrap_means, interval

    student = _right(y, chosen)
    means = bootstrap_means(np.stack([student, teacher_right]).astype(np.float64))
    return {"difference": round(float(student.mean() - teacher_right.mean()), 4),
            "ci95": interval(means[0] - means[1])}


def _test_labels(test: Table, names: list[str]) -> np.ndarray:
    from .data import encode_labels

    assert test.labels is not None
    return encode_labels(test.labels, names, test.source)


def _write_pool(path: Path, pool: Table, chosen: np.ndarray, probs: np.ndarray,
                names: list[str], multi: bool) -> None:
    import pandas as pd

    from .api import tag_names
    from .data import write_frame

    label = tag_names(chosen > 0.5, names, None) if multi else [names[i] for i in chosen.argmax(1)]
    cols = {"text": pool.texts, **({"text_pair": pool.pairs} if pool.pairs else {}),
            "label": label}
    cols.update({f"p_{n}": probs[:, i].round(4) for i, n in enumerate(names)})
    write_frame(pd.DataFrame(cols), path)
