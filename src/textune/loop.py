"""The one training loop, shared by every strategy (and by continued pretraining).

Reads top to bottom: batches -> forward -> loss -> backward -> (accumulate) -> step, with a
validation pass per epoch, best-checkpoint keeping, early stopping and resumable checkpoints.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from . import cpu
from .config import TrainArgs
from .data import LADDER, batch_indices, padded_width
from .errors import UserError
from .hub import sha256_of
from .modeling import classification_loss

log = logging.getLogger(__name__)
CKPT = "checkpoint"


class TrainData(Protocol):
    labels: np.ndarray | None

    def __len__(self) -> int: ...
    @property
    def lengths(self) -> np.ndarray | None: ...
    def collate(self, idx: list[int]) -> dict[str, torch.Tensor]: ...


@dataclass
class FeatureData:
    """Pooled backbone features computed once (the frozen strategy trains its head on these)."""

    features: torch.Tensor
    labels: np.ndarray | None
    from_cache: int = 0
    """Rows whose features were read from the cache of earlier runs (featcache)."""
    lengths = None

    def __len__(self) -> int:
        return self.features.shape[0]

    def __post_init__(self):
        self._labels_t = None if self.labels is None else \
            torch.as_tensor(self.labels, device=self.features.device)

    def collate(self, idx: list[int] | torch.Tensor) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(idx, device=self.features.device)
        out = {"features": self.features[idx]}
        if self._labels_t is not None:
            out["labels"] = self._labels_t[idx]
        return out

    def on_device(self, batches: list[list[int]]) -> list[torch.Tensor]:
        """An epoch's batches as slices of one index tensor on the features' device: one copy
        per epoch instead of a blocking host-to-device copy per step."""
        flat = torch.as_tensor(np.concatenate(batches), device=self.features.device)
        return list(torch.split(flat, [len(b) for b in batches]))


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based)."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return max(0.0, 1.0 - progress)


def param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases and norm weights (any parameter with fewer than 2 dims)."""
    decay, no_decay = [], []
    for _, p in module.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def adamw(groups: list[dict], lr: float) -> torch.optim.Optimizer:
    """Fused AdamW (one kernel over all parameters) on GPU and CPU: 3.6x faster steps than the
    foreach version on a 2-core CPU for minilm-l6's 22.7M parameters. Falls back where a
    parameter's device or dtype has no fused kernel."""
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8)


def native_bf16(device_type: str) -> bool:
    """bf16 matmuls in hardware: a GPU that has them, or a CPU with AVX512-BF16 / AMX (where
    bf16 autocast roughly halves step time; elsewhere it is emulated and slower).
    ``TEXTUNE_CPU_BF16=0`` turns it off on CPUs."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device_type == "cpu" and os.environ.get("TEXTUNE_CPU_BF16", "1") != "0":
        probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(getattr(torch.cpu, p, lambda: False)() for p in probes)
    return False


def resolve_precision(precision: str) -> str:
    """``auto`` -> bf16 mixed precision where the hardware does bf16 natively, else fp32."""
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if precision == "auto":
        return "bf16" if native_bf16(device_type) else "fp32"
    if precision == "fp16" and device_type != "cuda":
        raise UserError("--precision fp16 needs a CUDA GPU; use bf16 or fp32 on CPU")
    return precision


def process_state():
    """This process's place among those `textune train --num-processes` started (or the only
    one): accelerate's shared state, the one the Accelerator built later joins."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


def build_accelerator(precision: str):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    precision = resolve_precision(precision)
    # Accelerate keeps one process-wide state: without a reset, a second run in the same process
    # (compare, notebooks, tests) would silently inherit the first run's mixed precision.
    AcceleratorState._reset_state()
    return Accelerator(mixed_precision={"fp32": "no"}.get(precision, precision))


def amp_dtype(accelerator) -> torch.dtype | None:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(str(accelerator.mixed_precision))


@dataclass
class LoopState:
    epoch: int = 0
    batch_in_epoch: int = 0
    step: int = 0
    best_metric: float = -math.inf
    best_epoch: int = -1
    bad_epochs: int = 0
    samples: int = 0
    train_seconds: float = 0.0
    stopped_early: bool = False
    history: list = field(default_factory=list)


