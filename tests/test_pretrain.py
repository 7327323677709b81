"""Continued pretraining on tiny models: masking rules and proportions, NSP pairs and segment
ids, the streaming token cache, Chinese and English sentence splitting, and the job end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest

from textune.cli import main
from textune.pretraining import (
    PretrainData,
    TokenCache,
    _Docs,
    iter_documents,
    real_vocab_ids,
    split_sentences,
    train_wordpiece,
)

EN = ("The film opens in a quiet town. Nobody expects much! The actors are very good. "
      "Is the plot any good? It is quite boring in the middle.")
ZH = "今天天气很好。我们去公园散步吧！你觉得怎么样？他说：“好啊。”然后我们出发了；路上很安静……"


def test_sentence_splitting_english_and_chinese():
    assert split_sentences(EN) == ["The film opens in a quiet town.", "Nobody expects much!",
                                   "The actors are very good.", "Is the plot any good?",
                                   "It is quite boring in the middle."]
    assert split_sentences(ZH) == ["今天天气很好。", "我们去公园散步吧！", "你觉得怎么样？",
                                   "他说：“好啊。”", "然后我们出发了；", "路上很安静……"]
    # no split inside numbers or abbreviations followed by lower case
    assert split_sentences("It costs 3.5 dollars. e.g. this one") == [
        "It costs 3.5 dollars. e.g. this one"]


@pytest.fixture
def corpus(tmp_path):
    rng = np.random.default_rng(0)
    words = ["film", "plot", "actor", "scene", "story", "music", "town", "night", "quiet",
             "good", "bad", "long", "short", "very", "the", "a", "is", "was"]
    docs = []
    for _ in range(60):
        sents = [" ".join(rng.choice(words, size=rng.integers(4, 12))).capitalize() + "."
                 for _ in range(rng.integers(3, 9))]
        docs.append(" ".join(sents))
    zh = [f"第{i}天天气很好。我们第{i}次去公园散步吧！他说：“好啊{i}。”然后我们{i}点出发了；"
          f"路上{i}个人很安静。" for i in range(10)]
    p = tmp_path / "corpus.txt"
    p.write_text("\n\n".join(docs + zh) + "\n", encoding="utf-8")
    return p


@pytest.fixture
def cache_and_tok(corpus, tmp_path):
    tok = train_wordpiece([corpus], 60, tmp_path / "tok")  # small: words split
    cache = TokenCache.build([corpus], tok, tmp_path / "cache", wwm=True, progress=False)
    return cache, tok


def test_token_cache_matches_the_corpus(corpus, cache_and_tok):
    cache, tok = cache_and_tok
    docs = list(iter_documents([corpus]))
    assert cache.n_docs == len(docs) == 70
    assert cache.meta["sentences"] == sum(len(d) for d in docs)
    # the memory-mapped arrays give back each sentence's tokens exactly
    for d in (0, 17, 65):
        s0, s1 = cache.doc_sentences(d)
        assert s1 - s0 == len(docs[d])
        for k, s in enumerate(range(s0, s1)):
            a, b = cache.sentence(s)
            want = tok(docs[d][k], add_special_tokens=False)["input_ids"]
            assert cache.tokens[a:b].tolist() == want
    assert isinstance(cache.tokens, np.memmap) and cache.tokens.dtype == np.uint16
    # built once: a second build reuses the files
    mtime = (cache.folder / "tokens.bin").stat().st_mtime_ns
    again = TokenCache.build([corpus], tok, cache.folder, wwm=True, progress=False)
    assert (again.folder / "tokens.bin").stat().st_mtime_ns == mtime


def test_token_cache_ignores_padding_and_truncation_in_tokenizer_json(corpus, tmp_path):
    # sentence-transformers tokenizers ship tokenizer.json with fixed padding to 128: the
    # cache must hold the sentences' own tokens, no [PAD], nothing cut
    from transformers import AutoTokenizer

    tok = train_wordpiece([corpus], 60, tmp_path / "tok")
    tok.backend_tokenizer.enable_padding(length=32, pad_id=tok.pad_token_id,
                                         pad_token=tok.pad_token)
    tok.backend_tokenizer.enable_truncation(max_length=4)
    tok.save_pretrained(tmp_path / "padded")
    tok = AutoTokenizer.from_pretrained(tmp_path / "padded")
    assert tok.backend_tokenizer.padding is not None  # the trap is really there
    cache = TokenCache.build([corpus], tok, tmp_path / "cache", wwm=False, progress=False)
    assert tok.pad_token_id not in set(np.unique(cache.tokens).tolist())
    first = next(iter(iter_documents([corpus])))[0]
    a, b = cache.sentence(0)
    assert b - a > 4 and tok.decode(cache.tokens[a:b].tolist()) == tok.decode(
        tok(first, add_special_tokens=False, truncation=False, padding=False)["input_ids"])


def test_mlm_masking_rules_and_proportions(cache_and_tok):
    cache, tok = cache_and_tok
    data = PretrainData(cache, tok, _Docs(range(cache.n_docs)), max_length=64, nsp=False,
                        wwm=False, seed=0)
    specials = set(tok.all_special_ids)
    allowed = set(real_vocab_ids(tok).tolist())
    assert not allowed & specials
    n_cand = n_sel = n_mask = n_rand = n_keep = 0
    for i in [k % len(data) for k in range(8 * len(data))]:  # ~4k selections
        ex = data.example(i)
        ids, labels = data.mask_tokens(ex, np.random.default_rng(n_cand))
        sel = labels != -100
        # never a special token (CLS / SEP), labels are the original ids
        assert not ex["special"][sel].any()
        assert (labels[sel] == ex["ids"][sel]).all()
        assert (ids[~sel] == ex["ids"][~sel]).all()
        n_cand += int((ex["special"] == 0).sum())
        n_sel += int(sel.sum())
        n_mask += int((ids[sel] == tok.mask_token_id).sum())
        changed = sel & (ids != ex["ids"]) & (ids != tok.mask_token_id)
        assert set(ids[changed].tolist()) <= allowed  # random tokens from the real vocabulary
        n_rand += int(changed.sum())
        n_keep += int((sel & (ids == ex["ids"])).sum())
    assert n_sel / n_cand == pytest.approx(0.15, abs=0.01)
    assert n_mask / n_sel == pytest.approx(0.8, abs=0.03)
    # a random token may equal the original by chance: counted as kept
    assert n_rand / n_sel == pytest.approx(0.1, abs=0.03)
    assert n_keep / n_sel == pytest.approx(0.1, abs=0.03)


def test_whole_word_masking_masks_whole_words(cache_and_tok):
    cache, tok = cache_and_tok
    data = PretrainData(cache, tok, _Docs(range(cache.n_docs)), max_length=64, nsp=False,
                        wwm=True, seed=0)
    split_words = 0
    for i in range(len(data)):
        ex = data.example(i)
        _, labels = data.mask_tokens(ex, np.random.default_rng(i))
        sel = labels != -100
        for p in range(1, len(sel)):
            if ex["ws"][p] == 0 and ex["special"][p] == 0:  # a continuation piece
                split_words += 1
                assert sel[p] == sel[p - 1], "a word was masked only in part"
    assert split_words > 0  # the tiny vocabulary does split words into pieces


def test_nsp_pairs_and_segment_ids(cache_and_tok):
    cache, tok = cache_and_tok
    docs = _Docs(range(cache.n_docs))
    data = PretrainData(cache, tok, docs, max_length=48, nsp=True, wwm=False, seed=0)
    labels = []
    for i in range(len(data)):
        ex = data.example(i)
        ids, seg = ex["ids"], ex["seg"]
        assert len(ids) <= 48 and set(seg.tolist()) <= {0, 1}
        seps = np.flatnonzero(ids == tok.sep_token_id)
        assert ids[0] == tok.cls_token_id and len(seps) == 2 and seps[1] == len(ids) - 1
        assert (seg[:seps[0] + 1] == 0).all() and (seg[seps[0] + 1:] == 1).all()
        a = ids[1:seps[0]].tolist()
        b = ids[seps[0] + 1:-1].tolist()
        assert a and b
        s0, s1 = int(data.starts[i]), int(data.ends[i])
        chunk = cache.tokens[cache.sentence(s0)[0]:cache.sentence(s1 - 1)[1]].tolist()
        assert chunk[:len(a)] == a  # A opens the chunk (its end may be truncated)
        follows = any(chunk[k:k + len(b)] == b for k in range(len(a), len(chunk)))
        if ex["is_next"]:  # B is the text after A in the same document
            assert follows
        elif len(b) >= 4:  # B comes from another document (a short B may recur by chance)
            assert not follows
        labels.append(ex["is_next"])
    assert 0.35 < np.mean(labels) < 0.65
    batch = data.collate(list(range(8)))
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels",
                          "next_sentence_label"}


def test_pretrain_from_scratch_then_finetune(corpus, tmp_path, toy_csv):
    out = tmp_path / "pt"
    code = main(["pretrain", "--corpus", str(corpus), "--init", "scratch", "--objective",
                 "mlm+nsp", "--vocab-size", "300", "--size", "tiny", "--max-length", "64",
                 "--epochs", "10", "--lr", "2e-3", "--batch-size", "8", "--eval-fraction", "0.2", "--out",
                 str(out), "--quiet"])
    assert code == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["eval_mlm_loss_after"] < 0.8 * m["eval_mlm_loss_before"]
    assert "eval_nsp_accuracy" in m and m["steps"] > 0
    # the output is a plain encoder folder that `train` fine-tunes directly
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["BertModel"]
    code = main(["train", "--model", str(out), "--data", str(toy_csv), "--epochs", "1",
                 "--out", str(tmp_path / "ft"), "--quiet"])
    assert code == 0


def test_continue_a_checkpoint_without_heads_says_so(tiny_bert, corpus, tmp_path, caplog):
    out = tmp_path / "cont"
    code = main(["pretrain", "--corpus", str(corpus), "--model", str(tiny_bert), "--objective",
                 "mlm+nsp", "--max-steps", "3", "--batch-size", "4", "--out", str(out),
                 "--quiet"])
    assert code == 0
    m = json.loads((out / "metrics.json").read_text())
    assert any("cls" in h for h in m["heads_initialised"])
    assert "initialised" in caplog.text


def test_continued_pretraining_resumes_from_its_checkpoint(tiny_bert, corpus, tmp_path,
                                                           monkeypatch):
    """A pretrain of a pretrained model, crashed after a checkpoint, resumes to the same end as
    an uninterrupted run (it used to rebuild a scratch-shaped BERT and refuse the checkpoint)."""
    import textune.loop as loop

    def run(out, *extra):
        return main(["pretrain", "--corpus", str(corpus), "--model", str(tiny_bert),
                     "--max-length", "32", "--epochs", "2", "--batch-size", "4", "--save-every",
                     "3", "--precision", "fp32", "--out", str(out), "--quiet", *extra])

    assert run(tmp_path / "ref") == 0
    real_save, saves = loop.save_checkpoint, []

    def crash_after_second_save(*a, **k):
        real_save(*a, **k)
        saves.append(1)
        if len(saves) == 2:
            raise RuntimeError("simulated crash")

    monkeypatch.setattr(loop, "save_checkpoint", crash_after_second_save)
    with pytest.raises(RuntimeError, match="simulated"):
        run(tmp_path / "run")
    monkeypatch.setattr(loop, "save_checkpoint", real_save)
    assert main(["pretrain", "--resume", str(tmp_path / "run"), "--quiet"]) == 0
    ref = json.loads((tmp_path / "ref" / "metrics.json").read_text())
    got = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert got["steps"] == ref["steps"] and got["total_params"] == ref["total_params"]
    assert got["eval_mlm_loss_after"] == pytest.approx(ref["eval_mlm_loss_after"], rel=1e-3)


def test_pretrain_in_two_processes(corpus, tmp_path):
    """--num-processes 2: one tokenizer and token cache (built by the main process first), the
    steps of one process's global batch, one encoder written; the held-out set is scored in
    shares and added up: the figures of one process."""
    import os
    import subprocess
    import sys

    out = tmp_path / "pt2"
    args = ["pretrain", "--corpus", str(corpus), "--init", "scratch", "--vocab-size", "300",
            "--size", "tiny", "--max-length", "64", "--epochs", "6", "--lr", "2e-3",
            "--batch-size", "8", "--eval-fraction", "0.2", "--precision", "fp32",
            "--num-processes", "2", "--out", str(out), "--quiet"]
    done = subprocess.run([sys.executable, "-m", "textune.cli", *args], capture_output=True,
                          text=True, timeout=300,
                          env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    assert done.returncode == 0, done.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["processes"] == 2
    assert m["steps"] == 6 * -(-m["train_examples"] // 8)  # the global batch is kept
    assert m["eval_mlm_loss_after"] < 0.9 * m["eval_mlm_loss_before"]
    assert json.loads((out / "config.json").read_text())["architectures"] == ["BertModel"]
    # one process, the same seed (the same weights before training): the same held-out loss
    one = tmp_path / "pt1"
    i = args.index("--num-processes")
    assert main([*args[:i], *args[i + 2:-3], "--max-steps", "1", "--out", str(one),
                 "--quiet"]) == 0
    m1 = json.loads((one / "metrics.json").read_text())
    assert m1["eval_masked_tokens"] == m["eval_masked_tokens"] > 0
    assert m1["eval_mlm_loss_before"] == pytest.approx(m["eval_mlm_loss_before"], rel=1e-5)


def test_pretrain_bad_input(tmp_path, capsys):
    code = main(["pretrain", "--corpus", str(tmp_path / "missing.txt"), "--init", "scratch",
                 "--out", str(tmp_path / "o")])
    assert code == 2 and "--corpus" in capsys.readouterr().err


def test_masked_positions_only_head_equals_the_full_head_loss():
    # the fast path projects only the masked positions (their count bucketed with ignored
    # rows); its loss must equal HF's loss over the full vocabulary projection
    import torch
    from transformers import BertConfig, BertForPreTraining

    from textune.pretraining import PretrainModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)
    bert = BertForPreTraining(cfg).eval()
    ids = torch.randint(5, 50, (3, 20))
    mask = torch.ones_like(ids)
    types = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    labels[0, 3], labels[1, 7], labels[1, 8], labels[2, 19] = 11, 12, 13, 14  # 4: bucket pads 60
    nsl = torch.tensor([1, 0, 1])  # ours: 1 = B follows A
    ours = PretrainModel(bert, nsp=True)(ids, mask, types, labels=labels, next_sentence_label=nsl)
    hf = bert(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels,
              next_sentence_label=1 - nsl).loss
    torch.testing.assert_close(ours, hf)


def test_pretrain_from_python_then_fit(corpus, tmp_path, toy_csv):
    import textune
    from textune.errors import UserError

    m = textune.pretrain(corpus, tmp_path / "pt", vocab_size=300, size="tiny", max_length=64,
                         max_steps=4, batch_size=8, progress=False)
    assert m == json.loads((tmp_path / "pt" / "metrics.json").read_text())
    assert m["steps"] == 4 and "eval_mlm_loss_after" in m  # (init: scratch, as without a model)
    clf = textune.fit(toy_csv, tmp_path / "ft", model=tmp_path / "pt", epochs=1,
                      progress=False)
    assert clf.predict(["good film"])[0] in ("neg", "pos")
    with pytest.raises(UserError, match="--model and --init scratch exclude each other"):
        textune.pretrain(corpus, tmp_path / "x", model=str(tmp_path / "pt"), init="scratch")
    with pytest.raises(UserError, match="strategy=: not a pretrain option"):
        textune.pretrain(corpus, tmp_path / "x", strategy="lora")
