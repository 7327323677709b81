"""Few labelled rows: SetFit's recipe (Tunstall et al., 2022). First the backbone is fine-tuned
contrastively on pairs of training texts, through the same loop as every strategy: each text
paired with one of its own class (target cosine similarity 1) and one of another (0), for
``iterations`` rounds; so 32 labelled texts give 1,280 training pairs. Then, as in the frozen
strategy, the tuned backbone is frozen and a head trains on its pooled features. The run saves
the tuned backbone and the head."""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..modeling import TextClassifier
from .base import freeze
from .frozen import Frozen
from .full import Full

log = logging.getLogger(__name__)
PAIR_DIR = "contrastive"
MAX_PAIRS = 20_000
"""Pairs at most (~1,250 steps of 16): the recipe is for few labels; with thousands of rows,
full fine-tuning reads every row for less."""


@dataclass
class PairData:
    """Text pairs drawn from an encoded split (``TrainData`` for the loop): ``a[i]`` and
    ``b[i]`` index its rows, ``labels[i]`` is the target cosine similarity (1 same class, 0
    not)."""

    enc: object  # data.Encoded
    a: np.ndarray
    b: np.ndarray
    labels: np.ndarray
    lengths = None  # (no length grouping: each batch is a random draw of pairs)

    def __len__(self) -> int:
        return len(self.a)

    def collate(self, idx) -> dict[str, torch.Tensor]:
        idx = np.asarray(idx)
        out = {f"a_{k}": v for k, v in self.enc.collate(self.a[idx]).items() if k != "labels"}
        out.update({f"b_{k}": v for k, v in self.enc.collate(self.b[idx]).items()
                    if k != "labels"})
        out["labels"] = torch.from_numpy(self.labels[idx])
        return out


