"""textune vs Hugging Face Trainer, same model, data, hyperparameters and machine, back to back:
each training run in a fresh Python process of its own (what a user runs), so neither inherits
the other's heap, threads or library state.

    python bench/bench.py quick   # CPU, minilm-l6 full fine-tuning on a fixed rt-polarity subset
    python bench/bench.py quick --pairs 3  # the same, alternating 3 pairs: median ratio
    python bench/bench.py full    # quick + the GPU rows when CUDA is present (see bench/gpu.py)
    python bench/bench.py batching  # accuracy: token-budget batches vs Trainer's 32 rows
    python bench/bench.py infer   # CPU: textune predict vs a transformers pipeline
    python bench/bench.py lora    # CPU: smollm2-135m LoRA, textune vs Trainer + PEFT
    python bench/bench.py bare    # the quick row's floor: a bare PyTorch loop, same batches

Prints a table and, last, ``speedup_vs_trainer=X accuracy_textune=A accuracy_trainer=B``.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from textune.config import StrategyArgs

HYPER = {"epochs": 1, "batch_size": 32, "lr": 5e-5, "weight_decay": 0.01, "warmup_ratio": 0.06,
         "max_length": 64, "seed": 0}


def subset(n_train: int, n_test: int, tmp: Path) -> tuple[Path, Path, Path]:
    """A fixed rt-polarity subset (seeded), written as CSV files both tools read."""
    from textune.data import read_table, resolve_data

    t = read_table(resolve_data("rt-polarity"))
    order = np.random.default_rng(0).permutation(len(t))
    parts = {"train": order[:n_train], "val": order[n_train:n_train + 200],
             "test": order[n_train + 200:n_train + 200 + n_test]}
    paths = []
    for name, idx in parts.items():
        p = tmp / f"{name}.csv"
        with open(p, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["text", "label"])
            w.writerows((t.texts[i], t.labels[i]) for i in idx)
        paths.append(p)
    return tuple(paths)


def run_textune(train: Path, val: Path, test: Path, out: Path, precision: str = "auto",
                model: str = "minilm-l6", strategy: StrategyArgs | None = None, **over) -> dict:
    from textune.api import train as tt
    from textune.config import DataArgs, ModelArgs, RunConfig, StrategyArgs, TrainArgs

    h = {**HYPER, **over}
    cfg = RunConfig(DataArgs(str(train), val=str(val), test=str(test), max_length=h["max_length"]),
                    ModelArgs(model), strategy or StrategyArgs("full"),
                    TrainArgs(epochs=h["epochs"], batch_size=h["batch_size"], lr=h["lr"],
                              weight_decay=h["weight_decay"], warmup_ratio=h["warmup_ratio"],
                              seed=h["seed"], precision=precision,
                              batch_tokens=h.get("batch_tokens", 0)), str(out))
    m = tt(cfg, progress=False)
    return {"seconds": m["train_seconds"], "accuracy": m["accuracy"], "n": m["splits"]["train"],
            "steps": m["steps"]}


def run_trainer(train: Path, test: Path, out: Path, bf16: bool = False, seed: int = 0,
                model_name: str = "minilm-l6", lora: dict | None = None, **over) -> dict:
    """What a practitioner writes today: AutoModelForSequenceClassification + Trainer with
    dynamic padding (DataCollatorWithPadding), the same hyperparameters. ``bf16`` turns on
    Trainer's own bf16 autocast (off by default on CPU). ``lora``: LoraConfig arguments, the
    model wrapped by PEFT's get_peft_model (task SEQ_CLS: the score head trains in full)."""
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    from textune.data import read_table
    from textune.modeling import resolve_model

    h = {**HYPER, "seed": seed, **over}
    src = resolve_model(model_name)
    tok = AutoTokenizer.from_pretrained(src)
    if tok.pad_token is None:  # decoders: pad with eos, as the PEFT / Trainer tutorials do
        tok.pad_token = tok.eos_token
    tr, te = read_table(train), read_table(test)
    names = sorted(set(tr.labels))

    class DS(torch.utils.data.Dataset):
        def __init__(self, table):
            self.enc = tok(table.texts, truncation=True, max_length=h["max_length"])
            self.y = [names.index(y) for y in table.labels]

        def __len__(self):
            return len(self.y)

        def __getitem__(self, i):
            return {**{k: v[i] for k, v in self.enc.items()}, "labels": self.y[i]}

    torch.manual_seed(h["seed"])
    model = AutoModelForSequenceClassification.from_pretrained(src, num_labels=len(names))
    model.config.pad_token_id = tok.pad_token_id
    if lora is not None:
        from peft import LoraConfig, TaskType, get_peft_model

        model = get_peft_model(model, LoraConfig(task_type=TaskType.SEQ_CLS, **lora))
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=h["batch_size"],
                             per_device_eval_batch_size=128, num_train_epochs=h["epochs"],
                             learning_rate=h["lr"], weight_decay=h["weight_decay"],
                             warmup_steps=h["warmup_ratio"], lr_scheduler_type="linear",
                             max_grad_norm=1.0, seed=h["seed"], report_to="none",
                             save_strategy="no", logging_strategy="no", disable_tqdm=True, bf16=bf16,
                             use_cpu=not torch.cuda.is_available())
    trainer = Trainer(model=model, args=args, train_dataset=DS(tr),
                      data_collator=DataCollatorWithPadding(tok))
    t = time.perf_counter()
    trainer.train()
    secs = time.perf_counter() - t
    pred = trainer.predict(DS(te))
    acc = float((pred.predictions.argmax(-1) == np.array(pred.label_ids)).mean())
    return {"seconds": secs, "accuracy": acc, "n": len(tr)}


