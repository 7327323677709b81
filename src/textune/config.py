"""Run configuration: nested dataclasses, validated, saved in every run folder."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .errors import UserError

TRUNCATIONS = ("head", "head-tail", "windows")
"""How a text longer than --max-length is read (``DataArgs.truncation``)."""

NO_WINDOWS_FOR_PAIRS = "--truncation windows: not for text pairs; choose head or head-tail"


def launched_rank() -> int:
    """This process's rank among those `--num-processes` launched (0: the main one, or the
    only one), read from the launcher's environment before any process group exists."""
    return int(os.environ.get("RANK") or 0)


@dataclass
class DataArgs:
    data: str = ""
    """Catalog dataset name or a CSV / TSV / JSONL / Parquet file."""
    val: str | None = None
    test: str | None = None
    text_col: str | None = None
    label_col: str | None = None
    text_pair_col: str | None = None
    limit: int | None = None
    """Cap on training rows (a stratified sample); validation and test are not capped."""
    drop_classes_under: int = 0
    """Leave out the rows of classes with fewer than this many distinct texts (too few to
    stratify a train/val/test split; 0: refuse such data with an error naming them)."""
    exclude_rows: str | None = None
    """A file with a ``row`` column (``textune cv``'s label_issues.csv): those rows of --data
    are left out of the training split; validation and test keep them, so runs with and without
    it are scored on the same rows."""
    unlabelled: str | None = None
    """Texts without labels for the student to learn from: --teacher labels them (see
    teacher.py); they join the training split only."""
    teacher: str | None = None
    """A finished train or prompt run whose probabilities label --unlabelled."""
    teacher_targets: str = "soft"
    """soft: learn the teacher's probabilities; hard: its decisions."""
    max_length: int | None = None
    """Tokens per text; default covers ~99% of the data, capped by the model."""
    truncation: str = "head"
    """head: a long text's first max-length tokens; head-tail: its first quarter and last three
    quarters; windows: the whole text in windows (train on each, predict with their mean)."""
    max_windows: int = 8
    """--truncation windows: windows a text is cut into at most (spread evenly over it)."""
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    split_seed: int | None = None
    """Seed of the train/val/test split, the --limit sample and the max-length sample; None:
    the training seed. Fixed apart from it, runs with different seeds share their splits."""
    folds: int | None = None
    """Cross-validation (``textune cv``): the test split is fold ``fold`` of ``folds``
    stratified folds of --data, the validation split is drawn from the other folds."""
    fold: int | None = None
    multi_label: bool = False
    """Each row has any number of labels (tags): one label column of tag lists (``a|b``, a JSON
    list) or several 0/1 label columns (``--label-col toxic,insult``)."""
    label_sep: str | None = None
    """Separator of the tags in a multi-label column; None: found in the data (| ; or ,)."""


@dataclass
class ModelArgs:
    model: str = "minilm-l6"
    pooling: str = "auto"
    head: str = "linear"
    head_dropout: float = 0.1
    backbone_dropout: float | None = None
    """None: the model's own dropout. A value sets every dropout of the backbone for training
    (0: ~10-14% faster full fine-tuning on a 2-core fp32 CPU, docs/BENCHMARKS.md)."""
    weights_dtype: str = "auto"
    """auto: bf16 for a frozen backbone on a bf16 GPU (lora, frozen, adapter), else fp32."""
    load_in_4bit: bool = False
    """QLoRA: the frozen backbone quantised to 4-bit NF4 (bitsandbytes, CUDA only)."""
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False
    """Run the modelling code a model's repository brings (transformers' trust_remote_code)."""


