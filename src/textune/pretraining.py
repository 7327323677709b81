"""Continued pretraining of an encoder on raw text: masked LM, optionally with next-sentence
prediction, from a checkpoint or from scratch (a WordPiece vocabulary learned from the corpus and
a small BERT). Runs on the same loop as ``train`` (:func:`textune.loop.fit`).

Corpus -> streamed documents (one per file, or per blank-line-separated block) -> sentences ->
token ids in a memory-mapped cache (``tokens.bin`` + sentence / document boundaries), built once
per corpus and tokenizer. Training examples are built from the cache on the fly, so memory does
not grow with the corpus.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .data import padded_width
from .env import environment
from .errors import UserError
from .modeling import remote_code, trust_remote_code

log = logging.getLogger(__name__)

SIZES = {"tiny": (2, 128, 2), "mini": (4, 256, 4), "small": (4, 512, 8)}  # layers, hidden, heads
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


@dataclass
class PretrainArgs:
    corpus: str = ""
    model: str | None = None
    trust_remote_code: bool = False
    init: str = "pretrained"
    """pretrained (continue --model) or scratch (learn a vocabulary, build a small BERT)."""
    objective: str = "mlm"
    whole_word_masking: bool = False
    mlm_probability: float = 0.15
    vocab_size: int = 8000
    size: str = "mini"
    layers: int | None = None
    hidden: int | None = None
    heads: int | None = None
    max_length: int = 128
    eval_fraction: float = 0.02
    """Share of documents held out for the before/after MLM loss."""
    max_eval_examples: int = 512
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 32
    lr: float | None = None
    """Default: 5e-4 from scratch, 5e-5 when continuing a checkpoint."""
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    grad_accum: int = 1
    precision: str = "auto"
    save_every: int = 0
    seed: int = 0
    out: str = ""


# ---------------------------------------------------------------------------------------------
# corpus: documents and sentences

_SENT_END = re.compile(
    r"[。！？；…!?]+[”’」』）)\"']*"            # Chinese (and ! ?) ends, closing quotes kept
    r"|(?<=[.])[\"')\]]*(?=\s+[\"'(\[A-Z0-9])"  # English full stop before a capital / digit
)


def split_sentences(text: str) -> list[str]:
    """Sentences of one paragraph: after 。！？；… (with closing quotes) and English . ! ?"""
    out, start = [], 0
    for m in _SENT_END.finditer(text):
        end = m.end()
        piece = text[start:end].strip()
        if piece:
            out.append(piece)
        start = end
    tail = text[start:].strip()
    if tail:
        out.append(tail)
    return out


def corpus_files(spec: str) -> list[Path]:
    from . import hub

    if spec in hub.CATALOG:
        if hub.CATALOG[spec].kind != "corpus":
            raise UserError(f"--corpus {spec} is a {hub.CATALOG[spec].kind}; corpora: "
                            f"{', '.join(hub.catalog_names('corpus'))}")
        return [hub.fetch(spec) / "corpus.txt"]
    p = Path(spec).expanduser()
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
        if not files:
            raise UserError(f"--corpus {p}: folder has no files")
        return files
    raise UserError(f"--corpus {spec}: no such file or folder; catalog corpora: "
                    f"{', '.join(hub.catalog_names('corpus'))}")


def iter_documents(files: list[Path]) -> Iterator[list[str]]:
    """Documents as lists of sentences, streamed: a blank line or a new file ends a document."""
    for f in files:
        doc: list[str] = []
        try:
            with open(f, encoding="utf-8") as fh:
                for line in fh:
                    line = line.strip()
                    if not line:
                        if doc:
                            yield doc
                        doc = []
                        continue
                    doc.extend(split_sentences(line))
        except UnicodeDecodeError:
            raise UserError(f"--corpus {f}: not UTF-8 text; convert it or leave it out") from None
        if doc:
            yield doc


def iter_sentences(files: list[Path]) -> Iterator[str]:
    for doc in iter_documents(files):
        yield from doc


# ---------------------------------------------------------------------------------------------
# tokenizer learned from the corpus


def train_wordpiece(files: list[Path], vocab_size: int, out: Path):
    """A BERT-style WordPiece tokenizer (NFKC, lower case, CJK characters split) learned from
    the corpus with the tokenizers library."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers.trainers import WordPieceTrainer
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.Sequence([
        normalizers.NFKC(), normalizers.BertNormalizer(lowercase=True, handle_chinese_chars=True)])
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, min_frequency=2)
    tok.train_from_iterator(iter_sentences(files), trainer=trainer)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                 cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                                 model_max_length=512)
    hf.save_pretrained(out)
    return hf


