"""GPU rows of the benchmark: textune vs what practitioners run today, same data, same card.

Synthetic data as in shared/anchors (random-weight models: speed does not depend on weights;
IMDB-like lengths). Each row prints real tokens/s (or texts/s) and MFU; JSON lines go to
$OUT/gpu.jsonl when OUT is set. Run: PYTHONPATH=src python3 bench/gpu.py [rows...]
Rows: bert_trainer, bert_textune, bert_textune_compile, bert_textune_tokens,
bert_textune_tokens_compile, llama_trainer, llama_textune,
frozen_classic, frozen_textune, infer_pipeline, infer_textune, infer_pairs, qlora.
SMALL=1 shrinks everything to check the script on a CPU.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

SMALL = os.environ.get("SMALL") == "1"
DEV = "cuda" if torch.cuda.is_available() and not SMALL else "cpu"
PEAK = 790e12
RESULTS: list[dict] = []


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def lengths_like_imdb(n, median, seed=0, cap=512):
    rng = np.random.default_rng(seed)
    return np.minimum(np.clip(rng.lognormal(math.log(median), 0.65, n).astype(int), 16, 3000), cap)


def report(name, secs, n, tokens, flops_per_token=None, peak=None, **extra):
    r = {"row": name, "seconds": round(secs, 3), "samples_per_s": round(n / secs, 1),
         "real_tokens_per_s": round(tokens / secs), **extra}
    if flops_per_token:
        r["mfu"] = round(flops_per_token * tokens / secs / PEAK, 4)
    if peak is not None:
        r["peak_gib"] = round(peak / 2**30, 2)
    RESULTS.append(r)
    print(json.dumps(r), flush=True)
    if os.environ.get("OUT"):
        with open(Path(os.environ["OUT"]) / "gpu.jsonl", "a") as f:
            f.write(json.dumps(r) + "\n")


def reset_peak():
    if DEV == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak():
    return torch.cuda.max_memory_allocated() if DEV == "cuda" else None


# ---------------------------------------------------------------------------------- BERT-base
def bert_setup():
    from transformers import BertConfig

    n = 256 if SMALL else int(os.environ.get("N", 8192))
    cfg = BertConfig() if not SMALL else BertConfig(hidden_size=64, num_hidden_layers=2,
                                                   num_attention_heads=2, intermediate_size=128)
    cfg._attn_implementation = "sdpa"
    lens = lengths_like_imdb(n, 230)
    rng = np.random.default_rng(1)
    seqs = [rng.integers(1000, 30000, int(x)) for x in lens]
    labels = rng.integers(0, 2, n)
    return cfg, seqs, labels, int(lens.sum())


def bert_trainer():
    from transformers import BertForSequenceClassification, Trainer, TrainingArguments

    cfg, seqs, labels, real = bert_setup()
    params = 109_483_778

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return len(seqs)

        def __getitem__(self, i):
            return {"input_ids": seqs[i].tolist(), "labels": int(labels[i])}

    def collate(feats):
        L = max(len(f["input_ids"]) for f in feats)
        ids = torch.zeros(len(feats), L, dtype=torch.long)
        m = torch.zeros_like(ids)
        for i, f in enumerate(feats):
            ids[i, :len(f["input_ids"])] = torch.tensor(f["input_ids"])
            m[i, :len(f["input_ids"])] = 1
        return {"input_ids": ids, "attention_mask": m,
                "labels": torch.tensor([f["labels"] for f in feats])}

    reset_peak()
    model = BertForSequenceClassification(cfg).to(DEV)
    args = TrainingArguments(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=32,
                             num_train_epochs=1, learning_rate=2e-5, report_to=[],
                             save_strategy="no", logging_strategy="no", bf16=DEV == "cuda",
                             dataloader_num_workers=2, disable_tqdm=True, use_cpu=DEV == "cpu")
    tr = Trainer(model=model, args=args, train_dataset=DS(), data_collator=collate)
    sync()
    t = time.perf_counter()
    tr.train()
    sync()
    report("bert-base Trainer bf16 dynamic pad b32", time.perf_counter() - t, len(seqs), real,
           6 * params, peak())


def _encoded(seqs, labels):
    from textune.data import Encoded

    return Encoded([np.asarray(s, dtype=np.int64) for s in seqs], None,
                   np.asarray(labels, dtype=np.int64), 0)


def _fit(model, data, batch, lr, compile_=False, tokens=0):
    from textune.config import TrainArgs
    from textune.loop import build_accelerator, fit

    acc = build_accelerator("bf16" if DEV == "cuda" else "fp32")
    args = TrainArgs(epochs=1, batch_size=batch, lr=lr, warmup_ratio=0.0, compile=compile_,
                     log_every=10**9, batch_tokens=tokens)
    run = Path(tempfile.mkdtemp())
    state = fit(model, data, None, args, lr=lr, accelerator=acc, run_dir=run,
                evaluate=lambda x: {}, on_best=lambda: None, progress=False)
    return state


def bert_textune(compile_=False, tokens=0):
    from transformers import BertModel

    from textune.modeling import TextClassifier

    cfg, seqs, labels, real = bert_setup()
    params = 109_483_778
    data = _encoded(seqs, labels)
    reset_peak()
    model = TextClassifier(BertModel(cfg), 2, pooling="cls").to(DEV)
    if compile_ and tokens:  # token-budget batches: warm up on a slice of the data (a few
        # shapes make Dynamo mark rows and width dynamic: one graph serves every batch after)
        t = time.perf_counter()
        n = len(seqs) // 8
        _fit(model, _encoded(seqs[:n], labels[:n]), 32, 2e-5, compile_=True, tokens=tokens)
        warm = time.perf_counter() - t
        print(f"compile warm-up {warm:.1f}s (cache {os.environ.get('TORCHINDUCTOR_CACHE_DIR')})",
              flush=True)
        state = _fit(model, data, 32, 2e-5, compile_=True, tokens=tokens)
        report(f"bert-base textune bf16 token-budget {tokens} compiled", state.train_seconds,
               len(seqs), real, 6 * params, peak(), warmup_s=round(warm, 1),
               steps=state.step)
        return
    if tokens:
        state = _fit(model, data, 32, 2e-5, tokens=tokens)
        report(f"bert-base textune bf16 token-budget {tokens}", state.train_seconds, len(seqs),
               real, 6 * params, peak(), steps=state.step)
        return
    if compile_:  # warm every bucket shape once, reported apart
        t = time.perf_counter()
        # one batch per length bucket (rounded to 64), on the same model
        rounded = [-(-len(s) // 64) * 64 for s in seqs]
        firsts = {}
        for i, r in enumerate(rounded):
            firsts.setdefault(r, []).append(i)
        warm = [i for idx in firsts.values() for i in (idx * 32)[:32]]
        _fit(model, _encoded([seqs[i] for i in warm], [labels[i] for i in warm]), 32, 2e-5,
             compile_=True)
        print(f"compile warm-up {time.perf_counter() - t:.1f}s ({len(firsts)} shapes)",
              flush=True)
    state = _fit(model, data, 32, 2e-5, compile_=compile_)
    report("bert-base textune bf16 grouped b32" + (" compiled" if compile_ else ""),
           state.train_seconds, len(seqs), real, 6 * params, peak())


# ------------------------------------------------------------------------------ TinyLlama LoRA
def llama_setup():
    from transformers import LlamaConfig

    n = 64 if SMALL else int(os.environ.get("NL", 2048))
    if SMALL:
        cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, vocab_size=32000,
                          pad_token_id=0, num_labels=2)
    else:
        cfg = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                          num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
                          max_position_embeddings=2048, pad_token_id=0, num_labels=2)
    cfg._attn_implementation = "sdpa"
    lens = lengths_like_imdb(n, 250)
    rng = np.random.default_rng(2)
    seqs = [rng.integers(1000, 30000, int(x)) for x in lens]
    return cfg, seqs, rng.integers(0, 2, n), int(lens.sum())


def llama_trainer():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForSequenceClassification, Trainer, TrainingArguments

    cfg, seqs, labels, real = llama_setup()

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return len(seqs)

        def __getitem__(self, i):
            return {"input_ids": seqs[i].tolist(), "labels": int(labels[i])}

    def collate(feats):
        L = max(len(f["input_ids"]) for f in feats)
        ids = torch.zeros(len(feats), L, dtype=torch.long)
        m = torch.zeros_like(ids)
        for i, f in enumerate(feats):
            ids[i, :len(f["input_ids"])] = torch.tensor(f["input_ids"])
            m[i, :len(f["input_ids"])] = 1
        return {"input_ids": ids, "attention_mask": m,
                "labels": torch.tensor([f["labels"] for f in feats])}

    reset_peak()
    dt = torch.bfloat16 if DEV == "cuda" else torch.float32
    model = LlamaForSequenceClassification(cfg).to(dt).to(DEV)
    model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=16, lora_alpha=32,
                                             target_modules="all-linear"))
    args = TrainingArguments(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=8,
                             num_train_epochs=1, bf16=DEV == "cuda", learning_rate=1e-4,
                             report_to=[], save_strategy="no", logging_strategy="no",
                             dataloader_num_workers=2, disable_tqdm=True, use_cpu=DEV == "cpu")
    tr = Trainer(model=model, args=args, train_dataset=DS(), data_collator=collate)
    sync()
    t = time.perf_counter()
    tr.train()
    sync()
    report("tinyllama-1.1B Trainer+PEFT LoRA r16 bf16 b8", time.perf_counter() - t, len(seqs),
           real, 6 * 1.1e9, peak())


def llama_textune(gc=False, compile_=False):
    from transformers import LlamaModel

    from textune.modeling import TextClassifier, count_params
    from textune.plan import estimate
    from textune.strategies import get_strategy

    cfg, seqs, labels, real = llama_setup()
    data = _encoded(seqs, labels)
    reset_peak()
    dt = torch.bfloat16 if DEV == "cuda" else torch.float32
    backbone = LlamaModel(cfg).to(dt).to(DEV)
    if gc:
        backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = TextClassifier(backbone, 2)
    model.head.float()
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_strategy("lora", r=16, alpha=32, dropout=0.0, targets=targets).setup(model)
    model.to(DEV)
    trainable, total = count_params(model)
    plan = estimate(cfg, total, trainable, strategy="lora", batch_size=8, max_length=512,
                    precision="bf16" if DEV == "cuda" else "fp32", device=DEV,
                    gradient_checkpointing=gc, weight_bytes=2 if DEV == "cuda" else 4)
    if compile_:  # one batch per length bucket first; the warm-up is reported apart
        t = time.perf_counter()
        firsts = {}
        for i, s_ in enumerate(seqs):
            firsts.setdefault(-(-len(s_) // 64) * 64, []).append(i)
        warm = [i for idx in firsts.values() for i in (idx * 8)[:8]]
        _fit(model, _encoded([seqs[i] for i in warm], [labels[i] for i in warm]), 8, 1e-4,
             compile_=True)
        print(f"compile warm-up {time.perf_counter() - t:.1f}s ({len(firsts)} shapes)",
              flush=True)
        reset_peak()
    state = _fit(model, data, 8, 1e-4, compile_=compile_)
    report("tinyllama-1.1B textune LoRA r16 bf16 b8" + (" + grad ckpt" if gc else "")
           + (" compiled" if compile_ else ""),
           state.train_seconds, len(seqs), real, 6 * 1.1e9, peak(),
           plan_total_gib=round(plan.total / 2**30, 2),
           plan_parts_gib={k: round(v / 2**30, 2) for k, v in plan.as_dict().items()
                           if isinstance(v, float) and k != "free"})


# ------------------------------------------------------------------------------------- frozen
def frozen_classic():
    from torch import nn
    from transformers import BertModel

    cfg, seqs, labels, real = bert_setup()
    n = len(seqs)
    bert = BertModel(cfg).to(DEV)
    for p in bert.parameters():
        p.requires_grad_(False)
    h = cfg.hidden_size
    head = nn.Sequential(nn.Linear(h, 512), nn.ReLU(), nn.Dropout(0.1), nn.Linear(512, 2)).to(DEV)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-5)
    sync()
    t = time.perf_counter()
    for _ in range(5):
        for i in range(0, n, 32):
            b = seqs[i:i + 32]
            ids = torch.zeros(len(b), 250, dtype=torch.long)
            m = torch.zeros_like(ids)
            for r, s in enumerate(b):
                s = s[:250]
                ids[r, :len(s)] = torch.as_tensor(s)
                m[r, :len(s)] = 1
            out = bert(ids.to(DEV), m.to(DEV)).last_hidden_state[:, 0]
            y = torch.as_tensor(labels[i:i + 32], device=DEV)
            loss = nn.functional.cross_entropy(head(out), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    sync()
    report("frozen classic loop: pad 250 fp32, recompute 5 epochs", time.perf_counter() - t, n,
           real)


def frozen_textune():
    from transformers import BertModel

    from textune.api import compute_features
    from textune.config import RunConfig
    from textune.modeling import TextClassifier

    cfg, seqs, labels, real = bert_setup()
    # the same inputs as the classic loop: texts cut at 250 tokens
    data = _encoded([s_[:250] for s_ in seqs], labels)
    dt = torch.bfloat16 if DEV == "cuda" else torch.float32
    model = TextClassifier(BertModel(cfg).to(dt), 2, pooling="cls", head="mlp").to(DEV)
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    rc = RunConfig()
    rc.train.eval_batch_size = 256
    sync()
    t = time.perf_counter()
    feats = compute_features(model, data, rc, torch.device(DEV),
                             torch.bfloat16 if DEV == "cuda" else None, False)
    sync()
    t_feat = time.perf_counter() - t
    from textune.config import TrainArgs
    from textune.loop import build_accelerator, fit

    acc = build_accelerator("bf16" if DEV == "cuda" else "fp32")
    args = TrainArgs(epochs=5, batch_size=32, lr=1e-3, log_every=10**9)
    fit(model, feats, None, args, lr=1e-3, accelerator=acc, run_dir=Path(tempfile.mkdtemp()),
        evaluate=lambda x: {}, on_best=lambda: None, progress=False)
    sync()
    secs = time.perf_counter() - t
    report("frozen textune: features once bf16 sorted + 5 epochs", secs, len(seqs), real,
           features_s=round(t_feat, 2), head_5_epochs_s=round(secs - t_feat, 2))


# ---------------------------------------------------------------------------------- inference
def infer_setup(seed=3):
    tok_dir = Path(__file__).resolve().parent.parent / ".tok"
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    n = 256 if SMALL else 4096
    rng = np.random.default_rng(seed)
    vocab = [w for w in tok.get_vocab() if w.isalpha() and len(w) > 2][:20000]
    lens = lengths_like_imdb(n, 180, seed=seed, cap=3000)
    texts = [" ".join(rng.choice(vocab, int(x))) for x in lens]
    return tok, tok_dir, texts


def infer_pipeline():
    from transformers import BertForSequenceClassification, pipeline

    from textune.modeling import TextClassifier  # noqa: F401

    tok, _, texts = infer_setup()
    cfg, *_ = bert_setup()
    model = BertForSequenceClassification(cfg).to(torch.bfloat16 if DEV == "cuda" else torch.float32)
    pipe = pipeline("text-classification", model=model, tokenizer=tok,
                    device=0 if DEV == "cuda" else -1)
    pipe(texts[:3000], batch_size=32, truncation=True, max_length=512)
    sync()
    t = time.perf_counter()
    pipe(texts, batch_size=32, truncation=True, max_length=512)
    sync()
    secs = time.perf_counter() - t
    report("inference transformers pipeline bf16 b32", secs, len(texts), 0)


def infer_textune_cudnn():
    """infer_textune with cuDNN attention allowed (textune's default leaves it out)."""
    os.environ["TEXTUNE_CUDNN_ATTENTION"] = "1"
    try:
        infer_textune(", cuDNN attention allowed")
    finally:
        del os.environ["TEXTUNE_CUDNN_ATTENTION"]


def infer_textune_pad(multiple):
    """infer_textune with inference widths rounded to multiples of ``multiple`` instead of the
    default ladder (8: least padding, most shapes; 64: fewest shapes)."""
    os.environ["TEXTUNE_INFER_PAD"] = str(multiple)
    try:
        infer_textune(f", widths padded to {multiple}")
    finally:
        del os.environ["TEXTUNE_INFER_PAD"]


def infer_shapes():
    """The batch shapes GPU predict meets on the benchmark's texts (warm-up on the first 3,000,
    then all 4,096, as infer_textune), for each width rounding: the real chunked code path with
    a stand-in model that only records shapes, so it runs on any machine (no GPU needed)."""
    from textune import loop as train_mod
    from textune.classifier import Classifier
    from textune.config import RunConfig

    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.seen: list = []

        def forward(self, input_ids, **_):
            self.seen.append(tuple(input_ids.shape))
            return torch.zeros(input_ids.shape[0], 2)

    tok, _, texts = infer_setup()
    rc = RunConfig()
    rc.data.max_length = 512
    real = sum(len(x) for x in tok(texts, truncation=True, max_length=512)["input_ids"])
    gpu_batching = train_mod.gpu_batching
    train_mod.gpu_batching = lambda device: True
    try:
        for pad in (None, "8", "64"):
            if pad:
                os.environ["TEXTUNE_INFER_PAD"] = pad
            rec = Recorder()
            clf = Classifier(rec, tok, ["a", "b"], rc, "cpu")
            clf.CHUNK = Classifier.CHUNK
            clf._chunked_logits(texts[:3000], None, 64)
            warm, rec.seen = set(rec.seen), []
            clf._chunked_logits(texts, None, 64)
            print(json.dumps({"row": f"GPU predict shapes, widths {pad or 'ladder'}",
                              "batches": len(rec.seen), "shapes": len(set(rec.seen)),
                              "new_after_warm_up": len(set(rec.seen) - warm),
                              "padded_over_real": round(sum(r * w for r, w in rec.seen) / real - 1, 3)}),
                  flush=True)
            os.environ.pop("TEXTUNE_INFER_PAD", None)
    finally:
        train_mod.gpu_batching = gpu_batching


def infer_batch_times():
    """Why new texts are slower than warm ones: each inference batch timed alone (synchronised)
    the first time its shape is seen and again; the model has already run one other shape, so
    a first-time cost here is per shape, not per process."""
    from transformers import BertModel

    from textune.data import Encoded
    from textune.loop import inference_batches, inference_outputs, inference_pad
    from textune.modeling import TextClassifier

    tok, _, texts = infer_setup()
    cfg, *_ = bert_setup()
    model = TextClassifier(BertModel(cfg).to(torch.bfloat16), 2, pooling="cls").to(DEV).eval()
    ids = tok(texts, truncation=True, max_length=512)["input_ids"]
    enc = Encoded([np.asarray(x, dtype=np.int64) for x in ids], None, None, tok.pad_token_id)
    dev = torch.device(DEV)
    batches = inference_batches(enc, 64, dev)
    with torch.inference_mode():
        list(inference_outputs(model, enc, [list(range(3))], dev, None, batch_size=64))
        sync()
        times = []
        for _ in range(2):
            row = []
            for b in batches:
                t = time.perf_counter()
                for _, out in inference_outputs(model, enc, [b], dev, None, batch_size=64):
                    out.float().cpu()
                row.append(time.perf_counter() - t)
            times.append(row)
    pad = inference_pad(dev)
    from textune.data import padded_width

    shapes = [(len(b), padded_width(int(enc.lengths[b].max()), pad)) for b in batches]
    worst = sorted(range(len(batches)), key=lambda i: times[1][i] - times[0][i])[:8]
    print("slowest first-time batches (rows, width): first ms / again ms: " + ", ".join(
        f"{shapes[i]}: {1e3 * times[0][i]:.0f}/{1e3 * times[1][i]:.0f}" for i in worst),
        flush=True)
    report("inference batches, first time each shape", sum(times[0]), len(texts), 0,
           batches=len(batches), shapes=len(set(shapes)))
    report("inference batches, same shapes again", sum(times[1]), len(texts), 0)


def bert_textune_eager_attention(kind):
    """Eager BERT training rows with SDPA restricted to the named backends (an experiment)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    sets = {"no_cudnn": [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                         SDPBackend.MATH]}
    with sdpa_kernel(sets[kind]):
        print(f"SDPA backends: {kind}", flush=True)
        bert_textune()
        bert_textune(tokens=32768)


def infer_textune(note=""):
    from transformers import BertModel

    from textune.classifier import Classifier
    from textune.config import RunConfig
    from textune.modeling import TextClassifier

    tok, _, texts = infer_setup()
    cfg, *_ = bert_setup()
    rc = RunConfig()
    rc.data.max_length = 512
    model = TextClassifier(BertModel(cfg).to(torch.bfloat16 if DEV == "cuda" else torch.float32),
                           2, pooling="cls")
    clf = Classifier(model, tok, ["a", "b"], rc, DEV)
    seen: list = []
    clf.model.register_forward_pre_hook(
        lambda m, a, k: seen.append(tuple(k["input_ids"].shape)), with_kwargs=True)
    clf.predict(texts[:3000])  # the same warm-up as the pipeline row gets: shapes seen once
    warm, seen[:] = set(seen), []
    t = time.perf_counter()
    enc = clf.encode(texts)
    t_tok = time.perf_counter() - t
    sync()
    t = time.perf_counter()
    clf.predict(texts)
    sync()
    secs = time.perf_counter() - t
    report(f"inference textune predict (token budget, tokenizing overlapped{note})",
           secs, len(texts), int(enc.lengths.sum()), tokenize_alone_s=round(t_tok, 2),
           batches=len(seen), shapes=len(set(seen)), new_shapes=len(set(seen) - warm),
           padded_tokens=sum(r * w for r, w in seen))


def infer_pairs(reps=3):
    """The inference goal's figure, robust to the card's drift: pipeline and textune on the same
    model shape (bf16, as in infer_pipeline / infer_textune), both warmed on the same 3,000
    texts, then timed alternately on ``reps`` sets of 4,096 texts neither has seen (new
    lengths, new batch shapes), the order flipped each time. Prints each pair's ratio and,
    last, the median."""
    from transformers import BertForSequenceClassification, BertModel, pipeline

    from textune.classifier import Classifier
    from textune.config import RunConfig
    from textune.modeling import TextClassifier

    tok, _, warm = infer_setup()
    cfg, *_ = bert_setup()
    hf = BertForSequenceClassification(cfg).to(DEV, torch.bfloat16 if DEV == "cuda" else
                                               torch.float32).eval()
    pipe = pipeline("text-classification", model=hf, tokenizer=tok,
                    device=0 if DEV == "cuda" else -1)
    rc = RunConfig()
    rc.data.max_length = 512
    model = TextClassifier(BertModel(cfg).to(torch.bfloat16 if DEV == "cuda" else torch.float32),
                           2, pooling="cls")
    clf = Classifier(model, tok, ["a", "b"], rc, DEV)
    runs = {"pipeline": lambda x: pipe(x, batch_size=32, truncation=True, max_length=512),
            "textune": clf.predict}
    for run in runs.values():
        run(warm[:3000])
    ratios = []
    for r in range(reps):
        texts = infer_setup(seed=100 + r)[2]
        secs = {}
        for name in (("pipeline", "textune") if r % 2 == 0 else ("textune", "pipeline")):
            sync()
            t = time.perf_counter()
            runs[name](texts)
            sync()
            secs[name] = time.perf_counter() - t
        ratios.append(secs["pipeline"] / secs["textune"])
        report(f"inference pair {r + 1}: pipeline bf16 b32 vs textune predict, unseen texts",
               secs["textune"], len(texts), 0, pipeline_s=round(secs["pipeline"], 3),
               speedup_vs_pipeline=round(ratios[-1], 2))
    print(f"speedup_vs_pipeline_median={float(np.median(ratios)):.2f} "
          f"pairs={[round(x, 2) for x in ratios]}", flush=True)


# ---------------------------------------------------------------------------------- QLoRA
def qlora():
    """4-bit NF4 LoRA through the real CLI on a saved random LLaMA (bitsandbytes carried)."""
    import csv
    import subprocess

    from transformers import LlamaConfig, LlamaModel

    d = Path(tempfile.mkdtemp())
    cfg = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                      num_attention_heads=16, num_key_value_heads=4, vocab_size=32000,
                      pad_token_id=0)
    LlamaModel(cfg).save_pretrained(d / "m")
    tok, tok_dir, texts = infer_setup()
    tok.save_pretrained(d / "m")
    with open(d / "data.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for i, t in enumerate(texts[:600]):
            w.writerow([(" good " if i % 2 else " bad ") + t[:200], i % 2])
    r = subprocess.run([sys.executable, "-m", "textune", "train", "--model", str(d / "m"),
                        "--data", str(d / "data.csv"), "--strategy", "lora", "--load-in-4bit",
                        "--epochs", "1", "--max-length", "128", "--lr", "1e-3", "--out",
                        str(d / "run"), "--quiet"], capture_output=True, text=True)
    print("qlora exit", r.returncode, r.stdout[-800:], r.stderr[-1500:], flush=True)
    if r.returncode == 0:
        m = json.loads((d / "run" / "metrics.json").read_text())
        RESULTS.append({"row": "qlora smoke", "accuracy": m["accuracy"],
                        "peak_memory_mb": m["peak_memory_mb"]})
        print(json.dumps(RESULTS[-1]), flush=True)


# -------------------------------------------------------------------------------- diagnostics
def diag():
    """Where the host time goes: cores, thread settings, tokenization paths."""
    from textune.data import tokenize

    env = {k: os.environ.get(k) for k in ("TOKENIZERS_PARALLELISM", "RAYON_NUM_THREADS",
                                          "OMP_NUM_THREADS")}
    print(json.dumps({"cpu_count": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)),
                      "torch_threads": torch.get_num_threads(), **env}), flush=True)
    tok, _, texts = infer_setup()
    t = time.perf_counter()
    tok(texts, truncation=True, max_length=512, return_attention_mask=False)
    t_hf = time.perf_counter() - t
    t = time.perf_counter()
    tokenize(tok, texts, None, 512)
    report("tokenize 4096 texts: textune threads", time.perf_counter() - t, len(texts), 0,
           hf_call_s=round(t_hf, 2))


def features_profile():
    """compute_features on the frozen row's data: token budgets, and the kernels' share."""
    from transformers import BertModel

    import textune.loop as T
    from textune.api import compute_features
    from textune.config import RunConfig
    from textune.modeling import TextClassifier

    cfg, seqs, labels, real = bert_setup()
    data = _encoded([s_[:250] for s_ in seqs], labels)
    model = TextClassifier(BertModel(cfg).to(torch.bfloat16), 2, pooling="cls").to(DEV)
    rc = RunConfig()
    rc.train.eval_batch_size = 256
    compute_features(model, data, rc, torch.device(DEV), torch.bfloat16, False)  # warm
    for budget in (16384, 32768, 65536, 131072):
        T.INFER_TOKENS = budget
        sync()
        t = time.perf_counter()
        compute_features(model, data, rc, torch.device(DEV), torch.bfloat16, False)
        sync()
        report(f"features budget {budget}", time.perf_counter() - t, len(seqs), real,
               2 * 109_483_778)
    T.INFER_TOKENS = 32768
    for amp in (torch.bfloat16, None):
        sync()
        t = time.perf_counter()
        compute_features(model, data, rc, torch.device(DEV), amp, False)
        sync()
        report(f"features autocast {amp}", time.perf_counter() - t, len(seqs), real)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        compute_features(model, data, rc, torch.device(DEV), torch.bfloat16, False)
        sync()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14), flush=True)


def head_variants():
    """5 epochs of an MLP head, batch 32, on 8,192 x 768 features: the shared loop vs a bare
    loop vs one CUDA graph per step."""
    from torch import nn

    from textune.config import TrainArgs
    from textune.loop import FeatureData, build_accelerator, fit
    from textune.modeling import ClassifierHead

    n, h = 8192, 768
    x = torch.randn(n, h, device=DEV)
    y = torch.randint(0, 2, (n,), device=DEV)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = ClassifierHead(h, 2, "mlp", 0.1)

        def forward(self, features=None, **_):
            return self.head(features)

    m = M().to(DEV)
    acc = build_accelerator("bf16" if DEV == "cuda" else "fp32")
    sync()
    t = time.perf_counter()
    fit(m, FeatureData(x, y.cpu().numpy()), None, TrainArgs(epochs=5, batch_size=32, lr=1e-3,
        log_every=10**9), lr=1e-3, accelerator=acc, run_dir=Path(tempfile.mkdtemp()),
        evaluate=lambda z: {}, on_best=lambda: None, progress=False)
    sync()
    report("head 5 epochs: shared loop (fit)", time.perf_counter() - t, 5 * n, 0)

    m = M().to(DEV)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3, fused=DEV == "cuda")
    params = list(m.parameters())
    sync()
    t = time.perf_counter()
    for _ in range(5):
        perm = torch.randperm(n, device=DEV)
        for i in range(0, n, 32):
            idx = perm[i:i + 32]
            loss = nn.functional.cross_entropy(m(features=x[idx]).float(), y[idx])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
            opt.step()
            opt.zero_grad(set_to_none=True)
    sync()
    report("head 5 epochs: bare loop", time.perf_counter() - t, 5 * n, 0)

    if DEV != "cuda":
        return
    m = M().to(DEV)
    lr = torch.tensor(1e-3, device=DEV)
    opt = torch.optim.AdamW(m.parameters(), lr=lr, fused=True, capturable=True)
    params = list(m.parameters())
    sx = torch.zeros(32, h, device=DEV)
    sy = torch.zeros(32, dtype=torch.long, device=DEV)

    def step():
        loss = nn.functional.cross_entropy(m(features=sx).float(), sy)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        opt.step()
        return loss

    sync()
    t = time.perf_counter()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            opt.zero_grad(set_to_none=False)
            step()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=False)
    with torch.cuda.graph(g):
        opt.zero_grad(set_to_none=False)
        static_loss = step()
    capture = time.perf_counter() - t
    for e in range(5):
        perm = torch.randperm(n, device=DEV)
        for i in range(0, n, 32):
            idx = perm[i:i + 32]
            torch.index_select(x, 0, idx, out=sx)
            torch.index_select(y, 0, idx, out=sy)
            lr.fill_(1e-3 * (1 - (e * n + i) / (5 * n)))
            g.replay()
    sync()
    report("head 5 epochs: CUDA graph per step", time.perf_counter() - t, 5 * n, 0,
           capture_s=round(capture, 3), last_loss=round(static_loss.item(), 4))


def infer_profile():
    """Where predict's time goes: tokenizing, scoring pre-tokenized texts, chunking, kernels."""
    from transformers import BertModel

    from textune.classifier import Classifier
    from textune.config import RunConfig
    from textune.loop import predict_logits
    from textune.modeling import TextClassifier

    tok, _, texts = infer_setup()
    cfg, *_ = bert_setup()
    rc = RunConfig()
    rc.data.max_length = 512
    model = TextClassifier(BertModel(cfg).to(torch.bfloat16), 2, pooling="cls")
    clf = Classifier(model, tok, ["a", "b"], rc, DEV)
    clf.predict(texts)
    t = time.perf_counter()
    enc = clf.encode(texts)
    t_enc = time.perf_counter() - t
    for bs in (64, 256):
        sync()
        t = time.perf_counter()
        predict_logits(clf.model, enc, bs, torch.device(DEV), None)
        sync()
        report(f"predict_logits pre-tokenized rows cap {8 * bs}", time.perf_counter() - t,
               len(texts), int(enc.lengths.sum()), 2 * 109_483_778, encode_s=round(t_enc, 2))
    for chunk in (1024, 10**9):
        clf.CHUNK = chunk
        sync()
        t = time.perf_counter()
        clf.predict(texts)
        sync()
        report(f"predict chunk {chunk}", time.perf_counter() - t, len(texts), 0)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        predict_logits(clf.model, enc, 64, torch.device(DEV), None)
        sync()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12), flush=True)
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=8), flush=True)