@dataclass
class StrategyArgs:
    name: str = "full"
    lora_r: int = 8
    lora_alpha: int | None = None
    lora_dropout: float | None = None
    """None = 0.05 on a GPU, 0 on CPU: there dropout costs ~40% of a LoRA step (measured,
    docs/BENCHMARKS.md) for 0.3-0.5 points of accuracy."""
    lora_targets: list[str] | None = None
    adapter_reduction: int = 16
    adapter_where: str = "both"
    pair_iterations: int = 20
    """contrastive: rounds of pairs (each training text with one of its class, one of another)."""
    body_lr: float = 2e-5
    """contrastive: the backbone's learning rate in the pair phase (--lr is the head's)."""
    body_epochs: int = 1

    def options(self) -> dict:
        if self.name == "lora":
            dropout = self.lora_dropout
            if dropout is None:
                import torch

                dropout = 0.05 if torch.cuda.is_available() else 0.0
            return {"r": self.lora_r, "alpha": self.lora_alpha, "dropout": dropout,
                    "targets": self.lora_targets}
        if self.name == "adapter":
            return {"reduction": self.adapter_reduction, "where": self.adapter_where}
        if self.name == "contrastive":
            return {"iterations": self.pair_iterations, "body_lr": self.body_lr,
                    "body_epochs": self.body_epochs}
        return {}


@dataclass
class TrainArgs:
    epochs: int | None = None
    """None: the strategy's default (3; frozen 20, its epochs being cheap)."""
    batch_size: int = 32
    """Rows per optimizer step; 0 = auto: the largest per-step batch that fits the device, with
    gradient accumulation keeping ``batch_size_target`` rows per optimizer step."""
    batch_size_target: int = 32
    batch_tokens: int = 0
    """Token-budget batches: each holds up to N tokens (padding included) instead of
    ``batch_size`` rows, so short texts share big batches and long ones small (0: off)."""
    eval_batch_size: int = 128
    lr: float | None = None
    """Peak learning rate; default depends on the strategy."""
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    schedule: str = "linear"
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    max_steps: int | None = None
    patience: int | None = None
    seed: int = 0
    precision: str = "auto"
    class_weights: str = "none"
    calibration: str = "auto"
    """temperature: after training, fit one temperature on the validation split so the predicted
    probabilities are calibrated (predictions unchanged). Multi-label: threshold, the decision
    threshold shared by every tag chosen on the validation split for the best F1; per-tag, each
    tag's own. none: raw softmax, or thresholds 0.5. auto: temperature, or threshold for
    multi-label data."""
    compile: bool = False
    """torch.compile the model; lengths are padded to multiples of 64 so few shapes compile."""
    pad_multiple: int = 0
    """Pad training batch widths to a multiple of this (0: 8 on a GPU, for its tensor cores and
    fewer shapes; 1 on a CPU, where every padded token costs: 11% fewer tokens, 10% less time)."""
    save_every: int = 0
    """Also checkpoint every N optimizer steps (0: only at the end of each epoch)."""
    log_every: int = 0
    """Log loss every N steps (0: about 100 points per run, at most every 20 steps)."""

    def padding_multiple(self, device_type: str) -> int:
        """Training batches are padded to a multiple of this: 64 when compiled (few shapes)."""
        if self.compile:
            return 64
        return self.pad_multiple or (1 if device_type == "cpu" else 8)


FRAME_OPTIONS = ("data", "val", "test", "unlabelled")
"""Options that take a pandas DataFrame from Python as well as a file (``data.frame_file``)."""


def frames_as_files(options: dict) -> dict:
    """``options`` with each pandas DataFrame among ``FRAME_OPTIONS`` replaced by the file it is
    kept as (``data.frame_file``); a caller building several configs from the same options
    (tune) converts once."""
    frames = [k for k in FRAME_OPTIONS if hasattr(options.get(k), "to_json")
              and hasattr(options.get(k), "columns")]
    if not frames:
        return options
    from .data import frame_file

    return {**options, **{k: frame_file(options[k], k) for k in frames}}


_GROUPS = {"data": DataArgs, "model": ModelArgs, "strategy": StrategyArgs, "train": TrainArgs}
"""RunConfig's option groups, by field name."""