# ---------------------------------------------------------------------------------------------
# the token cache (memory-mapped, built once)


def _is_cjk(ch: str) -> bool:
    cp = ord(ch)
    return 0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0xF900 <= cp <= 0xFAFF


def _jieba():
    try:
        import jieba

        jieba.setLogLevel(logging.WARNING)
        return jieba
    except ImportError:
        return None


def word_starts(tokenizer, sentences: list[str], encodings, segmenter) -> list[list[int]]:
    """1 where a token starts a word: not a WordPiece continuation (##), and for Chinese not
    inside a word of the segmenter (jieba) — without one each character is a word."""
    out = []
    for s, enc in zip(sentences, encodings):
        toks = tokenizer.convert_ids_to_tokens(enc.ids)
        inner: set[int] = set()
        if segmenter is not None and any(_is_cjk(c) for c in s):
            pos = 0
            for w in segmenter.lcut(s):
                if len(w) > 1 and all(_is_cjk(c) for c in w):
                    inner.update(range(pos + 1, pos + len(w)))
                pos += len(w)
        out.append([0 if t.startswith("##") or (a in inner) else 1
                    for t, (a, _b) in zip(toks, enc.offsets)])
    return out


class TokenCache:
    """Token ids of every sentence of a corpus in flat memory-mapped arrays:
    ``tokens`` (uint16 when the vocabulary allows), ``words`` (word-start flags),
    ``sent_end`` (cumulative token ends per sentence), ``doc_end`` (cumulative sentence ends)."""

    def __init__(self, folder: Path):
        self.folder = folder
        meta = json.loads((folder / "meta.json").read_text())
        self.meta = meta
        self.tokens = np.memmap(folder / "tokens.bin", dtype=meta["dtype"], mode="r")
        self.words = np.memmap(folder / "words.bin", dtype=np.uint8, mode="r")
        self.sent_end = np.memmap(folder / "sent_end.bin", dtype=np.int64, mode="r")
        self.doc_end = np.memmap(folder / "doc_end.bin", dtype=np.int64, mode="r")

    @property
    def n_docs(self) -> int:
        return len(self.doc_end)

    def doc_sentences(self, d: int) -> tuple[int, int]:
        return (int(self.doc_end[d - 1]) if d else 0), int(self.doc_end[d])

    def sentence(self, s: int) -> tuple[int, int]:
        return (int(self.sent_end[s - 1]) if s else 0), int(self.sent_end[s])

    @classmethod
    def build(cls, files: list[Path], tokenizer, folder: Path, wwm: bool,
              progress: bool = True) -> TokenCache:
        """Stream the corpus through the tokenizer in chunks; nothing grows in memory."""
        from tqdm.auto import tqdm

        if (folder / "meta.json").exists():
            return cls(folder)
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        dtype = "uint16" if len(tokenizer) < 65535 else "int32"
        segmenter = _jieba() if wwm else None
        # a copy without the padding/truncation some tokenizer.json files carry (the
        # sentence-transformers ones pad every encoding to 128): sentences go in whole
        from tokenizers import Tokenizer

        backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        backend.no_padding()
        backend.no_truncation()
        n_tok = n_sent = n_doc = 0
        size = sum(f.stat().st_size for f in files)
        bar = tqdm(total=size, unit="B", unit_scale=True, desc="tokenize corpus",
                   disable=not progress, mininterval=1)
        with open(tmp / "tokens.bin", "wb") as ft, open(tmp / "words.bin", "wb") as fw, \
                open(tmp / "sent_end.bin", "wb") as fs, open(tmp / "doc_end.bin", "wb") as fd:
            chunk: list[list[str]] = []

            def flush() -> None:
                nonlocal n_tok, n_sent, n_doc
                sents = [s for d in chunk for s in d]
                encs = backend.encode_batch(sents, add_special_tokens=False)
                starts = word_starts(tokenizer, sents, encs, segmenter)
                ends, doc_ends = [], []
                ids_all, ws_all = [], []
                i = 0
                for d in chunk:
                    kept = 0
                    for _s in d:
                        ids = encs[i].ids
                        ws = starts[i]
                        i += 1
                        if not ids:
                            continue
                        ids_all.extend(ids)
                        ws_all.extend(ws)
                        n_tok += len(ids)
                        ends.append(n_tok)
                        kept += 1
                    if kept:
                        n_sent += kept
                        n_doc += 1
                        doc_ends.append(n_sent)
                ft.write(np.asarray(ids_all, dtype=dtype).tobytes())
                fw.write(np.asarray(ws_all, dtype=np.uint8).tobytes())
                fs.write(np.asarray(ends, dtype=np.int64).tobytes())
                fd.write(np.asarray(doc_ends, dtype=np.int64).tobytes())
                chunk.clear()

            n_in_chunk = 0
            for doc in iter_documents(files):
                chunk.append(doc)
                n_in_chunk += len(doc)
                bar.update(sum(len(s.encode("utf-8")) + 1 for s in doc))
                if n_in_chunk >= 2000:
                    flush()
                    n_in_chunk = 0
            if chunk:
                flush()
        bar.close()
        if n_doc == 0:
            shutil.rmtree(tmp)
            raise UserError(f"--corpus {files[0]}: no text found")
        meta = {"dtype": dtype, "tokens": n_tok, "sentences": n_sent, "documents": n_doc,
                "files": [str(f) for f in files], "whole_word_segmenter":
                ("jieba" if segmenter else "wordpiece/characters") if wwm else None}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
        return cls(folder)


