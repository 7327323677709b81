"""Backbone features kept between runs, for the frozen strategy.

A frozen backbone gives a row the same features in every run, so a row's features are stored
under a key of its token ids, in a folder per backbone and setting (the weight files' names,
sizes and times, pooling, dtype, autocast, device type). A run computes only the rows no
earlier run has: ``compare --seeds``, ``tune``, ``curve`` and ``cv`` over the frozen strategy,
or a second ``train`` with another head or learning rate, compute each row once.

Layout: ``$TEXTUNE_HOME/features/<backbone key>/<uuid>.safetensors``, each shard holding
``keys`` (uint8, 16 bytes a row) and ``features`` (float32). Shards are written whole and
renamed into place, so concurrent runs never see half of one. The oldest shards go when the
folder passes ``TEXTUNE_FEATURE_CACHE_GB`` (default 2); ``TEXTUNE_FEATURE_CACHE=0`` turns the
cache off."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

VERSION = 1  # bump when pooling or feature computation changes what a key means
WEIGHT_SUFFIXES = (".json", ".safetensors", ".bin", ".pt", ".model", ".gguf")


def enabled() -> bool:
    return os.environ.get("TEXTUNE_FEATURE_CACHE", "1").lower() not in ("0", "off", "false", "no")


def max_bytes() -> int:
    try:
        gb = float(os.environ.get("TEXTUNE_FEATURE_CACHE_GB", "2"))
    except ValueError:
        gb = 2.0
    return int(gb * 2**30)


def backbone_key(source: str, model, device: torch.device, amp: torch.dtype | None) -> str | None:
    """What fixes a row's features besides its token ids: the backbone's files (name, size,
    modification time), the pooling, the weights' and autocast dtypes, the device type.
    None when ``source`` is not a local folder (nothing to tell its versions apart by)."""
    folder = Path(source)
    if not folder.is_dir():
        return None
    files = sorted((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns)
                   for p in folder.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    dtypes = sorted({str(p.dtype) for p in model.backbone.parameters()})
    ident = {"version": VERSION, "folder": str(folder.resolve()), "files": files,
             "pooling": model.pooling, "dtypes": dtypes, "amp": str(amp),
             "device": device.type, "class": type(model.backbone).__name__,
             "quantized": bool(getattr(model.backbone, "is_loaded_in_4bit", False))}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:24]


def row_keys(data) -> np.ndarray:
    """A 16-byte key per row of an ``Encoded`` split: a hash of its token (and segment) ids."""
    keys = np.empty((len(data), 16), dtype=np.uint8)
    tti = data.token_type_ids
    for i, ids in enumerate(data.input_ids):
        h = hashlib.blake2b(np.ascontiguousarray(ids, dtype=np.int64).tobytes(), digest_size=16)
        if tti is not None:
            h.update(b"|" + np.ascontiguousarray(tti[i], dtype=np.int64).tobytes())
        keys[i] = np.frombuffer(h.digest(), dtype=np.uint8)
    return keys


class FeatureCache:
    """The stored features of one backbone and setting (a folder of shards)."""

    def __init__(self, folder: Path, hidden: int):
        self.folder = folder
        self.hidden = hidden

    @classmethod
    def for_backbone(cls, source: str, model, device, amp) -> FeatureCache | None:
        if not enabled():
            return None
        key = backbone_key(source, model, device, amp)
        if key is None:
            return None
        from .hub import home

        return cls(home() / "features" / key, model.hidden_size)

    def _shards(self) -> list[Path]:
        return sorted(self.folder.glob("*.safetensors")) if self.folder.is_dir() else []

    def lookup(self, keys: np.ndarray) -> tuple[np.ndarray, torch.Tensor]:
        """Which rows are stored (a boolean mask) and their features, in row order."""
        from safetensors import safe_open

        want = {k.tobytes(): i for i, k in reversed(list(enumerate(keys)))}  # first row of a key
        found = np.zeros(len(keys), dtype=bool)
        feats = torch.empty(len(keys), self.hidden)
        for shard in self._shards():
            try:
                with safe_open(str(shard), framework="pt") as f:
                    stored = f.get_tensor("keys").numpy()
                    hit = [(j, want[k.tobytes()]) for j, k in enumerate(stored)
                           if k.tobytes() in want and not found[want[k.tobytes()]]]
                    if not hit:
                        continue
                    rows = f.get_tensor("features")
                    if rows.shape[1] != self.hidden:
                        continue
                    src, dst = (torch.as_tensor(x) for x in zip(*hit))
                    feats[dst] = rows[src].float()
                    found[dst.numpy()] = True
                os.utime(shard)  # recently used: evicted last
            except Exception as e:  # a damaged shard costs a recompute, never a wrong feature
                log.debug("feature cache: skipping %s (%s)", shard, e)
        # rows repeating a stored row's key share its features
        first = np.array([want[k.tobytes()] for k in keys])
        feats = feats[torch.as_tensor(first)]
        return found[first], feats

    def add(self, keys: np.ndarray, feats: torch.Tensor) -> None:
        """Store rows (one new shard, renamed into place), then trim the cache to its size."""
        from safetensors.torch import save_file

        if not len(keys):
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        name = uuid.uuid4().hex
        tmp = self.folder / f".{name}.tmp"
        save_file({"keys": torch.from_numpy(np.ascontiguousarray(keys)),
                   "features": feats.detach().float().cpu().contiguous()}, str(tmp))
        os.replace(tmp, self.folder / f"{name}.safetensors")
        trim(self.folder.parent, max_bytes())


def trim(root: Path, limit: int) -> None:
    """Delete the least recently used shards under ``root`` until it holds at most ``limit``."""
    shards = []
    for p in root.glob("*/*.safetensors"):
        try:
            st = p.stat()
        except OSError:
            continue
        shards.append((st.st_mtime, st.st_size, p))
    total = sum(s for _, s, _ in shards)
    for _, size, p in sorted(shards, key=lambda s: s[0]):
        if total <= limit:
            break
        p.unlink(missing_ok=True)
        total -= size