ROWS = {"bert_trainer": bert_trainer, "bert_textune": bert_textune,
        "bert_textune_compile": lambda: bert_textune(True),
        "bert_textune_tokens": lambda: bert_textune(tokens=32768),
        "bert_textune_tokens_compile": lambda: bert_textune(True, tokens=32768),
        "llama_trainer": llama_trainer,
        "llama_textune": llama_textune, "llama_textune_gc": lambda: llama_textune(True),
        "llama_textune_compile": lambda: llama_textune(compile_=True),
        "frozen_classic": frozen_classic, "frozen_textune": frozen_textune,
        "infer_pipeline": infer_pipeline, "infer_textune": infer_textune,
        "infer_pairs": infer_pairs, "qlora": qlora,
        "diag": diag, "features_profile": features_profile, "head_variants": head_variants,
        "infer_profile": infer_profile, "infer_textune_cudnn": infer_textune_cudnn,
        "infer_textune_pad8": lambda: infer_textune_pad(8),
        "infer_textune_pad64": lambda: infer_textune_pad(64),
        "infer_batch_times": infer_batch_times, "infer_shapes": infer_shapes,
        "bert_eager_no_cudnn": lambda: bert_textune_eager_attention("no_cudnn")}


def main(rows=None):
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    print(f"device {torch.cuda.get_device_name() if DEV == 'cuda' else 'cpu'}, torch "
          f"{torch.__version__}, transformers {transformers.__version__}", flush=True)
    torch.backends.cuda.matmul.allow_tf32 = True
    extra = ("qlora", "llama_textune_compile", "diag", "features_profile", "head_variants",
             "infer_profile", "infer_textune_cudnn", "bert_eager_no_cudnn",
             "infer_textune_pad8", "infer_textune_pad64", "infer_batch_times", "infer_shapes")
    for name in rows or [r for r in ROWS if r not in extra]:
        try:
            ROWS[name]()
        except Exception as e:
            print(f"FAILED {name}: {type(e).__name__}: {str(e)[:400]}", flush=True)
        if DEV == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main(sys.argv[1:] or None)
