"""A trained run, reloaded: ``textune.load(RUN).predict(texts)``."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch

from . import cpu
from .config import RunConfig
from .data import Encoded, Table, encode
from .errors import UserError
from .loop import predict_logits
from .metrics import classification_metrics, sigmoid, softmax
from .modeling import (
    TextClassifier,
    load_backbone,
    load_tokenizer,
    quiet_transformers,
    resolve_model,
    set_dropout,
    trust_remote_code,
)
from .strategies import get_strategy


def weights_dtype(cfg: RunConfig, for_training: bool = True) -> torch.dtype:
    """fp32, except a backbone that does not train on a bf16 GPU (half the memory, faster)."""
    choice = cfg.model.weights_dtype
    if choice == "auto":
        gpu_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        frozen_backbone = cfg.strategy.name in ("frozen", "lora", "adapter")
        choice = "bf16" if gpu_bf16 and (frozen_backbone or not for_training) else "fp32"
    return torch.bfloat16 if choice == "bf16" else torch.float32


def build_model(cfg: RunConfig, num_labels: int, base: str | None = None,
                for_training: bool = False) -> TextClassifier:
    """The classifier described by ``cfg`` on its base backbone (weights not yet loaded)."""
    src = base or resolve_model(cfg.model.model)
    m = cfg.model
    backbone = load_backbone(src, weights_dtype(cfg, for_training), m.load_in_4bit and for_training,
                             m.gradient_checkpointing and for_training)
    if m.backbone_dropout is not None and for_training:
        set_dropout(backbone, m.backbone_dropout)
    model = TextClassifier(backbone, num_labels, m.pooling, m.head, m.head_dropout)
    model.head.float()  # the head always trains in fp32
    return model


CALIBRATION = "calibration.json"
"""The run's fitted temperature, or multi-label thresholds (see ``TrainArgs.calibration``)."""


def check_min_confidence(p: float | None, multi_label: bool = False) -> None:
    """``--min-confidence P``: a probability, for a single-label run."""
    if p is None:
        return
    if not 0 < p <= 1:
        raise UserError(f"--min-confidence {p}: give a probability in (0, 1], e.g. 0.9 (the "
                        f"run's report.html shows the accuracy at each level)")
    if multi_label:
        raise UserError("--min-confidence: this run is multi-label, where each tag has its own "
                        "threshold; use --uncertain N to find the rows to check")


def _strings(items, name: str) -> list[str]:
    """``items`` as a list of strings, or the error naming the first that is not one (a
    missing value in a DataFrame column is a float NaN)."""
    items = list(items)
    bad = next((i for i, t in enumerate(items) if not isinstance(t, str)), None)
    if bad is not None:
        raise UserError(f"{name}[{bad}] is {type(items[bad]).__name__} {items[bad]!r:.40}, not a "
                        f"string (a missing value? drop or fill those rows first)")
    return items


def _whole_number(name: str) -> bool:
    """A label as pandas would read it into an int column: ``0``, ``12``, ``-1`` (not ``01``,
    ``1.0``, `` 1``)."""
    return re.fullmatch(r"-?(0|[1-9][0-9]*)", name) is not None