def cache_key(files: list[Path], tokenizer, wwm: bool) -> str:
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
    vocab = tokenizer.get_vocab()
    h.update(json.dumps(sorted(vocab.items())[:50000], ensure_ascii=False).encode())
    h.update(f"{len(vocab)}:{tokenizer.backend_tokenizer.normalizer.__class__}".encode())
    h.update(f"wwm={wwm}:jieba={_jieba() is not None if wwm else None}:v2".encode())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# examples: MLM (+ NSP) built on the fly from the cache


def real_vocab_ids(tokenizer) -> np.ndarray:
    """Ids a random replacement may use: never special, unused or reserved tokens."""
    special = set(tokenizer.all_special_ids)
    bad = re.compile(r"^(\[unused\d+\]|<unused\d+>|\[PAD\]|\[UNK\]|\[CLS\]|\[SEP\]|\[MASK\]|<.*>)$")
    ids = [i for t, i in tokenizer.get_vocab().items() if i not in special and not bad.match(t)]
    return np.array(sorted(ids), dtype=np.int64)


class PretrainData:
    """Examples over a range of documents of a :class:`TokenCache`.

    Each example is one packed chunk of consecutive sentences of a document (up to
    ``max_length``). With NSP the chunk is cut into A and B at a sentence boundary; half the time
    B is replaced by sentences from another document (``is_next`` 0, else 1).
    Masking is seeded by (seed, example index): the same example masks the same way on every
    call (so held-out losses before and after training are comparable)."""

    lengths = None  # the loop draws random batches; rows are padded here

    def __init__(self, cache: TokenCache, tokenizer, docs: range, max_length: int, nsp: bool,
                 wwm: bool, mlm_probability: float = 0.15, seed: int = 0,
                 max_examples: int | None = None):
        self.c, self.nsp, self.wwm, self.p = cache, nsp, wwm, mlm_probability
        self.max_length, self.seed, self.docs = max_length, seed, docs
        self.cls, self.sep = tokenizer.cls_token_id, tokenizer.sep_token_id
        self.pad, self.mask = tokenizer.pad_token_id, tokenizer.mask_token_id
        if None in (self.cls, self.sep, self.pad, self.mask):
            raise UserError("the tokenizer needs [CLS], [SEP], [PAD] and [MASK] tokens for "
                            "masked-LM pretraining (a BERT-style WordPiece tokenizer)")
        self.vocab = real_vocab_ids(tokenizer)
        budget = max_length - (3 if nsp else 2)
        starts, ends = [], []   # chunks: sentence ranges, packed greedily within each document
        for d in docs:
            s0, s1 = cache.doc_sentences(d)
            cur, used = s0, 0
            for s in range(s0, s1):
                a, b = cache.sentence(s)
                if used and used + (b - a) > budget:
                    starts.append(cur)
                    ends.append(s)
                    cur, used = s, 0
                used += b - a
            if s1 > cur:
                starts.append(cur)
                ends.append(s1)
        self.starts = np.asarray(starts, dtype=np.int64)
        self.ends = np.asarray(ends, dtype=np.int64)
        if max_examples is not None and len(self.starts) > max_examples:
            keep = np.sort(np.random.default_rng(seed).choice(len(self.starts), max_examples,
                                                              replace=False))
            self.starts, self.ends = self.starts[keep], self.ends[keep]
        self.doc_of = None

    def __len__(self) -> int:
        return len(self.starts)

    def _tokens(self, s0: int, s1: int) -> tuple[np.ndarray, np.ndarray]:
        a, _ = self.c.sentence(s0)
        _, b = self.c.sentence(s1 - 1)
        return (np.asarray(self.c.tokens[a:b], dtype=np.int64),
                np.asarray(self.c.words[a:b], dtype=np.int64))

    def example(self, i: int) -> dict:
        """Token ids, segment ids, word starts and (with NSP) is_next of example ``i``."""
        rng = np.random.default_rng((self.seed, int(i)))
        s0, s1 = int(self.starts[i]), int(self.ends[i])
        budget = self.max_length - (3 if self.nsp else 2)
        if not self.nsp:
            ids, ws = self._tokens(s0, s1)
            ids, ws = ids[:budget], ws[:budget]
            ids = np.concatenate([[self.cls], ids, [self.sep]])
            ws = np.concatenate([[1], ws, [1]])
            return {"ids": ids, "seg": np.zeros(len(ids), np.int64), "ws": ws, "special":
                    np.r_[1, np.zeros(len(ids) - 2, np.int64), 1]}
        ids, ws = self._tokens(s0, s1)
        if s1 - s0 >= 2:   # cut at a sentence boundary
            cut_s = int(rng.integers(s0 + 1, s1))
            cut = self.c.sentence(cut_s)[0] - self.c.sentence(s0)[0]
        else:              # one sentence: cut inside it
            cut = max(1, len(ids) // 2)
        a_ids, a_ws = ids[:cut], ws[:cut]
        is_next = 1
        b_ids, b_ws = ids[cut:], ws[cut:]
        if rng.random() < 0.5 or len(b_ids) == 0:
            b_ids, b_ws = self._random_segment(rng, s0, budget - len(a_ids))
            is_next = 0
        a_ids, a_ws, b_ids, b_ws = _truncate_pair(a_ids, a_ws, b_ids, b_ws, budget)
        ids = np.concatenate([[self.cls], a_ids, [self.sep], b_ids, [self.sep]])
        ws = np.concatenate([[1], a_ws, [1], b_ws, [1]])
        seg = np.r_[np.zeros(len(a_ids) + 2, np.int64), np.ones(len(b_ids) + 1, np.int64)]
        special = np.zeros(len(ids), np.int64)
        special[[0, len(a_ids) + 1, len(ids) - 1]] = 1
        return {"ids": ids, "seg": seg, "ws": ws, "special": special, "is_next": is_next}

    def _random_segment(self, rng, s_here: int, want: int) -> tuple[np.ndarray, np.ndarray]:
        """Sentences from a random other document (never this one, so never adjacent)."""
        n_docs = len(self.docs)
        here = int(np.searchsorted(self.c.doc_end, s_here, side="right"))
        for _ in range(10):
            d = self.docs[int(rng.integers(n_docs))]
            if d != here or n_docs == 1:
                break
        d0, d1 = self.c.doc_sentences(d)
        s = int(rng.integers(d0, d1))
        out_ids, out_ws = [], []
        total = 0
        while s < d1 and total < max(want, 1):
            ids, ws = self._tokens(s, s + 1)
            out_ids.append(ids)
            out_ws.append(ws)
            total += len(ids)
            s += 1
        return np.concatenate(out_ids), np.concatenate(out_ws)

    def mask_tokens(self, ex: dict, rng) -> tuple[np.ndarray, np.ndarray]:
        """BERT masking: ~15% of the (non-special) tokens are chosen — whole words with
        ``wwm`` — 80% become [MASK], 10% a random real vocabulary token, 10% stay; labels are
        the original ids there and -100 elsewhere."""
        ids = ex["ids"].copy()
        labels = np.full(len(ids), -100, dtype=np.int64)
        cand = np.flatnonzero(ex["special"] == 0)
        if len(cand) == 0:
            return ids, labels
        n_mask = max(1, int(round(len(cand) * self.p)))
        if self.wwm:
            starts = [p for p in cand if ex["ws"][p] == 1 or p == cand[0]]
            words = []
            for k, p in enumerate(starts):
                end = starts[k + 1] if k + 1 < len(starts) else cand[-1] + 1
                words.append([q for q in range(p, end) if ex["special"][q] == 0])
            chosen: list[int] = []
            for w in rng.permutation(len(words)):
                if len(chosen) >= n_mask:
                    break
                if len(chosen) + len(words[w]) > n_mask and chosen:
                    continue
                chosen.extend(words[w])
            sel = np.array(sorted(chosen), dtype=np.int64)
        else:
            sel = np.sort(rng.choice(cand, size=n_mask, replace=False))
        labels[sel] = ids[sel]
        r = rng.random(len(sel))
        ids[sel[r < 0.8]] = self.mask
        rand = sel[(r >= 0.8) & (r < 0.9)]
        ids[rand] = rng.choice(self.vocab, size=len(rand))
        return ids, labels

    def collate(self, idx: list[int], multiple: int = 8) -> dict[str, torch.Tensor]:
        rows = []
        for i in idx:
            ex = self.example(i)
            ids, labels = self.mask_tokens(ex, np.random.default_rng((self.seed, int(i), 1)))
            rows.append((ids, labels, ex))
        width = max(len(r[0]) for r in rows)
        width = min(padded_width(width, multiple), max(width, self.max_length))
        B = len(rows)
        out = {"input_ids": torch.full((B, width), self.pad, dtype=torch.long),
               "attention_mask": torch.zeros((B, width), dtype=torch.long),
               "token_type_ids": torch.zeros((B, width), dtype=torch.long),
               "labels": torch.full((B, width), -100, dtype=torch.long)}
        for b, (ids, labels, ex) in enumerate(rows):
            n = len(ids)
            out["input_ids"][b, :n] = torch.from_numpy(ids)
            out["attention_mask"][b, :n] = 1
            out["token_type_ids"][b, :n] = torch.from_numpy(ex["seg"])
            out["labels"][b, :n] = torch.from_numpy(labels)
        if self.nsp:
            out["next_sentence_label"] = torch.tensor([r[2]["is_next"] for r in rows])
        return out


def _truncate_pair(a, aw, b, bw, budget):
    """Drop tokens from the end of the longer side until the pair fits (as BERT does)."""
    while len(a) + len(b) > budget:
        if len(a) >= len(b):
            a, aw = a[:-1], aw[:-1]
        else:
            b, bw = b[:-1], bw[:-1]
    return a, aw, b, bw


# ---------------------------------------------------------------------------------------------
# the model: encoder + pretraining heads, loss only at the masked positions


MASK_BUCKET = 64


class PretrainModel(nn.Module):
    """Wraps ``BertForPreTraining`` / ``*ForMaskedLM``. For BERT the vocabulary projection runs
    only at the ~15% masked positions (not all of them); other models use their own forward."""

    def __init__(self, model: nn.Module, nsp: bool):
        super().__init__()
        self.model, self.nsp = model, nsp
        self.fast = hasattr(model, "bert") and hasattr(model, "cls")

    def heads(self, input_ids, attention_mask, token_type_ids, labels):
        if not self.fast:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                             token_type_ids=token_type_ids)
            logits = out.logits if hasattr(out, "logits") else out.prediction_logits
            sel = labels != -100
            return logits[sel], labels[sel], getattr(out, "seq_relationship_logits", None)
        enc = self.model.bert(input_ids=input_ids, attention_mask=attention_mask,
                              token_type_ids=token_type_ids)
        seq = enc.last_hidden_state
        # the masked positions, their count rounded up to a multiple of 64 with ignored (-100)
        # rows: a handful of head shapes instead of one per batch (oneDNN and the allocator
        # cache per shape; unbucketed, resident memory kept growing over thousands of steps)
        idx = (labels.reshape(-1) != -100).nonzero().squeeze(1)
        n = idx.numel()
        extra = -(-n // MASK_BUCKET) * MASK_BUCKET - n
        tgt = labels.reshape(-1)[idx]
        if extra:
            idx = torch.cat([idx, idx.new_zeros(extra)])
            tgt = torch.cat([tgt, tgt.new_full((extra,), -100)])
        heads = self.model.cls
        mlm_head = heads.predictions if hasattr(heads, "predictions") else heads
        mlm_logits = mlm_head(seq.reshape(-1, seq.shape[-1])[idx])
        nsp_logits = None
        if self.nsp:
            nsp_logits = heads.seq_relationship(enc.pooler_output)
        return mlm_logits, tgt, nsp_logits

    def forward(self, input_ids, attention_mask, token_type_ids=None, labels=None,
                next_sentence_label=None):
        mlm_logits, tgt, nsp_logits = self.heads(input_ids, attention_mask, token_type_ids,
                                                 labels)
        loss = nn.functional.cross_entropy(mlm_logits.float(), tgt)
        if self.nsp and next_sentence_label is not None:
            # HF's NSP head: class 0 = "B follows A"; ours: is_next 1 = follows
            loss = loss + nn.functional.cross_entropy(nsp_logits.float(), 1 - next_sentence_label)
        return loss

    @torch.inference_mode()
    def evaluate(self, data: PretrainData, batch_size: int, accelerator) -> dict:
        """Held-out MLM loss (and NSP accuracy); with several processes each scores every n-th
        batch and the sums are added up, so every process gets the one-process figures."""
        from .loop import amp_dtype

        device, amp = accelerator.device, amp_dtype(accelerator)
        rank, world = accelerator.process_index, accelerator.num_processes
        batch_size = max(1, min(batch_size, -(-len(data) // world)))  # (a small set: halves)
        was = self.training
        self.eval()
        tot, n, nsp_ok, nsp_n = 0.0, 0, 0, 0
        for s in range(rank * batch_size, len(data), world * batch_size):
            batch = {k: v.to(device) for k, v in
                     data.collate(list(range(s, min(s + batch_size, len(data))))).items()}
            nsl = batch.pop("next_sentence_label", None)
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                mlm_logits, tgt, nsp_logits = self.heads(**batch)
            tot += float(nn.functional.cross_entropy(mlm_logits.float(), tgt, reduction="sum"))
            n += int((tgt != -100).sum())
            if self.nsp and nsl is not None:
                nsp_ok += int(((1 - nsp_logits.argmax(-1)) == nsl).sum())
                nsp_n += len(nsl)
        self.train(was)
        if world > 1:
            sums = accelerator.reduce(torch.tensor([tot, n, nsp_ok, nsp_n], dtype=torch.float64,
                                                   device=device), reduction="sum")
            tot, n, nsp_ok, nsp_n = sums[0].item(), *(int(x) for x in sums[1:].tolist())
        loss = tot / max(n, 1)
        out = {"mlm_loss": loss, "perplexity": math.exp(min(loss, 50)), "masked_tokens": n}
        if nsp_n:
            out["nsp_accuracy"] = nsp_ok / nsp_n
        return out


def build_model(a: PretrainArgs, tokenizer, src: str | None) -> tuple[nn.Module, list[str]]:
    """The model with its pretraining heads, and the names of heads that were initialised."""
    from transformers import (
        AutoConfig,
        AutoModelForMaskedLM,
        BertConfig,
        BertForMaskedLM,
        BertForPreTraining,
    )

    nsp = a.objective == "mlm+nsp"
    if src is None:
        L, H, A = SIZES[a.size]
        L, H, A = a.layers or L, a.hidden or H, a.heads or A
        if H % A:
            raise UserError(f"--hidden {H} must be divisible by --heads {A}")
        cfg = BertConfig(vocab_size=len(tokenizer), hidden_size=H, num_hidden_layers=L,
                         num_attention_heads=A, intermediate_size=4 * H,
                         max_position_embeddings=max(512, a.max_length), type_vocab_size=2,
                         pad_token_id=tokenizer.pad_token_id)
        model = (BertForPreTraining if nsp else BertForMaskedLM)(cfg)
        log.info("from scratch: BERT %d layers, hidden %d, %d heads, vocabulary %d (%s params)",
                 L, H, A, len(tokenizer), f"{sum(p.numel() for p in model.parameters()):,}")
        return model, ["all (random initialisation)"]
    config = AutoConfig.from_pretrained(src, **remote_code())
    if nsp and config.model_type != "bert":
        raise UserError(f"--objective mlm+nsp needs a BERT-style model (next-sentence head); "
                        f"{config.model_type} has none: use --objective mlm")
    cls = BertForPreTraining if nsp else AutoModelForMaskedLM
    try:
        model, info = cls.from_pretrained(src, output_loading_info=True, **remote_code())
    except ValueError as e:
        raise UserError(f"--model {src}: no masked-LM form ({str(e).splitlines()[0]})") from None
    missing = sorted({k.split(".")[0] + "." + k.split(".")[1] if k.count(".") > 1 else k
                      for k in info.get("missing_keys", [])})
    if missing:
        log.warning("the checkpoint lacks pretraining heads; initialised: %s", ", ".join(missing))
    return model, missing


def encoder_of(model: nn.Module) -> nn.Module:
    return model.base_model


# ---------------------------------------------------------------------------------------------
# the job


def pretrain_args(**kw) -> PretrainArgs:
    """The command's flags (underscores for dashes) -> PretrainArgs, with the checks that
    involve several of them; ``init`` defaults to ``pretrained`` with a model, else
    ``scratch``."""
    from dataclasses import fields

    known = {f.name for f in fields(PretrainArgs)}
    bad = sorted(set(kw) - known)
    if bad:
        raise UserError(f"{bad[0]}=: not a pretrain option; options: {', '.join(sorted(known))}")
    if kw.get("model") and kw.get("init") == "scratch":
        raise UserError("--model and --init scratch exclude each other: continue a model, "
                        "or build one from scratch")
    kw["init"] = kw.get("init") or ("pretrained" if kw.get("model") else "scratch")
    if not kw.get("corpus"):
        raise UserError("--corpus is required: a text file, a folder, or peoples-daily")
    if not kw.get("out"):
        raise UserError("--out DIR is required: the folder the encoder is written to")
    return PretrainArgs(**kw)


def pretrain(corpus, out, *, model: str | None = None, overwrite: bool = False,
             progress: bool = True, **options) -> dict:
    """``textune pretrain`` from Python: continue pretraining ``model`` (an encoder) on the raw
    text ``corpus`` (a file, a folder, a catalog corpus), or without a model build and train a
    small BERT from scratch; ``options`` are the command's flags with underscores
    (``objective="mlm+nsp"``, ``max_steps=300``, ``whole_word_masking=True``...). Writes the
    encoder and tokenizer to ``out`` (``textune.fit(data, ..., model=out)`` fine-tunes it) and
    returns its metrics (held-out MLM loss before and after)."""
    return run_pretrain(pretrain_args(corpus=str(corpus), out=str(out), model=model,
                                      **options), progress=progress, overwrite=overwrite)


def run_pretrain(a: PretrainArgs, *, progress: bool = True, resume: bool = False,
                 overwrite: bool = False) -> dict:
    """Continue pretraining (or pretrain from scratch) on ``a.corpus``; write ``a.out``."""
    with trust_remote_code(a.trust_remote_code):
        return _pretrain(a, progress=progress, resume=resume, overwrite=overwrite)


def _pretrain(a: PretrainArgs, *, progress: bool, resume: bool, overwrite: bool) -> dict:
    from . import hub
    from .api import _peak_memory_mb, prepare_out_dir, seed_everything
    from .config import TrainArgs
    from .loop import build_accelerator, fit, resolve_precision
    from .modeling import load_tokenizer, resolve_model

    if a.objective not in ("mlm", "mlm+nsp"):
        raise UserError(f"--objective {a.objective}: choose mlm or mlm+nsp")
    if a.init not in ("pretrained", "scratch"):
        raise UserError(f"--init {a.init}: choose pretrained (with --model) or scratch")
    if a.init == "pretrained" and not a.model:
        raise UserError("--model M is required (or --init scratch to build a small BERT)")
    if a.size not in SIZES:
        raise UserError(f"--size {a.size}: choose {', '.join(SIZES)}")
    if not 0 < a.mlm_probability < 1:
        raise UserError("--mlm-probability must be in (0, 1)")
    if a.max_length < 16:
        raise UserError("--max-length must be >= 16")
    files = corpus_files(a.corpus)
    from .loop import process_state

    proc = process_state()  # (--num-processes: the main process writes, the others read)
    main = proc.is_main_process
    # with several processes the launcher prepared the folder
    out = Path(a.out) if resume or not main else prepare_out_dir(a.out, overwrite)
    seed_everything(a.seed)
    t0 = time.perf_counter()

    # the weights to continue (a resumed run too: its checkpoint then replaces them)
    src = resolve_model(a.model) if a.init == "pretrained" else None
    with proc.main_process_first():  # the tokenizer and token cache are built once
        if (resume or not main) and (out / "tokenizer-init").exists():
            tokenizer = load_tokenizer(str(out / "tokenizer-init"))
        elif a.init == "scratch":
            log.info("learning a %d-token WordPiece vocabulary from the corpus", a.vocab_size)
            tokenizer = train_wordpiece(files, a.vocab_size, out / "tokenizer-init")
        else:
            tokenizer = load_tokenizer(src)
            if main:
                tokenizer.save_pretrained(out / "tokenizer-init")
        cache_dir = hub.home() / "pretrain-cache" / cache_key(files, tokenizer,
                                                              a.whole_word_masking)
        cache = TokenCache.build(files, tokenizer, cache_dir, a.whole_word_masking,
                                 progress and main)
    m = cache.meta
    log.info("corpus: %s documents, %s sentences, %s tokens (cache %s)", f"{m['documents']:,}",
             f"{m['sentences']:,}", f"{m['tokens']:,}", cache_dir)
    if a.whole_word_masking and m.get("whole_word_segmenter") == "wordpiece/characters" \
            and any(_is_cjk(c) for c in tokenizer.decode(cache.tokens[:200].tolist())):
        log.warning("whole-word masking of Chinese: no word segmenter (pip install jieba), so "
                    "each character is a word")
    n_eval_docs = max(1, int(round(cache.n_docs * a.eval_fraction))) if cache.n_docs > 1 else 0
    # held-out documents: every k-th, spread over the corpus
    step = max(1, cache.n_docs // max(n_eval_docs, 1))
    eval_docs = list(range(0, cache.n_docs, step))[:n_eval_docs] if n_eval_docs else []
    eval_set = set(eval_docs)
    train_docs = [d for d in range(cache.n_docs) if d not in eval_set] or eval_docs
    nsp = a.objective == "mlm+nsp"
    kw = {"max_length": a.max_length, "nsp": nsp, "wwm": a.whole_word_masking,
          "mlm_probability": a.mlm_probability}
    train_data = PretrainData(cache, tokenizer, _Docs(train_docs), seed=a.seed, **kw)
    eval_data = PretrainData(cache, tokenizer, _Docs(eval_docs or train_docs), seed=a.seed + 1,
                             max_examples=a.max_eval_examples, **kw)
    log.info("%s examples of <= %d tokens for training, %d held out", f"{len(train_data):,}",
             a.max_length, len(eval_data))

    model, initialised = build_model(a, tokenizer, src)
    wrapped = PretrainModel(model, nsp)
    lr = a.lr or (5e-4 if a.init == "scratch" else 5e-5)
    targs = TrainArgs(epochs=a.epochs, batch_size=a.batch_size, lr=lr,
                      weight_decay=a.weight_decay, warmup_ratio=a.warmup_ratio,
                      grad_accum=a.grad_accum, max_steps=a.max_steps, seed=a.seed,
                      precision=resolve_precision(a.precision), save_every=a.save_every)
    accelerator = build_accelerator(targs.precision)
    device = accelerator.device
    wrapped.to(device)
    before = wrapped.evaluate(eval_data, 64, accelerator) if not resume \
        else json.loads((out / "eval_before.json").read_text())
    if not resume and main:
        (out / "eval_before.json").write_text(json.dumps(before) + "\n")
        (out / "pretrain_args.json").write_text(json.dumps(asdict(a), indent=2) + "\n")
    log.info("held-out MLM loss before: %.4f (perplexity %.1f)%s", before["mlm_loss"],
             before["perplexity"], f", NSP accuracy {before['nsp_accuracy']:.3f}"
             if "nsp_accuracy" in before else "")

    def on_best() -> None:
        pass  # saved once at the end; checkpoints (--save-every, per epoch) cover interruption

    state = fit(wrapped, train_data, None, targs, lr=lr, accelerator=accelerator, run_dir=out,
                evaluate=lambda _: {}, on_best=on_best, progress=progress, resume=resume,
                module_returns_loss=True)
    wrapped = accelerator.unwrap_model(wrapped)
    after = wrapped.evaluate(eval_data, 64, accelerator)
    log.info("held-out MLM loss after: %.4f (perplexity %.1f)%s", after["mlm_loss"],
             after["perplexity"], f", NSP accuracy {after['nsp_accuracy']:.3f}"
             if "nsp_accuracy" in after else "")

    metrics = {
        "objective": a.objective, "init": a.init, "model": a.model,
        "whole_word_masking": a.whole_word_masking,
        "eval_mlm_loss_before": round(before["mlm_loss"], 5),
        "eval_mlm_loss_after": round(after["mlm_loss"], 5),
        "eval_perplexity_before": round(before["perplexity"], 3),
        "eval_perplexity_after": round(after["perplexity"], 3),
        "eval_masked_tokens": after["masked_tokens"],
        "eval_examples": len(eval_data),
        "steps": state.step, "epochs_run": state.epoch,
        "train_seconds": round(state.train_seconds, 3),
        "train_samples_per_second": round(state.samples / max(state.train_seconds, 1e-9), 3),
        "train_examples": len(train_data), "corpus": {k: m[k] for k in
                                                      ("documents", "sentences", "tokens")},
        "heads_initialised": initialised, "peak_memory_mb": round(_peak_memory_mb(device), 1),
        "device": str(device), "precision": accelerator.mixed_precision,
        "processes": accelerator.num_processes,
        "total_seconds": round(time.perf_counter() - t0, 3),
        "total_params": sum(p.numel() for p in wrapped.parameters()),
        "environment": environment(device),
    }
    if nsp:
        metrics["eval_nsp_accuracy_before"] = round(before.get("nsp_accuracy", 0.0), 4)
        metrics["eval_nsp_accuracy"] = round(after.get("nsp_accuracy", 0.0), 4)
    if main:
        # the output is an encoder textune train fine-tunes directly: heads dropped
        enc = encoder_of(wrapped.model)
        enc.config.architectures = [type(enc).__name__]
        enc.save_pretrained(out)
        tokenizer.save_pretrained(out)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2, ensure_ascii=False)
                                          + "\n")
        from .loop import CKPT

        shutil.rmtree(out / CKPT, ignore_errors=True)
    return metrics


class _Docs(list):
    """A list of document indices (``range``-like for the example builder)."""