@dataclass
class RunConfig:
    data: DataArgs = field(default_factory=DataArgs)
    model: ModelArgs = field(default_factory=ModelArgs)
    strategy: StrategyArgs = field(default_factory=StrategyArgs)
    train: TrainArgs = field(default_factory=TrainArgs)
    out: str = ""

    def validate(self) -> RunConfig:
        t, d = self.train, self.data
        checks = [
            (t.epochs is None or t.epochs >= 1, "--epochs must be >= 1"),
            (t.batch_size >= 0, "--batch-size must be >= 1 (or auto)"),
            (self.model.weights_dtype in ("auto", "fp32", "bf16"),
             "--weights-dtype: choose auto, fp32 or bf16"),
            (not self.model.load_in_4bit or self.strategy.name == "lora",
             "--load-in-4bit is QLoRA: use it with --strategy lora"),
            (t.grad_accum >= 1, "--grad-accum must be >= 1"),
            (t.pad_multiple >= 0, "pad_multiple must be >= 0 (0: automatic)"),
            (t.batch_tokens == 0 or t.batch_tokens >= 64, "--batch-tokens must be >= 64"),
            (t.batch_tokens == 0 or t.batch_size != 0,
             "--batch-tokens and --batch-size auto exclude each other; pick one"),
            (self.strategy.lora_dropout is None or 0 <= self.strategy.lora_dropout < 1,
             "--lora-dropout must be in [0, 1)"),
            (self.model.backbone_dropout is None or 0 <= self.model.backbone_dropout < 1,
             "--backbone-dropout must be in [0, 1)"),
            (0 <= self.model.head_dropout < 1, "--head-dropout must be in [0, 1)"),
            (self.strategy.lora_r >= 1, "--lora-r must be >= 1"),
            (t.lr is None or t.lr > 0, "--lr must be > 0"),
            (0 <= t.warmup_ratio < 1, "--warmup-ratio must be in [0, 1)"),
            (t.schedule in ("linear", "cosine", "constant"),
             "--schedule: choose linear, cosine or constant"),
            (t.precision in ("auto", "fp32", "bf16", "fp16"),
             "--precision: choose auto, fp32, bf16 or fp16"),
            (t.class_weights in ("none", "auto"), "--class-weights: choose none or auto"),
            (t.calibration in ("auto", "temperature", "threshold", "per-tag", "none"),
             "--calibration: choose auto, temperature, threshold, per-tag or none"),
            (t.calibration != "temperature" or not d.multi_label,
             "--calibration temperature is for single-label data; with --multi-label use "
             "threshold (one for all tags), per-tag or none"),
            (t.calibration not in ("threshold", "per-tag") or d.multi_label,
             f"--calibration {t.calibration} is for --multi-label data; use temperature or none"),
            (d.folds is None or d.folds >= 2, f"--folds {d.folds}: give 2 or more (5 or 10 are "
                                              f"usual)"),
            ((d.folds is None) == (d.fold is None) and
             (d.fold is None or 0 <= d.fold < d.folds), "fold must be in [0, folds)"),
            (d.folds is None or not d.test,
             "--test: cross-validation makes its test splits from --data; drop --test "
             "(evaluate a run on it with textune eval)"),
            (not d.multi_label or not d.text_pair_col,
             "--multi-label with --text-pair-col is not supported; join the two texts"),
            (t.max_steps is None or t.max_steps >= 1, "--max-steps must be >= 1"),
            (t.patience is None or t.patience >= 1, "--patience must be >= 1"),
            (d.limit is None or d.limit >= 2, "--limit must be >= 2"),
            (d.max_length is None or d.max_length >= 8, "--max-length must be >= 8"),
            (d.truncation in TRUNCATIONS, f"--truncation: choose {', '.join(TRUNCATIONS)}"),
            (d.max_windows >= 1, "--max-windows must be >= 1"),
            (d.truncation != "windows" or not d.text_pair_col, NO_WINDOWS_FOR_PAIRS),
            (0 < d.val_fraction < 0.5 and 0 < d.test_fraction < 0.5,
             "--val-fraction and --test-fraction must be in (0, 0.5)"),
            (self.strategy.lora_r >= 1, "--lora-r must be >= 1"),
            (self.strategy.adapter_reduction >= 1, "--adapter-reduction must be >= 1"),
            (self.strategy.pair_iterations >= 1 and self.strategy.body_epochs >= 1 and
             self.strategy.body_lr > 0, "--pair-iterations and --body-epochs must be >= 1, "
                                        "--body-lr > 0"),
            (bool(d.unlabelled) == bool(d.teacher),
             "--unlabelled and --teacher go together: the teacher (a finished train or prompt "
             "run) labels the unlabelled texts"),
            (d.teacher_targets in ("soft", "hard"), "--teacher-targets: choose soft or hard"),
            (self.strategy.name != "contrastive" or not d.teacher,
             "--strategy contrastive pairs labelled rows; with --teacher use full, lora, adapter "
             "or frozen"),
            (self.strategy.name != "contrastive" or not d.text_pair_col,
             "--strategy contrastive pairs single texts; with --text-pair-col use frozen, lora "
             "or full"),
        ]
        for ok, msg in checks:
            if not ok:
                raise UserError(msg)
        if t.calibration == "auto":
            t.calibration = "threshold" if d.multi_label else "temperature"
        return self  # (--epochs left unset: train picks the strategy's default for the data)

    @property
    def epochs(self) -> int:
        """--epochs, or the strategy's default."""
        if self.train.epochs is not None:
            return self.train.epochs
        from .strategies import REGISTRY

        s = REGISTRY.get(self.strategy.name)
        return s.default_epochs if s else 3

    @property
    def split_seed(self) -> int:
        return self.train.seed if self.data.split_seed is None else self.data.split_seed

    def plan_rows(self) -> int:
        """Rows of the largest batch at full length, for the memory plan: with a token budget,
        the budget's worth of longest rows (the most attention memory for those tokens)."""
        t = self.train
        if t.batch_tokens:
            return max(1, t.batch_tokens // (self.data.max_length or 512))
        return t.batch_size or t.batch_size_target

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_options(cls, **options) -> RunConfig:
        """Keyword arguments named as ``textune train``'s flags (``batch_size`` for
        ``--batch-size``) -> a RunConfig; ``strategy`` names the strategy, paths may be Paths,
        ``batch_size="auto"`` is 0."""
        names = {g: {f.name for f in fields(c)} for g, c in _GROUPS.items()}
        kw: dict[str, dict] = {g: {} for g in _GROUPS}
        options = frames_as_files(options)
        out = options.pop("out", "")
        if "strategy" in options:
            kw["strategy"]["name"] = options.pop("strategy")
        if options.get("batch_size") == "auto":
            options["batch_size"] = 0
        for key, value in options.items():
            group = next((g for g in _GROUPS if key in names[g]), None)
            if group is None:
                known = sorted(set().union(*names.values()) - {"name"} | {"strategy", "out"})
                raise UserError(f"{key}=: not a textune option; options: {', '.join(known)}")
            kw[group][key] = str(value) if isinstance(value, Path) else value
        return cls(out=str(out), **{g: c(**kw[g]) for g, c in _GROUPS.items()})

    @classmethod
    def from_dict(cls, d: dict) -> RunConfig:
        groups = {f.name: f.type for f in fields(cls)}
        unknown = set(d) - set(groups)
        if unknown:
            raise UserError(f"config: unknown keys {sorted(unknown)}")
        kw = {}
        for name, sub in _GROUPS.items():
            vals = d.get(name, {})
            bad = set(vals) - {f.name for f in fields(sub)}
            if bad:
                raise UserError(f"config: unknown keys in {name}: {sorted(bad)}")
            kw[name] = sub(**vals)
        return cls(out=d.get("out", ""), **kw)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n")

    @classmethod
    def load(cls, path: Path) -> RunConfig:
        return cls.from_dict(json.loads(path.read_text()))
