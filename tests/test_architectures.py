"""Other encoder and decoder families than BERT and LLaMA, as users pass them: tiny random
models of each (the test vocabulary), trained, reloaded and predicting alike."""

from __future__ import annotations

import json

import numpy as np
import pytest

import textune
from textune.api import train
from textune.config import DataArgs, ModelArgs, RunConfig, StrategyArgs, TrainArgs

from .conftest import FILL, NEG, POS, make_tokenizer, toy_rows, write_csv

VOCAB = 5 + len(set(POS + NEG + FILL)) + 10
SMALL = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
             intermediate_size=64, max_position_embeddings=128)


def build(kind: str, path):
    import torch
    import transformers as T

    make_tokenizer(path, POS + NEG + FILL + [str(i) for i in range(10)])
    if kind == "roberta":  # a tokenizer that gives segment ids (0 first text, 1 the second)
        conf = json.loads((path / "tokenizer_config.json").read_text())
        conf["model_input_names"] = ["input_ids", "token_type_ids", "attention_mask"]
        (path / "tokenizer_config.json").write_text(json.dumps(conf))
        assert T.AutoTokenizer.from_pretrained(path)("a", "b")["token_type_ids"][-1] == 1
    torch.manual_seed(0)
    cfg = {
        # one segment embedding: the tokenizer's second-segment ids must not reach it
        "roberta": lambda: T.RobertaConfig(type_vocab_size=1, pad_token_id=0, **SMALL),
        "deberta-v2": lambda: T.DebertaV2Config(type_vocab_size=0, pad_token_id=0, **SMALL),
        "modernbert": lambda: T.ModernBertConfig(
            pad_token_id=0, bos_token_id=2, eos_token_id=3, cls_token_id=2, sep_token_id=3,
            global_attn_every_n_layers=1, **{k: v for k, v in SMALL.items()
                                             if k != "max_position_embeddings"}),
        # a decoder not in the adapter table, named as LLaMA is (o_proj, down_proj)
        "phi3": lambda: T.Phi3Config(num_key_value_heads=2, pad_token_id=0, **SMALL),
        "gpt2": lambda: T.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2),
        "mpnet": lambda: T.MPNetConfig(pad_token_id=0, **SMALL),
        "opt": lambda: T.OPTConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, ffn_dim=64, word_embed_proj_dim=32,
                                   max_position_embeddings=128, pad_token_id=0),
        # one layer's weights shared by all: adapters have no per-layer place
        "albert": lambda: T.AlbertConfig(pad_token_id=0, embedding_size=16, **SMALL),
    }[kind]()
    T.AutoModel.from_config(cfg).save_pretrained(path)
    return path


@pytest.mark.parametrize("kind,strategy,pairs,sites", [
    ("roberta", "full", True, None), ("deberta-v2", "adapter", False, 4),
    ("modernbert", "adapter", False, 4), ("phi3", "adapter", False, 4),
    # placed by layout, not by family name: MPNet, OPT, GPT-2's Conv1D projections
    ("mpnet", "adapter", False, 4), ("opt", "adapter", False, 4), ("gpt2", "adapter", False, 4)])
def test_family_trains_and_reloads(kind, strategy, pairs, sites, tmp_path):
    import pandas as pd

    rows = toy_rows(200)
    data = write_csv(tmp_path / "toy.csv", [(t, "ctx " + t.split()[0], y) for t, y in rows],
                     header=("text", "context", "label")) if pairs else \
        write_csv(tmp_path / "toy.csv", rows)
    out = tmp_path / "run"
    cfg = RunConfig(DataArgs(str(data), max_length=32, text_pair_col="context" if pairs else None),
                    ModelArgs(str(build(kind, tmp_path / kind))), StrategyArgs(strategy),
                    TrainArgs(epochs=1, batch_size=16, lr=1e-3, seed=0), str(out))
    m = train(cfg, progress=False)
    assert m["n_eval"] == 20 and 0 <= m["accuracy"] <= 1
    if sites:  # a bottleneck (down 32x2+2, up 2x32+32) after each attention and FFN output
        head = 32 * 2 + 2
        assert m["trainable_params"] == sites * (32 * 2 + 2 + 2 * 32 + 32) + head, m
    clf = textune.load(out)
    pred = pd.read_csv(out / "predictions.csv")
    probs = clf.predict_proba(pred["text"].tolist(),
                              pred["text_pair"].tolist() if pairs else None)
    assert np.allclose(probs, pred[["p_neg", "p_pos"]].to_numpy(), atol=1e-4)


def test_adapter_refuses_a_family_it_cannot_place_in_one_line(tmp_path, toy_csv):
    from textune.errors import UserError

    cfg = RunConfig(DataArgs(str(toy_csv), max_length=32),
                    ModelArgs(str(build("albert", tmp_path))), StrategyArgs("adapter"),
                    TrainArgs(epochs=1), str(tmp_path / "o"))
    with pytest.raises(UserError, match="'albert' model .* use --strategy lora"):
        train(cfg, progress=False)