def _quiet() -> None:
    logging.basicConfig(level=logging.WARNING)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _call(fn, args, kw):
    _quiet()
    return fn(*args, **kw)


def isolated(fn, *args, **kw):
    """``fn(*args, **kw)`` in a fresh Python process (spawned), so no run inherits an earlier
    run's leftovers (a grown heap, library state). One test hinted that a Trainer run slowed the
    next textune run in the same process (57.2 vs 64.5 s), inside this machine's drift: isolation
    settles it rather than measures it."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_call, fn, args, kw).result()


def machine() -> str:
    from textune.env import cpu_name

    return (f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"threads {torch.get_num_threads()}")


def bf16_cpu() -> bool:
    from textune.loop import native_bf16

    return not torch.cuda.is_available() and native_bf16("cpu")


def quick(n_train: int = 3000, n_test: int = 1000, pairs: int = 1) -> dict:
    """``pairs`` > 1: Trainer and textune runs alternate (T t t T T t ...), and the speedup is
    the median of the pairs' ratios: a shared machine's speed drifts by 10% or more within
    minutes, and each pair's two runs are measured close together."""
    import statistics

    import transformers

    tmp = Path(tempfile.mkdtemp(prefix="textune-bench-"))
    train, val, test = subset(n_train, n_test, tmp)
    runs = {"trainer": lambda i: isolated(run_trainer, train, test, tmp / f"trainer{i}"),
            "textune": lambda i: isolated(run_textune, train, val, test, tmp / f"textune{i}")}
    if bf16_cpu():  # give Trainer the same low precision textune uses on this CPU
        runs["trainer-bf16"] = lambda i: isolated(run_trainer, train, test, tmp / f"bf{i}",
                                                  bf16=True)
    done: dict[str, list[dict]] = {k: [] for k in runs}
    for i in range(pairs):
        for k in (runs if i % 2 == 0 else reversed(runs)):
            done[k].append(runs[k](i))
    rows = {k: v[0] for k, v in done.items()}

    def ratio(k: str) -> float:
        return statistics.median(a["seconds"] / b["seconds"]
                                 for a, b in zip(done[k], done["textune"]))

    extra = f" speedup_vs_trainer_bf16={ratio('trainer-bf16'):.2f}" if "trainer-bf16" in runs else ""
    print(f"\nmachine: {machine()}, transformers {transformers.__version__}")
    print(f"task: minilm-l6 full fine-tuning, rt-polarity {n_train} train / {n_test} test, "
          f"{json.dumps(HYPER)}")
    print(f"{'tool':<13} {'run':>4} {'train s':>9} {'samples/s':>10} {'accuracy':>9}")
    for k, v in done.items():
        for i, r in enumerate(v):
            print(f"{k:<13} {i + 1:>4} {r['seconds']:>9.1f} {r['n'] / r['seconds']:>10.1f} "
                  f"{r['accuracy']:>9.4f}")
    if pairs > 1:
        print("speedup per pair: " + " ".join(
            f"{a['seconds'] / b['seconds']:.2f}" for a, b in zip(done["trainer"], done["textune"])))
    # native bf16 decides the CPU result (docs/BENCHMARKS.md)
    print(f"speedup_vs_trainer={ratio('trainer'):.2f} "
          f"accuracy_textune={rows['textune']['accuracy']:.4f} "
          f"accuracy_trainer={rows['trainer']['accuracy']:.4f}{extra} "
          f"native_bf16={int(bf16_cpu())}")
    return rows


