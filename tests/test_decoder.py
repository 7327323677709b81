"""Causal LMs as classifiers, on a tiny random LLaMA built in the test."""

import pytest
import torch

import textune
from textune.api import train
from textune.modeling import TextClassifier, load_backbone, load_tokenizer

from .test_strategies import config


def test_pad_token_reuses_eos_without_resizing(tiny_llama):
    tok = load_tokenizer(str(tiny_llama))
    assert tok.pad_token == tok.eos_token == "</s>"
    model = load_backbone(str(tiny_llama))
    assert model.get_input_embeddings().weight.shape[0] == len(tok)


def test_last_token_pooling_matches_manual_gather_left_and_right(tiny_llama):
    """Right padding without a mask (our fast path) == masked == left padding, for real tokens."""
    torch.manual_seed(0)
    model = TextClassifier(load_backbone(str(tiny_llama)), 2).eval()
    assert model.causal and model.pooling == "last"
    rows = [[5, 6, 7, 8, 9], [10, 11, 12]]
    pad = 1
    right = torch.tensor([r + [pad] * (5 - len(r)) for r in rows])
    rmask = torch.tensor([[1] * len(r) + [0] * (5 - len(r)) for r in rows])
    left = torch.tensor([[pad] * (5 - len(r)) + r for r in rows])
    lmask = torch.tensor([[0] * (5 - len(r)) + [1] * len(r) for r in rows])
    with torch.no_grad():
        fast = model.features(right, rmask)  # no mask passed to the backbone
        # manual: run each row alone (no padding at all) and take its last hidden state
        manual = torch.stack([model.backbone(input_ids=torch.tensor([r])).last_hidden_state[0, -1]
                              for r in rows])
        hl = model.backbone(input_ids=left, attention_mask=lmask).last_hidden_state
        from textune.modeling import pool

        left_pooled = pool(hl, lmask, "last")
    assert torch.allclose(fast, manual, atol=1e-5)
    assert torch.allclose(left_pooled, manual, atol=1e-4)


@pytest.mark.parametrize("strategy", ["lora", "full"])
def test_decoder_trains_and_lora_head_reloads(strategy, tiny_llama, toy_csv, tmp_path):
    out = tmp_path / strategy
    lr = {"lora": 5e-3, "full": 1e-3}[strategy]
    m = train(config(tiny_llama, toy_csv, out, strategy, lr=lr, epochs=6), progress=False)
    assert m["accuracy"] >= 0.85, m["accuracy"]
    if strategy == "lora":
        assert (out / "adapter" / "adapter_model.safetensors").exists()
        assert (out / "head.safetensors").exists()
        assert not (out / "backbone").exists()
    clf = textune.load(out)
    again = clf.evaluate(textune.api.load_splits(clf.config).test)
    assert again["accuracy"] == pytest.approx(m["accuracy"], abs=1e-9)


def test_qlora_off_gpu_is_a_clear_error(tiny_llama, toy_csv, tmp_path, capsys):
    from textune.cli import main

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code = main(["train", "--model", str(tiny_llama), "--data", str(toy_csv), "--strategy", "lora",
                 "--load-in-4bit", "--out", str(tmp_path / "q")])
    err = capsys.readouterr().err
    assert code == 2 and "CUDA" in err and err.count("\n") == 1


def test_plan_and_batch_size_auto(tiny_llama, toy_csv, tmp_path, capsys):
    from textune.cli import main

    assert main(["plan", "--model", str(tiny_llama), "--strategy", "lora", "--batch-size", "8",
                 "--max-length", "64"]) == 0
    out = capsys.readouterr().out
    for part in ("weights", "gradients", "optimizer", "activations", "total", "free now"):
        assert part in out
    assert main(["train", "--model", str(tiny_llama), "--data", str(toy_csv), "--strategy",
                 "lora", "--batch-size", "auto", "--epochs", "1", "--out", str(tmp_path / "r"),
                 "--quiet"]) == 0
    import json

    m = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert m["batch_size"] * m["grad_accum"] >= 32
    assert m["memory_plan_mb"]["total"] > 0


def test_gradient_checkpointing_gives_same_gradients(tiny_llama):
    torch.manual_seed(0)
    ids = torch.randint(3, 20, (2, 12))
    mask = torch.ones_like(ids)
    grads = []
    for gc in (False, True):
        torch.manual_seed(1)
        m = TextClassifier(load_backbone(str(tiny_llama), gradient_checkpointing=gc), 2)
        m.train()
        for mod in m.modules():  # no dropout: compare exact math
            if isinstance(mod, torch.nn.Dropout):
                mod.p = 0.0
        m(ids, mask).sum().backward()
        grads.append(m.backbone.layers[0].mlp.down_proj.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6)