class Predictor:
    """What every reloaded run does with texts, whatever computes its scores: a trained run
    (``Classifier``) or a `textune prompt` run (``prompt.PromptClassifier``). Subclasses set
    ``names``, ``config`` (the data settings: text columns, multi-label), ``multi_label``,
    ``thresholds``, ``temperature``, ``metrics`` and implement ``_check_pairs`` and
    ``_logits``."""

    names: list[str]
    """The run's labels as written in its files (labels.json, the ``p_<class>`` columns)."""
    config: RunConfig

    @property
    def labels(self) -> list:
        """The labels, in ``predict_proba``'s column order, of the type ``predict`` returns:
        ints where every label is a whole number, bools where they are True/False (as pandas
        reads such a column of a CSV, or a DataFrame holds it: ``clf.predict(df.text) ==
        df.label`` compares like with like), else strings."""
        return self._typed(self.names)

    def _typed(self, values: list) -> list:
        if not self.names:
            return list(values)
        if all(_whole_number(n) for n in self.names):
            cast = int
        elif set(self.names) <= {"True", "False"}:
            cast = "True".__eq__
        else:
            return list(values)
        return [cast(v) if isinstance(v, str) else [cast(t) for t in v] for v in values]

    multi_label: bool = False
    thresholds: np.ndarray | None = None
    temperature: float = 1.0
    metrics: dict | None = None

    def logits(self, texts: list[str], pairs: list[str] | None = None,
               batch_size: int | None = None, progress: bool = False) -> np.ndarray:
        """Scores ``[len(texts), len(labels)]``; their softmax (multi-label: sigmoid) over the
        run's temperature is ``predict_proba``."""
        if isinstance(texts, str):
            raise UserError("predict() takes a list of texts; wrap a single text in a list")
        texts = _strings(texts, "texts")  # (any iterable: a Series, an array, a generator)
        pairs = None if pairs is None else _strings(pairs, "pairs")
        if pairs is not None and len(pairs) != len(texts):
            raise UserError(f"{len(texts)} texts but {len(pairs)} pairs; give one pair a text")
        self._check_pairs(pairs)
        if len(texts) == 0:
            return np.zeros((0, len(self.names)), dtype=np.float32)
        return self._logits(texts, pairs, batch_size, progress)

    def predict_frame(self, df, text_col: str | None = None, pair_col: str | None = None, *,
                      min_confidence: float | None = None, batch_size: int | None = None,
                      progress: bool = False):
        """``df`` (a pandas DataFrame) with the predicted ``label`` (``predicted_label`` if it
        has a ``label`` column) and a ``p_<class>`` column a class, as ``textune predict``
        writes: every row and column kept, its index too; rows without a text get blanks.
        ``min_confidence``: rows whose top probability is below it get no label."""
        from .data import frame_inputs

        pair_col = pair_col or self.config.data.text_pair_col
        frame, table, keep = frame_inputs(df, "DataFrame", text_col=text_col, pair_col=pair_col,
                                          run_text_col=self.config.data.text_col)
        probs = self.predict_proba(table.texts, table.pairs, batch_size=batch_size,
                                   progress=progress)
        return self.annotate(frame, probs, keep, min_confidence, typed=True)

    def annotate(self, df, probs: np.ndarray, keep: list[int],
                 min_confidence: float | None = None, typed: bool = False):
        """``df`` with the decisions and probabilities of its rows ``keep`` (positions) added;
        the other rows blank. (``predict_frame`` and `textune predict`.) ``typed``: labels of
        the type of ``labels`` (ints where they are whole numbers), else as the files have
        them."""
        import pandas as pd

        from .data import TAG_JOIN

        check_min_confidence(min_confidence, self.multi_label)
        name = "label" if "label" not in df.columns else "predicted_label"
        out = df.copy()
        chosen = self.decide(probs)
        if self.multi_label:  # one cell of tags, joined as in the training file
            chosen = [(self.config.data.label_sep or TAG_JOIN).join(tags) for tags in chosen]
        elif typed:
            chosen = self._typed(chosen)
        if min_confidence is not None:  # below it: no label, for a person to decide
            unsure = probs.max(1) < min_confidence
            chosen = [None if u else c for c, u in zip(chosen, unsure)]
        pred = pd.Series([None] * len(df), dtype=object)
        pred.iloc[keep] = chosen
        out[name] = pred.values
        for j, n in enumerate(self.names):
            col = pd.Series([float("nan")] * len(df))
            col.iloc[keep] = probs[:, j].astype(np.float64).round(6)
            out[f"p_{n}"] = col.values
        return out

    def _check_pairs(self, pairs: list[str] | None) -> None:
        raise NotImplementedError

    def _logits(self, texts: list[str], pairs: list[str] | None, batch_size: int | None,
                progress: bool) -> np.ndarray:
        raise NotImplementedError

    def read_as(self, truncation: str | None, max_windows: int | None = None) -> None:
        """Read texts past the run's max length another way than in training (``predict`` /
        ``eval --truncation``): ``windows`` scores a long text by the mean of its windows'
        logits, which helped a run trained on heads (docs/BENCHMARKS.md, "Long texts")."""
        from .data import TRUNCATIONS

        if truncation is None and max_windows is None:
            return
        if truncation is not None and truncation not in TRUNCATIONS:
            raise UserError(f"--truncation {truncation}: choose {', '.join(TRUNCATIONS)}")
        if max_windows is not None and max_windows < 1:
            raise UserError(f"--max-windows {max_windows}: must be 1 or more")
        if self.config.data.text_pair_col and truncation == "windows":
            from .data import NO_WINDOWS_FOR_PAIRS

            raise UserError(NO_WINDOWS_FOR_PAIRS)
        self.config.data.truncation = truncation or self.config.data.truncation
        self.config.data.max_windows = max_windows or self.config.data.max_windows

    def predict_proba(self, texts: list[str], pairs: list[str] | None = None,
                      batch_size: int | None = None, progress: bool = False) -> np.ndarray:
        """Class probabilities, ``[len(texts), len(labels)]``, columns in ``self.labels`` order
        (multi-label: each tag's own probability; rows need not sum to 1)."""
        logits = self.logits(texts, pairs, batch_size, progress)
        if self.multi_label:
            return sigmoid(logits)
        return softmax(logits / self.temperature)

    def decide(self, probs: np.ndarray) -> list[str] | list[list[str]]:
        """``predict_proba``'s rows -> the label of each (multi-label: the list of its tags
        at or above their thresholds)."""
        if self.multi_label:
            return [[self.names[j] for j in np.flatnonzero(row)]
                    for row in probs >= self.thresholds]
        return [self.names[i] for i in probs.argmax(-1)]

    def uncertainty(self, probs: np.ndarray) -> np.ndarray:
        """How unsure each row's decision is, in [0, 1] (1: a coin toss): one minus the margin
        between the two most probable classes; multi-label: one minus the distance of the tag
        nearest its threshold, as a share of the room on that side. The rows worth labelling
        next (uncertainty sampling)."""
        if self.multi_label:
            t = np.broadcast_to(self.thresholds, probs.shape)
            room = np.where(probs >= t, 1 - t, t)
            return 1 - (np.abs(probs - t) / np.maximum(room, 1e-9)).min(1)
        if probs.shape[1] < 2:
            return np.zeros(len(probs))
        top2 = np.sort(probs, axis=1)[:, -2:]
        return 1 - (top2[:, 1] - top2[:, 0])

    def predict(self, texts: list[str], pairs: list[str] | None = None,
                batch_size: int | None = None) -> list[str] | list[list[str]]:
        """The label of each text; multi-label: the list of each text's tags (of the type of
        ``labels``)."""
        return self._typed(self.decide(self.predict_proba(texts, pairs, batch_size)))

    def read_labelled(self, path, text_col: str | None = None, label_col: str | None = None,
                      pair_col: str | None = None) -> Table:
        """A labelled file read as the run's training data was: its columns (unless named),
        multi-label and tag separator."""
        from .data import read_table

        d = self.config.data
        return read_table(path, text_col=text_col or d.text_col,
                          label_col=label_col or d.label_col,
                          pair_col=pair_col or d.text_pair_col, multi_label=d.multi_label,
                          label_sep=d.label_sep)

    def scores(self, table: Table, batch_size: int | None = None,
               progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """A labelled table's labels as indices into ``self.labels`` (multi-label: 0/1 rows),
        and its logits divided by the run's temperature (their softmax is ``predict_proba``)."""
        from .data import encode_labels

        assert table.labels is not None
        y = encode_labels(table.labels, self.names, table.source)
        return y, self.logits(table.texts, table.pairs, batch_size, progress) / self.temperature

    def evaluate(self, table, batch_size: int | None = None, progress: bool = False, *,
                 text_col: str | None = None, label_col: str | None = None) -> dict:
        """Metrics (accuracy, macro-F1, per class, confusion matrix) on labelled rows: a
        :class:`Table`, or a pandas DataFrame whose text and label columns are found as in
        training (or named by ``text_col`` / ``label_col``)."""
        if not isinstance(table, Table):
            from .config import frames_as_files

            table = self.read_labelled(frames_as_files({"data": table})["data"], text_col,
                                       label_col)
        y, logits = self.scores(table, batch_size, progress)
        return classification_metrics(y, logits, self.names, uncertainty=True,
                                      thresholds=self.thresholds)


class Classifier(Predictor):
    """A trained text classifier with its tokenizer, labels and settings."""

    CHUNK = 1024
    """Texts tokenized per chunk when tokenization overlaps GPU scoring."""

    def __init__(self, model: TextClassifier, tokenizer, labels: list[str], config: RunConfig,
                 device: str | torch.device = "cpu"):
        self.model = model.eval().to(device)
        self.tokenizer = tokenizer
        self.names = labels
        self.config = config
        self.device = torch.device(device)
        self.metrics: dict | None = None
        """The run's test metrics (its metrics.json), when loaded from a finished run."""
        self.temperature = 1.0
        """Logits are divided by it before the softmax (fitted on validation rows after
        training, calibration.json): probabilities that mean what they say."""
        self.multi_label = bool(config.data.multi_label)
        """Each text gets any number of the labels (tags): sigmoid probabilities, one decision
        per tag."""
        self.thresholds = np.full(len(labels), 0.5) if self.multi_label else None
        """Multi-label: the probability at which each tag is predicted (chosen on the
        validation split after training, calibration.json; else 0.5)."""
        self._low_weights = cpu.KeptLowWeights()

    def encode(self, texts: list[str], pairs: list[str] | None = None) -> Encoded:
        d = self.config.data
        return encode(self.tokenizer, Table(list(texts), None, pairs, "input"), d.max_length,
                      d.truncation, max_windows=d.max_windows)

    def _check_pairs(self, pairs: list[str] | None) -> None:
        if pairs is None and self.config.data.text_pair_col:
            raise UserError(f"this classifier was trained on text pairs (column "
                            f"{self.config.data.text_pair_col!r}): pass pairs= as well")

    def _logits(self, texts: list[str], pairs: list[str] | None, batch_size: int | None,
                progress: bool) -> np.ndarray:
        batch_size = batch_size or 64
        # (windows: the chunked path regroups sequences across chunks, losing a text's windows)
        if self.device.type != "cuda" or len(texts) <= 2 * self.CHUNK or \
                self.config.data.truncation == "windows":
            enc = self.encode(texts, pairs)
            with self._low_weights(self.model, self.device, self._amp()):
                return enc.pool(predict_logits(self.model, enc, batch_size, self.device,
                                               self._amp(), progress=progress, desc="predict",
                                               shard=False))
        return self._chunked_logits(texts, pairs, batch_size, progress)

    def embed(self, texts: list[str], pairs: list[str] | None = None,
              progress: bool = False) -> np.ndarray:
        """Each text's pooled backbone features ``[n, hidden]`` (what the head reads; windows:
        their mean): for clustering, search, or choosing diverse rows to label."""
        from .api import _backbone_features

        self._check_pairs(pairs)
        enc = self.encode(list(texts), pairs)
        with torch.inference_mode(), self._low_weights(self.model, self.device, self._amp()):
            feats = _backbone_features(self.model, enc, self.config, self.device, self._amp(),
                                       progress, torch.device("cpu"))
        return enc.pool(feats.numpy())

    def _amp(self) -> torch.dtype | None:
        """The run's precision, where this device does it natively (so reloaded predictions
        match the metrics written at training time)."""
        from .loop import native_bf16

        amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.config.train.precision)
        if amp is torch.bfloat16 and not native_bf16(self.device.type):
            return None
        if amp is torch.float16 and self.device.type != "cuda":
            return None
        return amp

    def _chunked_logits(self, texts, pairs, batch_size, progress=False) -> np.ndarray:
        """Texts in chunks, longest first by characters (close to tokens); a thread tokenizes
        the next chunk while the device scores this one (the Rust tokenizer releases the GIL).
        The rows of a chunk's last batch, short of a full one, wait for the next chunk, so only
        the input's last batch has an odd shape."""
        from concurrent.futures import ThreadPoolExecutor

        from tqdm.auto import tqdm

        from .loop import inference_batches

        order = np.argsort([-len(t) for t in texts], kind="stable")
        chunks = [order[i:i + self.CHUNK] for i in range(0, len(order), self.CHUNK)]

        def encode(c):
            return self.encode([texts[i] for i in c], None if pairs is None else
                               [pairs[i] for i in c])

        amp = self._amp()
        out = np.zeros((len(texts), len(self.names)), dtype=np.float32)
        held, held_enc = np.zeros(0, dtype=np.int64), None
        with ThreadPoolExecutor(1) as pool, tqdm(total=len(texts), desc="predict", leave=False,
                                                 disable=not progress, mininterval=1) as bar:
            nxt = pool.submit(encode, chunks[0])
            for k, c in enumerate(chunks):
                enc = nxt.result()
                if k + 1 < len(chunks):
                    nxt = pool.submit(encode, chunks[k + 1])
                rows = np.concatenate([held, c])
                if held_enc is not None:
                    enc = held_enc.join(enc)
                keep = np.arange(len(rows))
                if k + 1 < len(chunks):  # the last batch waits (the cut of the rest is the same)
                    last = inference_batches(enc, batch_size, self.device)[-1]
                    keep = np.setdiff1d(keep, last)
                    held, held_enc = rows[last], enc.select(last)
                if len(keep):  # (a chunk smaller than a batch waits whole)
                    out[rows[keep]] = predict_logits(self.model, enc.select(keep), batch_size,
                                                     self.device, amp, shard=False)
                bar.update(len(keep))
        return out


