"""Tiny models and data built inside the tests: no network, seconds."""

from __future__ import annotations

import csv
import random
from pathlib import Path

import pytest

POS = ["good", "great", "fine", "superb", "lovely", "happy", "brilliant", "nice"]
NEG = ["bad", "awful", "poor", "boring", "terrible", "sad", "dull", "ugly"]
FILL = ["the", "film", "was", "a", "movie", "plot", "and", "it", "story", "actors", "very",
        "quite", "really", "this", "of", "in"]


def make_tokenizer(path: Path, words: list[str]) -> Path:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {t: i for i, t in enumerate(specials + sorted(set(words)))}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                 cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                                 model_max_length=128)
    hf.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide random BERT with a word-level vocabulary, saved as an HF folder."""
    import torch
    from transformers import BertConfig, BertModel

    path = tmp_path_factory.mktemp("tiny-bert")
    tok = make_tokenizer(path, POS + NEG + FILL + [str(i) for i in range(10)])
    del tok
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=5 + len(set(POS + NEG + FILL)) + 10, hidden_size=32,
                     num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     max_position_embeddings=128)
    BertModel(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A 2-layer random LLaMA decoder with the same word-level vocabulary and no pad token."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaModel, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny-llama")
    words = ["<s>", "</s>", "<unk>"] + sorted(set(POS + NEG + FILL))
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>", model_max_length=128).save_pretrained(path)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(words), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=128, bos_token_id=0, eos_token_id=1)
    LlamaModel(cfg).save_pretrained(path)
    return path


def toy_rows(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """Separable sentiment: a positive or negative cue word among filler words."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "pos" if i % 2 == 0 else "neg"
        words = rng.sample(FILL, rng.randint(3, 9)) + [rng.choice(POS if label == "pos" else NEG)]
        rng.shuffle(words)
        rows.append((" ".join(words), label))
    return rows


def write_csv(path: Path, rows, header=("text", "label")) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


@pytest.fixture
def toy_csv(tmp_path) -> Path:
    return write_csv(tmp_path / "toy.csv", toy_rows(1000))


@pytest.fixture(autouse=True)
def _isolated_home(request, tmp_path, monkeypatch):
    """Unit tests get an empty cache; the integration tests (``slow``) use the real one, so the
    packaged model and data are fetched once per machine."""
    if request.node.get_closest_marker("slow") is None:
        monkeypatch.setenv("TEXTUNE_HOME", str(tmp_path / "textune-home"))