def make_pairs(labels: np.ndarray, iterations: int, seed: int, max_pairs: int = MAX_PAIRS
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """SetFit's pairs: for each round and each row, a partner of its class (where the class has
    another row) and one of another class. Shuffled; at most ``max_pairs`` (a random subset).
    Multi-label (``labels`` a 0/1 matrix): see :func:`make_tag_pairs`."""
    if labels.ndim == 2:
        return make_tag_pairs(labels, iterations, seed, max_pairs)
    rng = np.random.default_rng(seed)
    by_class = {c: np.flatnonzero(labels == c) for c in np.unique(labels)}
    other_class = {c: np.flatnonzero(labels != c) for c in by_class}
    a, b, target = [], [], []
    for _ in range(iterations):
        for i, c in enumerate(labels):
            same = by_class[c]
            if len(same) > 1:
                a.append(i), b.append(_other(rng, same, i)), target.append(1.0)
            others = other_class[c]
            a.append(i), b.append(others[rng.integers(len(others))]), target.append(0.0)
    return _shuffled(rng, a, b, target, max_pairs)


def make_tag_pairs(tags: np.ndarray, iterations: int, seed: int, max_pairs: int = MAX_PAIRS
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs of multi-label rows (``tags``: ``[n, n_tags]`` 0/1). For each round and each row:
    a partner that has one of its tags (drawn at random; a row without tags: a partner without
    tags) and a partner that shares none of them. The target is the pairs' tag-set overlap
    |A ∩ B| / |A ∪ B| (two untagged rows: 1), so a text that has one of two tags is pulled
    half-way to the other; with one label a row this is SetFit's 1 and 0."""
    rng = np.random.default_rng(seed)
    Y = tags > 0.5
    Yi = Y.astype(np.int32)
    size = Yi.sum(1)
    with_tag = [np.flatnonzero(Y[:, t]) for t in range(Y.shape[1])]
    untagged, tagged = np.flatnonzero(size == 0), np.flatnonzero(size > 0)
    a, b, target = [], [], []
    for i in range(len(Y)):
        inter = Yi @ Yi[i]  # (a row at a time: no n x n matrix)
        union = size + size[i] - inter
        overlap = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
        own = np.flatnonzero(Y[i])
        apart = np.flatnonzero(inter == 0) if len(own) else tagged
        for _ in range(iterations):
            near = with_tag[own[rng.integers(len(own))]] if len(own) else untagged
            if len(near) > 1:
                j = _other(rng, near, i)
                a.append(i), b.append(j), target.append(overlap[j])
            if len(apart):
                j = apart[rng.integers(len(apart))]
                a.append(i), b.append(j), target.append(overlap[j])
    return _shuffled(rng, a, b, target, max_pairs)


def _other(rng, rows: np.ndarray, i: int) -> int:
    """A row of ``rows`` (which hold ``i``) other than ``i``, each equally likely: a draw from
    all but the last, ``i`` standing for the last."""
    j = rows[rng.integers(len(rows) - 1)]
    return j if j != i else rows[-1]


def _shuffled(rng, a, b, target, max_pairs):
    order = rng.permutation(len(a))[:max_pairs]
    return (np.asarray(a, dtype=np.int64)[order], np.asarray(b, dtype=np.int64)[order],
            np.asarray(target, dtype=np.float32)[order])


class SimilarityLoss(nn.Module):
    """The backbone's pooled features of both texts of a pair: mean squared error between their
    cosine similarity and the target (SetFit's CosineSimilarityLoss)."""

    def __init__(self, model: TextClassifier):
        super().__init__()
        self.model = model

    def forward(self, labels: torch.Tensor, **batch) -> torch.Tensor:
        ea, eb = (self.model.features(**{k[2:]: v for k, v in batch.items() if k[0] == side})
                  for side in "ab")
        return F.mse_loss(F.cosine_similarity(ea.float(), eb.float()), labels.float())


class Contrastive(Frozen):
    name = "contrastive"
    default_lr = 1e-3  # the head's (as frozen); the backbone's is ``body_lr``

    def __init__(self, iterations: int = 20, body_lr: float = 2e-5, body_epochs: int = 1,
                 **options):
        super().__init__(iterations=iterations, body_lr=body_lr, body_epochs=body_epochs,
                         **options)

    def setup(self, model: TextClassifier) -> TextClassifier:
        return model  # (the backbone trains first, in prepare_backbone; then it is frozen)

    def prepare_backbone(self, model: TextClassifier, train, args, accelerator, out: Path,
                         progress: bool, resume: bool) -> dict:
        """The contrastive phase: pairs of ``train`` (an ``Encoded`` split; one label a row, or
        multi-label tags) through :func:`textune.loop.fit`; then the backbone is frozen.
        Returns what it did, for the run's metrics."""
        from .. import loop

        if resume:
            raise UserError(f"--resume: a {self.name} run restarts; train it again")
        o = self.options
        a, b, target = make_pairs(train.labels, o["iterations"], args.seed)
        n_texts = len(train)
        if n_texts > 2000:
            log.info("--strategy contrastive is SetFit's recipe for few labelled rows; with "
                     "%d it trains on %d of its pairs: full or frozen may serve better",
                     n_texts, len(a))
        pair_args = dataclasses.replace(args, epochs=o["body_epochs"], batch_size=16,
                                        grad_accum=1, max_steps=None, patience=None,
                                        compile=False, save_every=0, warmup_ratio=0.1)
        log.info("contrastive phase: %d pairs of %d training texts, %d epoch(s) of %d steps, "
                 "backbone lr %.1e", len(a), n_texts, o["body_epochs"], -(-len(a) // 16),
                 o["body_lr"])
        t0 = time.perf_counter()
        folder = out / PAIR_DIR
        folder.mkdir(parents=True, exist_ok=True)
        model.to(accelerator.device)
        # the head has no part in this phase (its parameters would get no gradient, which
        # DistributedDataParallel refuses with several processes): it waits, untouched
        freeze(model.head)
        loop.fit(SimilarityLoss(model), PairData(train, a, b, target), None, pair_args,
                 lr=o["body_lr"], accelerator=accelerator, run_dir=folder,
                 evaluate=lambda _: {}, on_best=lambda: None, progress=progress,
                 module_returns_loss=True)
        model.head.requires_grad_(True)
        shutil.rmtree(folder / loop.CKPT, ignore_errors=True)  # (history.jsonl stays)
        freeze(model.backbone)
        model.backbone.eval()
        return {"pairs": len(a), "seconds": round(time.perf_counter() - t0, 2)}

    def save(self, model: TextClassifier, run_dir: Path) -> None:
        Full.save(self, model, run_dir)

    def saved_backbone(self, run_dir: Path) -> Path | None:
        return Full.saved_backbone(self, run_dir)