INFER_TOKENS = 32768
"""GPU inference batches hold up to this many tokens (BERT-base forward: a few hundred MB)."""


def gpu_batching(device: torch.device) -> bool:
    """Whether inference batches are shaped for a GPU (token budgets, few shapes)."""
    return device.type == "cuda"


def inference_pad(device: torch.device) -> int:
    """How inference batch widths are rounded up (``data.padded_width``). On a GPU, the
    geometric ``LADDER``: every new batch shape costs eager kernels a first-time price (kernel
    selection, allocator growth; warm predict over 4,096 texts 0.84 s, the same texts in shapes
    not seen before 3-5 s on an H100), so inputs should meet few shapes. ``TEXTUNE_INFER_PAD=N``
    rounds to multiples of N instead (8 pads least, 64 gives fewest shapes). On a CPU, no
    rounding: every padded token costs (predict over 4,000 rt-polarity sentences on 2 cores:
    26.8 s, against 31.2 s with multiples of 8)."""
    if not gpu_batching(device):
        return 1
    value = os.environ.get("TEXTUNE_INFER_PAD")
    if value is None:
        return LADDER
    if not value.isdigit() or int(value) < 1:
        raise UserError(f"TEXTUNE_INFER_PAD={value!r}: set a whole number >= 1 (8 or 64), or "
                        "unset it (a geometric ladder of widths)")
    return int(value)


def inference_batches(data: TrainData, batch_size: int, device: torch.device) -> list[list[int]]:
    """Longest first. On a GPU, token-budget batches of up to ``INFER_TOKENS`` tokens and
    8 x ``batch_size`` rows: short texts share big batches, so the card is not left waiting
    on Python between small ones; on CPU, ``batch_size`` rows (bigger gains nothing there)."""
    if gpu_batching(device) and data.lengths is not None:
        return batch_indices(data.lengths, len(data), 8 * batch_size, shuffle=False,
                             max_tokens=INFER_TOKENS, multiple=inference_pad(device))
    return batch_indices(data.lengths, len(data), batch_size, shuffle=False)