def batching(n_train: int = 8000, n_test: int = 1000, seeds: int = 3, epochs: int = 1) -> dict:
    """Do token-budget batches (bigger, fewer steps) reach Trainer's accuracy? Trainer with
    batches of 32 vs textune with 32 rows and with token budgets holding ~4x the rows (as the
    GPU rows' 32k-token batches do on IMDB-length texts), at the same lr and at 2x (the square
    root rule for 4x batches), over several seeds."""
    import transformers
    from transformers import AutoTokenizer

    from textune.data import read_table
    from textune.modeling import resolve_model

    global HYPER
    HYPER = {**HYPER, "epochs": epochs}
    tmp = Path(tempfile.mkdtemp(prefix="textune-batching-"))
    train, val, test = subset(n_train, n_test, tmp)
    tok = AutoTokenizer.from_pretrained(resolve_model("minilm-l6"))
    lens = [min(len(x), HYPER["max_length"]) for x in tok(read_table(train).texts)["input_ids"]]
    budget = int(4 * HYPER["batch_size"] * (-(-np.mean(lens) // 8) * 8))
    runs = {"Trainer, 32 rows": lambda s: run_trainer(train, test, tmp / f"tr{s}", seed=s),
            "textune, 32 rows": lambda s: run_textune(train, val, test, tmp / f"t{s}", seed=s),
            f"textune, {budget}-token batches, lr 5e-5":
                lambda s: run_textune(train, val, test, tmp / f"b{s}", seed=s,
                                      batch_tokens=budget),
            f"textune, {budget}-token batches, lr 1e-4":
                lambda s: run_textune(train, val, test, tmp / f"c{s}", seed=s,
                                      batch_tokens=budget, lr=1e-4)}
    rows = {}
    for name, fn in runs.items():
        rs = [fn(s) for s in range(seeds)]
        acc = [r["accuracy"] for r in rs]
        rows[name] = {"accuracy_mean": float(np.mean(acc)), "accuracy_sd": float(np.std(acc)),
                      "accuracies": acc, "seconds_mean": float(np.mean([r["seconds"] for r in rs])),
                      "steps": rs[0].get("steps")}
        print(json.dumps({name: rows[name]}), flush=True)
    print(f"\nmachine: {machine()}, transformers {transformers.__version__}")
    print(f"task: minilm-l6 full fine-tuning, rt-polarity {n_train} train / {n_test} test, "
          f"{json.dumps(HYPER)}, seeds 0..{seeds - 1}")
    print(f"{'run':<42} {'accuracy':>16} {'steps':>6} {'train s':>8}")
    for k, r in rows.items():
        print(f"{k:<42} {r['accuracy_mean']:.4f} +- {r['accuracy_sd']:.4f} "
              f"{r['steps'] or '':>6} {r['seconds_mean']:>8.1f}")
    return rows


def bare(n_train: int = 3000) -> dict:
    """The floor for the quick benchmark's textune row: a bare PyTorch loop (no logging,
    checkpoints or validation) on the same length-grouped batches, model, fused AdamW and
    clipping, in fp32. If textune's train s is close to this, its loop adds nothing."""
    from transformers import AutoTokenizer

    from textune.data import batch_indices, encode, read_table
    from textune.modeling import TextClassifier, load_backbone, resolve_model

    tmp = Path(tempfile.mkdtemp(prefix="textune-bench-bare-"))
    train, _, _ = subset(n_train, 1000, tmp)
    src = resolve_model("minilm-l6")
    table = read_table(train)
    enc = encode(AutoTokenizer.from_pretrained(src), table, HYPER["max_length"],
                 label_names=sorted(set(table.labels)))
    torch.manual_seed(0)
    model = TextClassifier(load_backbone(src), 2).train()
    opt = torch.optim.AdamW(model.parameters(), lr=HYPER["lr"], weight_decay=0.01, fused=True)
    batches = batch_indices(enc.lengths, len(enc), HYPER["batch_size"], shuffle=True, seed=0)
    params = list(model.parameters())
    t = time.perf_counter()
    for b in batches:
        batch = enc.collate(b, 8)
        y = batch.pop("labels")
        torch.nn.functional.cross_entropy(model(**batch), y).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
    secs = time.perf_counter() - t
    print(f"bare PyTorch loop, {len(batches)} steps: {secs:.1f} s ({machine()})")
    return {"seconds": secs}


def lora(n_train: int = 1000, n_test: int = 1000) -> dict:
    """Decoder LoRA on CPU: smollm2-135m (LLaMA architecture) on a fixed rt-polarity subset,
    textune vs Trainer + PEFT, the same LoRA (r 8, alpha 16, no dropout, all seven attention and
    MLP projections; the head trains in full) and hyperparameters (textune's decoder LoRA
    defaults: lr 1e-3, batch 32, one epoch)."""
    import transformers

    from textune.config import StrategyArgs

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    over = {"lr": 1e-3}
    tmp = Path(tempfile.mkdtemp(prefix="textune-bench-lora-"))
    train, val, test = subset(n_train, n_test, tmp)
    peft_cfg = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": targets,
                "bias": "none"}
    rows = {"trainer+peft": isolated(run_trainer, train, test, tmp / "trainer",
                                     model_name="smollm2-135m", lora=peft_cfg, **over)}
    rows["textune"] = isolated(run_textune, train, val, test, tmp / "textune",
                               model="smollm2-135m",
                               strategy=StrategyArgs("lora", lora_r=8, lora_alpha=16,
                                                     lora_dropout=0.0, lora_targets=targets),
                               **over)
    if bf16_cpu():
        rows["trainer+peft-bf16"] = isolated(run_trainer, train, test, tmp / "trainer-bf16",
                                             bf16=True, model_name="smollm2-135m", lora=peft_cfg,
                                             **over)
    anchor = rows["trainer+peft"]
    print(f"\nmachine: {machine()}, transformers {transformers.__version__}")
    print(f"task: smollm2-135m LoRA, rt-polarity {n_train} train / {n_test} test, "
          f"{json.dumps({**HYPER, **over})}, {json.dumps(peft_cfg)}")
    print(f"{'tool':<18} {'train s':>9} {'samples/s':>10} {'accuracy':>9}")
    for k, r in rows.items():
        print(f"{k:<18} {r['seconds']:>9.1f} {r['n'] / r['seconds']:>10.1f} {r['accuracy']:>9.4f}")
    extra = ""
    if "trainer+peft-bf16" in rows:
        extra = (f" speedup_vs_trainer_peft_bf16="
                 f"{rows['trainer+peft-bf16']['seconds'] / rows['textune']['seconds']:.2f}")
    print(f"speedup_vs_trainer_peft={anchor['seconds'] / rows['textune']['seconds']:.2f} "
          f"accuracy_textune={rows['textune']['accuracy']:.4f} "
          f"accuracy_trainer_peft={anchor['accuracy']:.4f}{extra}")
    return rows


def infer(n: int = 4000) -> dict:
    """CPU inference on real text: a transformers ``pipeline`` (batch 32, as its docs show) vs
    ``textune`` predict, minilm-l6 with a 2-label head, the same rt-polarity sentences."""
    import transformers
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    from textune.classifier import Classifier
    from textune.config import RunConfig
    from textune.data import read_table, resolve_data
    from textune.modeling import TextClassifier, load_backbone, resolve_model

    src = resolve_model("minilm-l6")
    texts = read_table(resolve_data("rt-polarity")).texts[:n]
    tok = AutoTokenizer.from_pretrained(src)
    tok.backend_tokenizer.no_padding()  # (its tokenizer.json pads to 128; textune turns it off)
    rows = {}
    for name, dtype in (("pipeline fp32", torch.float32), ("pipeline bf16", torch.bfloat16)):
        if dtype is torch.bfloat16 and not bf16_cpu():
            continue
        model = AutoModelForSequenceClassification.from_pretrained(src, num_labels=2, dtype=dtype)
        pipe = pipeline("text-classification", model=model, tokenizer=tok, device=-1)
        pipe(texts[:256], batch_size=32, truncation=True, max_length=128)
        t = time.perf_counter()
        pipe(texts, batch_size=32, truncation=True, max_length=128)
        rows[name] = time.perf_counter() - t
    rc = RunConfig()
    rc.data.max_length = 128
    rc.train.precision = "bf16" if bf16_cpu() else "fp32"  # what a run trained here saves
    clf = Classifier(TextClassifier(load_backbone(src), 2), tok, ["a", "b"], rc, "cpu")
    clf.predict(texts[:256])
    t = time.perf_counter()
    clf.predict(texts)
    rows["textune predict"] = time.perf_counter() - t
    print(f"\nmachine: {machine()}, transformers {transformers.__version__}")
    print(f"task: minilm-l6 + 2-label head, {len(texts)} rt-polarity sentences, max length 128")
    print(f"{'tool':<16} {'seconds':>8} {'texts/s':>8}")
    for k, v in rows.items():
        print(f"{k:<16} {v:>8.2f} {len(texts) / v:>8.1f}")
    print(" ".join(f"speedup_vs_{k.replace(' ', '_')}={v / rows['textune predict']:.2f}"
                   for k, v in rows.items() if k != "textune predict"))
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    single = {"batching": batching, "infer": infer, "lora": lora, "bare": bare}
    p.add_argument("mode", choices=["quick", "full", *single], nargs="?", default="quick")
    p.add_argument("--n-train", type=int, default=3000)
    p.add_argument("--pairs", type=int, default=1,
                   help="quick: alternate N Trainer/textune pairs, report the median ratio")
    a = p.parse_args()
    _quiet()
    if a.mode in single:
        single[a.mode]()
        return
    quick(a.n_train, pairs=a.pairs)
    if a.mode == "full":
        if torch.cuda.is_available():
            sys.path.insert(0, str(Path(__file__).parent))
            import gpu  # noqa: F401  (runs the GPU rows)

            gpu.main()
        else:
            print("no CUDA device: GPU rows skipped")


if __name__ == "__main__":
    main()