def load(run_dir: str | Path, device: str | None = None, merge: bool = True) -> Predictor:
    """Reload a run folder written by ``textune train`` (a ``Classifier``) or ``textune
    prompt`` (a ``prompt.PromptClassifier``: the same methods, its model scoring each label).
    A LoRA run predicting in fp32 has its adapter merged into the weights (``merge``): the same
    predictions without the adapter's extra products (on CPU: minilm-l6 1.13x, smollm2-135m
    1.23-1.33x faster)."""
    run = Path(run_dir)
    if not (run / "config.json").exists() or not (run / "labels.json").exists():
        raise UserError(f"{run}: not a textune run folder (no config.json / labels.json); pass "
                        f"the --out folder of a finished `textune train` or `textune prompt`")
    if is_prompt_run(run):
        from .prompting import PromptClassifier

        if not (run / "metrics.json").exists():
            raise UserError(f"{run}: the prompt run has no metrics.json (did it finish?); run "
                            f"it to the end first")
        return PromptClassifier(run, device)
    cfg = RunConfig.load(run / "config.json")
    labels = json.loads((run / "labels.json").read_text(encoding="utf-8"))
    strategy = get_strategy(cfg.strategy.name, **cfg.strategy.options())
    saved = strategy.saved_backbone(run)
    # (the run loaded once already; its load report is noise now. A model with code of its
    # own: the run was made with --trust-remote-code, so it reloads with it)
    with quiet_transformers(), trust_remote_code(cfg.model.trust_remote_code):
        model = build_model(cfg, len(labels), str(saved) if saved else None)
        try:
            model = strategy.load(model, run)
        except FileNotFoundError as e:
            raise UserError(f"{run}: weights missing ({Path(e.filename or '').name}); the run "
                            f"did not finish, or files were removed") from None
        tokenizer = load_tokenizer(str(run / "tokenizer"))
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    clf = Classifier(model, tokenizer, labels, cfg, device)
    if merge and cfg.strategy.name == "lora" and clf._amp() is None and all(
            p.dtype == torch.float32 for p in model.backbone.parameters()):
        # (W + BA, once: it only predicts. In fp32 only: rounding W + BA to bf16 would not
        # give the probabilities the run's metrics were computed with; nor over 4-bit weights)
        clf.model.backbone = model.backbone.merge_and_unload()
    if (run / "metrics.json").exists():
        clf.metrics = json.loads((run / "metrics.json").read_text())
    clf.temperature, thresholds = fitted_calibration(run, labels)
    if thresholds is not None:
        clf.thresholds = thresholds
    return clf


def is_prompt_run(run: Path) -> bool:
    """A `textune prompt` folder (no trained weights: ``prompt.PromptClassifier``)."""
    cfg = run / "config.json"
    return cfg.exists() and json.loads(cfg.read_text()).get("kind") == "prompt"


def fitted_calibration(run: Path, labels: list[str]) -> tuple[float, np.ndarray | None]:
    """What was fitted on the validation split after training (calibration.json): the
    temperature (1 where none) and, multi-label, each tag's threshold (None where none)."""
    file = run / CALIBRATION
    if not file.exists():
        return 1.0, None
    fitted = json.loads(file.read_text(encoding="utf-8"))
    if "thresholds" in fitted:
        return 1.0, np.array([fitted["thresholds"][n] for n in labels])
    return float(fitted["temperature"]), None