def test_sentencepiece_tokenizer_without_tokenizer_json(tmp_path, monkeypatch):
    """DeBERTa-v3 as the hub has it: spm.model and no tokenizer.json. transformers converts
    it (sentencepiece + protobuf, textune's dependencies); the run saves the converted
    tokenizer, reloads and predicts alike. Without the packages: one line naming them."""
    import pandas as pd
    import sentencepiece as spm
    import transformers as T

    from textune.errors import UserError
    from textune.modeling import load_tokenizer

    rows = toy_rows(200)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(t for t, _ in rows))
    model = tmp_path / "deberta-v3"
    model.mkdir()
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(model / "spm"), vocab_size=60, model_type="unigram",
        pad_id=0, bos_id=1, eos_id=2, unk_id=3, pad_piece="[PAD]", bos_piece="[CLS]",
        eos_piece="[SEP]", unk_piece="[UNK]", user_defined_symbols=["[MASK]"], minloglevel=2)
    (model / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "DebertaV2Tokenizer", "do_lower_case": False}))
    small = {**SMALL, "vocab_size": 60}
    T.DebertaV2Model(T.DebertaV2Config(type_vocab_size=0, pad_token_id=0, **small)) \
        .save_pretrained(model)
    assert not (model / "tokenizer.json").exists()
    out = tmp_path / "run"
    m = train(RunConfig(DataArgs(str(write_csv(tmp_path / "toy.csv", rows)), max_length=32),
                        ModelArgs(str(model)), StrategyArgs("full"),
                        TrainArgs(epochs=1, batch_size=16, lr=1e-3, seed=0), str(out)),
              progress=False)
    assert m["n_eval"] == 20
    pred = pd.read_csv(out / "predictions.csv")
    assert np.allclose(textune.load(out).predict_proba(pred["text"].tolist()),
                       pred[["p_neg", "p_pos"]].to_numpy(), atol=1e-4)

    def without_packages(*a, **k):  # (what transformers raises when it cannot convert)
        raise ValueError("`tiktoken` is required to read a `tiktoken` file.")

    monkeypatch.setattr(T.AutoTokenizer, "from_pretrained", without_packages)
    monkeypatch.setattr("textune.modeling._importable", lambda mod: mod != "sentencepiece")
    with pytest.raises(UserError, match=r"needs sentencepiece: pip install sentencepiece$"):
        load_tokenizer(str(model))


ACME_CONFIG = '''from transformers import BertConfig


class AcmeConfig(BertConfig):
    model_type = "acme_bert"
'''
ACME_MODEL = '''from transformers import BertModel

from .configuration_acme import AcmeConfig


class AcmeModel(BertModel):
    config_class = AcmeConfig
'''


@pytest.mark.parametrize("strategy", ["full", "lora"])
def test_model_with_code_of_its_own_needs_trust_remote_code(strategy, tmp_path, capsys):
    """A repository that brings its own modelling code (config.json auto_map, as nomic or jina
    embedding models do): refused in one line without --trust-remote-code; with it, it trains,
    and the run reloads (with the flag it was made with) and predicts alike."""
    import pandas as pd
    import transformers as T

    from textune.cli import main

    model = tmp_path / "acme"
    make_tokenizer(model, POS + NEG + FILL + [str(i) for i in range(10)])
    T.BertModel(T.BertConfig(**SMALL)).save_pretrained(model)
    (model / "configuration_acme.py").write_text(ACME_CONFIG)
    (model / "modeling_acme.py").write_text(ACME_MODEL)
    conf = json.loads((model / "config.json").read_text())
    conf.update(model_type="acme_bert", architectures=["AcmeModel"], auto_map={
        "AutoConfig": "configuration_acme.AcmeConfig", "AutoModel": "modeling_acme.AcmeModel"})
    (model / "config.json").write_text(json.dumps(conf))
    data = write_csv(tmp_path / "toy.csv", toy_rows(200))
    args = ["train", "--model", str(model), "--data", str(data), "--strategy", strategy,
            "--epochs", "1", "--lr", "1e-3", "--max-length", "32", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err
    assert "runs only with --trust-remote-code" in err and "Traceback" not in err
    assert "Do you wish to run the custom code" not in err  # (transformers' prompt: it waits)
    out = tmp_path / "run"
    assert main([*args, "--trust-remote-code", "--out", str(out)]) == 0
    clf = textune.load(out)
    assert type(clf.model.backbone).__name__ in ("AcmeModel", "PeftModel", "LoraModel")
    pred = pd.read_csv(out / "predictions.csv")
    assert np.allclose(clf.predict_proba(pred["text"].tolist()),
                       pred[["p_neg", "p_pos"]].to_numpy(), atol=1e-4)