def inference_rows(rows: int, width: int, batch_size: int) -> int:
    """Rows a GPU inference batch is scored as: a short batch (the last of an input) is filled
    up to the next power of two, at most the rows of a full batch of its width, so that inputs
    of any size (a server's requests) meet a bounded set of shapes."""
    full = max(rows, min(8 * batch_size, INFER_TOKENS // width))
    return min(1 << (rows - 1).bit_length(), full)


def varied_shape_attention(device: torch.device):
    """Attention kernels for batches whose shapes keep changing (length-grouped and token-budget
    batches): on a GPU, SDPA's flash and memory-efficient kernels but not cuDNN's, which builds
    an execution plan for every new shape. Measured on an H100 with BERT-base, same call: eager
    training 87k -> 167k tokens/s (batches of 32) and 169k -> 345k (token budgets); predict on
    4,096 new texts 4.6 s -> 4.2 s. ``TEXTUNE_CUDNN_ATTENTION=1`` allows it again."""
    if device.type != "cuda" or os.environ.get("TEXTUNE_CUDNN_ATTENTION") == "1":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                        SDPBackend.MATH])


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Host tensors to ``device``; to a GPU through pinned memory, without blocking the host."""
    if device.type != "cuda":
        return {k: v.to(device) for k, v in batch.items()}
    return {k: (v.pin_memory() if v.device.type == "cpu" else v).to(device, non_blocking=True)
            for k, v in batch.items()}


def inference_outputs(fn, data: TrainData, batches: list[list[int]], device: torch.device,
                      amp: torch.dtype | None = None, progress: bool = False, desc: str = "eval",
                      batch_size: int | None = None):
    """``(rows, fn(**batch))`` for each batch: copied to ``device``, labels dropped, under the
    run's autocast and the attention kernels for changing shapes. The inference loop that
    evaluation, prediction and feature caching share (callers set inference mode). Given the
    ``batch_size`` the batches were made with, GPU batches are filled up to ``inference_rows``
    with copies of their first row, whose outputs are dropped."""
    from tqdm.auto import tqdm

    pad = inference_pad(device)
    lengths = data.lengths
    fill = batch_size is not None and lengths is not None and gpu_batching(device)
    for idx in tqdm(batches, desc=desc, disable=not progress, leave=False, mininterval=1):
        rows = idx
        if fill:
            width = padded_width(int(lengths[idx].max()), pad)
            rows = list(idx) + [idx[0]] * (inference_rows(len(idx), width, batch_size) - len(idx))
        batch = to_device(_collate(data, rows, pad), device)
        batch.pop("labels", None)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None), \
                varied_shape_attention(device):
            out = fn(**batch)
        yield idx, out[:len(idx)] if len(rows) > len(idx) else out


@torch.inference_mode()
def predict_logits(module: nn.Module, data: TrainData, batch_size: int, device: torch.device,
                   amp: torch.dtype | None = None, progress: bool = False,
                   desc: str = "eval", shard: bool = True) -> np.ndarray:
    """Logits for every row, in the data's order (batches sorted by length for speed). In a
    run of several processes each scores a share of the batches and all get every row
    (``shard=False``: this process scores them all, as a reloaded ``Classifier`` does)."""
    was_training = module.training
    module.eval()
    batches = inference_batches(data, batch_size, device)
    dist = shard and torch.distributed.is_available() and torch.distributed.is_initialized()
    world = torch.distributed.get_world_size() if dist else 1
    if world > 1:  # each process scores its share of the batches; gathered below
        batches = batches[torch.distributed.get_rank()::world]
    with cpu.autocast_weights(module, device, amp):
        out = [(idx, logits.float()) for idx, logits in
               inference_outputs(module, data, batches, device, amp, progress, desc, batch_size)]
    module.train(was_training)
    parts = [(idx, logits.cpu().numpy()) for idx, logits in out]  # one host copy per batch
    if world > 1:
        gathered: list = [None] * world
        torch.distributed.all_gather_object(gathered, parts)
        parts = [p for g in gathered for p in g]
    n_labels = parts[0][1].shape[-1]
    result = np.zeros((len(data), n_labels), dtype=np.float32)
    seen = np.zeros(len(data), dtype=np.int64)
    for idx, logits in parts:
        result[idx] = logits
        seen[idx] += 1
    assert (seen == 1).all(), "every evaluation row is scored exactly once"
    return result


def fit(module: nn.Module, train_data: TrainData, val_data: TrainData | None, args: TrainArgs, *,
        lr: float, accelerator, run_dir: Path, evaluate: Callable[[np.ndarray], dict],
        on_best: Callable[[], None], class_weights: torch.Tensor | None = None,
        progress: bool = True, resume: bool = False,
        module_returns_loss: bool = False, soft_targets: bool = False) -> LoopState:
    """Train ``module`` on ``train_data``; validate each epoch and call ``on_best`` on improvement.

    Classification modules return logits (cross-entropy against the batch's ``labels``); with
    ``module_returns_loss`` the module takes ``labels`` itself and returns the loss (pretraining).

    ``evaluate`` turns validation logits into a metrics dict with ``macro_f1`` (model selection).
    ``soft_targets``: the training labels are rows of class probabilities (distillation).
    """
    from tqdm.auto import tqdm

    # --batch-size is rows per optimizer step over all processes: every process takes its
    # share of each global batch, so N processes follow the single-process run's batches
    world, rank = accelerator.num_processes, accelerator.process_index
    pad_multiple = args.padding_multiple(accelerator.device.type)
    plans: dict[int, list[list[int]]] = {}

    def epoch_batches(e: int) -> list[list[int]]:
        if e not in plans:
            plans.clear()  # keep one epoch's plan at a time
            plans[e] = _global_batches(train_data, args, e, world, pad_multiple)
        return plans[e]

    def epoch_steps(e: int) -> int:  # token-budget batch counts differ a little per epoch
        return -(-len(epoch_batches(e if args.batch_tokens else 0)) // args.grad_accum)

    if args.max_steps is None:
        epochs = args.epochs
        total = sum(epoch_steps(e) for e in range(epochs))
    else:
        total, epochs, covered = args.max_steps, 0, 0
        while covered < total:
            covered += epoch_steps(epochs)
            epochs += 1
    warmup = int(args.warmup_ratio * total)
    # ~100 points for the loss curve, but no more often than needed: .item() is a device sync
    log_every = args.log_every or max(1, min(20, total // 100))

    groups = param_groups(module, args.weight_decay)
    optimizer = adamw(groups, lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total, warmup, args.schedule))
    module, optimizer = accelerator.prepare(module, optimizer)
    clipped = [p for p in module.parameters() if p.requires_grad]
    step_module = compiled(module) if args.compile else module
    if class_weights is not None:
        class_weights = class_weights.to(accelerator.device)

    state = LoopState()
    if resume:
        state = load_checkpoint(run_dir, accelerator.unwrap_model(module), optimizer, schedule)
        log.info("resuming at epoch %d, batch %d (step %d)", state.epoch + 1,
                 state.batch_in_epoch, state.step)
        _truncate_history(run_dir / "history.jsonl", state.step, rank)

    bar = tqdm(total=total, initial=state.step, desc="train", disable=not progress or rank != 0,
               mininterval=1, unit="step", dynamic_ncols=True)
    history_path = run_dir / "history.jsonl"
    module.train()
    # eager batches change shape all the time: keep cuDNN's per-shape attention plans out (H100
    # BERT-base: 1.9-2x the eager tokens/s); compiled graphs keep what they were measured with
    def attention():  # (a fresh context each step: sdpa_kernel's is single-use)
        return varied_shape_attention(accelerator.device) if not args.compile else contextlib.nullcontext()

    loss_of = functools.partial(classification_loss, weight=class_weights, soft=soft_targets)
    graph = GraphedStep.build(module, train_data, args, accelerator, clipped, loss_of, optimizer)
    t_start = time.perf_counter() - state.train_seconds
    running = torch.zeros((), device=accelerator.device)
    running_n = 0
    done = state.step >= total
    safe = (state.epoch, state.batch_in_epoch)
    # (compiled graphs generate their own dropout masks)
    fast = cpu.fast_training(accelerator.unwrap_model(module), accelerator.device,
                             distributed=world > 1, amp=amp_dtype(accelerator)) \
        if not args.compile else cpu.FastPath()
    try:
        for epoch in range(state.epoch, epochs):
            if done:
                break
            batches = [b[rank::world] for b in epoch_batches(epoch)]
            n_batches = len(batches)
            if hasattr(train_data, "on_device"):  # cached features: index them on the device
                batches = train_data.on_device(batches)
            start = state.batch_in_epoch if epoch == state.epoch else 0
            for i in range(start, n_batches):
                group_start = (i // args.grad_accum) * args.grad_accum
                group = min(args.grad_accum, n_batches - group_start)  # last group: short
                last_in_group = i + 1 == group_start + group
                graphed = graph is not None and len(batches[i]) == graph.rows
                if graphed:
                    loss = graph.step(batches[i])  # forward, backward, clip, update: one replay
                else:
                    if graph is not None:  # the graph leaves its last gradients behind
                        optimizer.zero_grad(set_to_none=False)
                    batch = to_device(_collate(train_data, batches[i], pad_multiple),
                                      accelerator.device)
                    labels = batch.pop("labels")
                    sync = accelerator.no_sync(module) if not last_in_group and world > 1 \
                        else contextlib.nullcontext()
                    with fast.low_weights():
                        with sync, accelerator.autocast(), attention():
                            if module_returns_loss:
                                loss = step_module(**batch, labels=labels)
                            else:
                                loss = loss_of(step_module(**batch), labels)
                        accelerator.backward(loss / group)
                running += loss.detach()
                running_n += 1
                state.samples += len(batches[i]) * world  # equal shares (+-1 row)
                state.batch_in_epoch = i + 1
                if not last_in_group:
                    continue
                if not graphed:
                    # torch's clip over a fixed list, not Accelerate's (its wrapper costs ~0.5
                    # ms of Python a step: package probes, module walks); fp16 grads are
                    # unscaled first, as it does
                    if args.max_grad_norm and accelerator.scaler is not None:
                        accelerator.unscale_gradients()
                    fast.step(optimizer, clipped, args.max_grad_norm)
                schedule.step()  # (fills the graph's learning-rate tensors in place)
                if graph is None:
                    optimizer.zero_grad(set_to_none=True)
                state.step += 1
                bar.update(1)
                if state.step % log_every == 0 or state.step == total:
                    # .item() syncs with the device: only when logging
                    loss_val = (running / max(1, running_n)).item()
                    running.zero_()
                    running_n = 0
                    elapsed = time.perf_counter() - t_start
                    rec = {"step": state.step, "epoch": epoch + (i + 1) / n_batches,
                           "loss": round(loss_val, 5), "lr": float(schedule.get_last_lr()[0]),
                           "samples_per_second": round(state.samples / elapsed, 2)}
                    bar.set_postfix(loss=f"{loss_val:.4f}", lr=f"{rec['lr']:.2e}",
                                    sps=f"{rec['samples_per_second']:.1f}", refresh=False)
                    _append(history_path, rec, rank)
                if args.save_every and state.step % args.save_every == 0:
                    state.train_seconds = time.perf_counter() - t_start
                    save_checkpoint(run_dir, accelerator, module, optimizer, schedule, state)
                if state.step >= total:
                    done = True
                    break
            state.epoch, state.batch_in_epoch = epoch + 1, 0
            state.train_seconds = time.perf_counter() - t_start
            if val_data is not None:
                # (the unwrapped module: a DDP forward syncs buffers with the other processes,
                # which deadlocks once one of them has scored its share and waits to gather)
                logits = predict_logits(accelerator.unwrap_model(module), val_data,
                                        args.eval_batch_size, accelerator.device,
                                        amp_dtype(accelerator))
                m = evaluate(logits)
                rec = {"epoch": epoch + 1, "step": state.step, "val_accuracy": m["accuracy"],
                       "val_macro_f1": m["macro_f1"], "train_seconds": round(state.train_seconds, 2)}
                state.history.append(rec)
                _append(history_path, rec, rank)
                log.info("epoch %d: val accuracy %.4f, macro-F1 %.4f", epoch + 1, m["accuracy"],
                         m["macro_f1"])
                if m["macro_f1"] > state.best_metric:
                    state.best_metric, state.best_epoch, state.bad_epochs = m["macro_f1"], epoch + 1, 0
                    on_best()  # every process keeps the best weights; only the main one saves
                else:
                    state.bad_epochs += 1
            else:
                on_best()  # no validation: the last epoch is the model
                state.best_epoch = epoch + 1
            save_checkpoint(run_dir, accelerator, module, optimizer, schedule, state)
            t_start = time.perf_counter() - state.train_seconds  # exclude eval + checkpoint time
            if args.patience and state.bad_epochs >= args.patience:
                log.info("early stop: no macro-F1 gain for %d epochs", args.patience)
                state.stopped_early = True
                break
    except KeyboardInterrupt:
        # Ctrl-C / SIGINT: checkpoint at the last finished optimizer step, then stop cleanly
        bar.close()
        state.epoch, state.batch_in_epoch = safe
        state.train_seconds = time.perf_counter() - t_start
        save_checkpoint(run_dir, accelerator, module, optimizer, schedule, state)
        if accelerator.is_main_process:
            job = "pretrain" if (run_dir / "pretrain_args.json").exists() else "train"
            log.warning("interrupted at step %d: checkpoint saved; continue with "
                        "`textune %s --resume %s`", state.step, job, run_dir)
        raise
    finally:
        fast.restore()
    bar.close()
    return state


class GraphedStep:
    """One whole training step on a fixed-size batch of cached features — forward, backward,
    gradient clipping and the AdamW update — captured once as a CUDA graph, replayed per step.

    The frozen strategy's step is a small head on a batch of feature vectors: microseconds of
    GPU work behind ~2 ms of Python launching ~80 kernels one by one; a replay launches them
    at once (H100, 5 epochs of an MLP head on 8,192 rows: 4.1 s in the ordinary loop, 0.2 s
    replayed). The learning rates become device tensors that the scheduler fills in place, so
    the graph follows the schedule. A last, smaller batch runs the ordinary way."""

    def __init__(self, module, data: FeatureData, rows: int, clipped, max_norm, loss_of,
                 optimizer):
        self.rows, self.data = rows, data
        dev = data.features.device
        self.x = torch.zeros(rows, data.features.shape[1], device=dev)
        labels = data.collate([0])["labels"]  # (class indices, or multi-label 0/1 rows)
        self.y = torch.zeros((rows, *labels.shape[1:]), dtype=labels.dtype, device=dev)
        inner = getattr(optimizer, "optimizer", optimizer)  # under Accelerate's wrapper
        for g in inner.param_groups:
            g["lr"] = torch.tensor(float(g["lr"]), device=dev)
            g["capturable"] = True

        def body():
            loss = loss_of(module(features=self.x), self.y)
            loss.backward()
            if max_norm:
                torch.nn.utils.clip_grad_norm_(clipped, max_norm, foreach=True)
            return loss.detach()

        side = torch.cuda.Stream()  # warm-up (cuBLAS workspaces, autograd) off the main stream
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                body()
        torch.cuda.current_stream().wait_stream(side)
        for p in clipped:
            p.grad.zero_()
        if not inner.state:
            # optimizer state must exist before capture, or its zero-initialisation would be
            # captured and replayed every step: one update at learning rate 0 on zero gradients
            # creates it without moving a weight, then its step counters go back to 0
            lrs = [g["lr"].item() for g in inner.param_groups]
            for g in inner.param_groups:
                g["lr"].fill_(0.0)
            inner.step()
            for g, lr in zip(inner.param_groups, lrs):
                g["lr"].fill_(lr)
            for st in inner.state.values():
                st["step"].zero_()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            for p in clipped:
                p.grad.zero_()
            self.loss = body()
            inner.step()

    @classmethod
    def build(cls, module, data, args: TrainArgs, accelerator, clipped, loss_of, optimizer):
        """A graph where it is safe and pays: cached features on a GPU, one process, no
        accumulation, no fp16 loss scaling, no compilation, AdamW's fused kernel; else None."""
        inner = getattr(optimizer, "optimizer", optimizer)
        ok = (isinstance(data, FeatureData) and data.features.device.type == "cuda"
              and accelerator.num_processes == 1 and args.grad_accum == 1
              and accelerator.scaler is None and not args.compile and len(data) >= args.batch_size
              and all(g.get("fused") for g in inner.param_groups)
              and os.environ.get("TEXTUNE_CUDA_GRAPHS", "1") != "0")
        if not ok:
            return None
        try:
            return cls(module, data, args.batch_size, clipped, args.max_grad_norm, loss_of,
                       optimizer)
        except RuntimeError as e:  # capture unsupported here: the ordinary step still works
            log.warning("CUDA graph capture failed (%s); training without it", str(e)[:200])
            for p in clipped:
                p.grad = None
            return None

    def step(self, idx: torch.Tensor) -> torch.Tensor:
        """One training step on the rows ``idx`` (a full batch); returns the loss tensor."""
        torch.index_select(self.data.features, 0, idx, out=self.x)
        torch.index_select(self.data._labels_t, 0, idx, out=self.y)
        self.graph.replay()
        return self.loss


def compiled(module: nn.Module) -> nn.Module:
    """``torch.compile`` with Inductor's caches kept in ``$TEXTUNE_HOME/compile-cache`` (unless
    ``TORCHINDUCTOR_CACHE_DIR`` is set): the next run of the same model and shapes reuses the
    compiled kernels instead of paying the whole warm-up again (default: /tmp, lost on reboot).
    Lengths are padded to multiples of 64, so few shapes are ever compiled."""
    from .hub import home

    try:  # torch writes its default into the variable the first time it looks: ours to replace
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir

        torch_default = os.path.abspath(default_cache_dir())
    except (ImportError, AttributeError):
        torch_default = None
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR") in (None, torch_default):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(home() / "compile-cache")
    return torch.compile(module)


def _global_batches(data: TrainData, args: TrainArgs, epoch: int, world: int,
                    multiple: int = 8) -> list[list[int]]:
    tokens = (args.batch_tokens or None) if data.lengths is not None else None  # not features
    batches = batch_indices(data.lengths, len(data), tokens or args.batch_size, shuffle=True,
                            seed=args.seed + epoch, max_tokens=tokens, multiple=multiple)
    if world > 1 and len(batches) > 1:
        # a batch too small to give every process a row (the short one at a length pool's end,
        # wherever the shuffle put it) joins the batch before it
        out: list[list[int]] = []
        for b in batches:
            if out and (len(b) < world or len(out[-1]) < world):
                out[-1] = out[-1] + b
            else:
                out.append(b)
        batches = out
    return batches


def _collate(data: TrainData, idx: list[int], multiple: int) -> dict[str, torch.Tensor]:
    if data.lengths is None:  # cached features: nothing to pad
        return data.collate(idx)
    return data.collate(idx, multiple)  # type: ignore[call-arg]


def _truncate_history(path: Path, step: int, rank: int) -> None:
    """Drop log lines written after the checkpoint by the interrupted process."""
    if rank != 0 or not path.exists():
        return
    keep = [x for x in path.read_text().splitlines() if x.strip()
            and json.loads(x).get("step", 0) <= step]
    path.write_text("".join(x + "\n" for x in keep))


def _append(path: Path, rec: dict, rank: int) -> None:
    if rank == 0:
        with open(path, "a") as f:
            f.write(json.dumps(rec) + "\n")


# ---------------------------------------------------------------------------------------------
# checkpoints: written to a temporary folder, then swapped in (a crash never leaves half a one)


def save_checkpoint(run_dir: Path, accelerator, module, optimizer, schedule,
                    state: LoopState) -> None:
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return
    model = accelerator.unwrap_model(module)
    tmp = run_dir / f"{CKPT}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    trainable = {n: p.detach().contiguous().cpu() for n, p in model.named_parameters()
                 if p.requires_grad}
    save_file(trainable, str(tmp / "trainable.safetensors"))
    rng = {"torch": torch.get_rng_state(),
           "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    torch.save({"optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                "rng": rng}, tmp / "optim.pt")
    (tmp / "state.json").write_text(json.dumps(asdict(state)))
    # checksums of every file: a truncated or altered checkpoint is named, never loaded
    manifest = {f.name: sha256_of(f) for f in sorted(tmp.iterdir())}
    (tmp / "COMPLETE").write_text(json.dumps(manifest, indent=1) + "\n")
    final, old = run_dir / CKPT, run_dir / f"{CKPT}.old"
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)


def load_checkpoint(run_dir: Path, model: nn.Module, optimizer, schedule) -> LoopState:
    ckpt = run_dir / CKPT
    if not ckpt.exists() and (run_dir / f"{CKPT}.old").exists():
        ckpt = run_dir / f"{CKPT}.old"  # crashed between the two renames
    if not (ckpt / "COMPLETE").exists():
        raise UserError(f"--resume {run_dir}: no complete checkpoint in it ({ckpt} is missing "
                        f"or partial); start a new run")
    try:
        manifest = json.loads((ckpt / "COMPLETE").read_text())
    except ValueError:
        manifest = None
    if not isinstance(manifest, dict) or not manifest:
        raise UserError(f"--resume {run_dir}: {ckpt / 'COMPLETE'} is unreadable; the checkpoint "
                        f"is corrupt, start a new run")
    for name, digest in manifest.items():
        f = ckpt / name
        if not f.exists() or sha256_of(f) != digest:
            raise UserError(f"--resume {run_dir}: checkpoint file {f} is "
                            f"{'missing' if not f.exists() else 'corrupt (checksum mismatch)'}; "
                            f"start a new run")
    try:
        trainable = load_file(str(ckpt / "trainable.safetensors"))
        extra = torch.load(ckpt / "optim.pt", weights_only=False)
        state = LoopState(**json.loads((ckpt / "state.json").read_text()))
    except Exception as e:
        raise UserError(f"--resume {run_dir}: checkpoint {ckpt} is corrupt "
                        f"({type(e).__name__}); start a new run") from None
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    if set(trainable) != names:
        raise UserError(f"--resume {run_dir}: checkpoint does not match the model (different "
                        f"strategy or model?)")
    model.load_state_dict(trainable, strict=False)
    optimizer.load_state_dict(extra["optimizer"])
    schedule.load_state_dict(extra["schedule"])
    torch.set_rng_state(extra["rng"]["torch"])
    if extra["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(extra["rng"]["cuda"])
    return state
