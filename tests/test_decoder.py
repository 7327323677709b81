"""Causal LMs as classifiers, on a tiny random LLaMA built in the test."""

import warnings
from pathlib import Path

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
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        clf = textune.load(out)
    # (PEFT reading a deprecated transformers property is not the user's to see)
    assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)]
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
    # a token budget is planned as its worth of full-length rows: 1024 / 64 = 16 rows
    assert main(["plan", "--model", str(tiny_llama), "--strategy", "lora", "--batch-tokens",
                 "1024", "--max-length", "64"]) == 0
    assert "batch 16 x 64 tokens" in capsys.readouterr().out
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


def _write_tiny_gguf(path):
    """A 2-layer random LLaMA with a byte-level BPE vocabulary, written as GGUF the way
    llama.cpp's converter does (q/k rows permuted). Returns the original HF model."""
    import gguf
    import numpy as np
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tokens = ["<s>", "</s>", "<unk>"] + [chr(c) for c in range(97, 123)] + ["Ġ", "go", "od", "ba"]
    cfg = LlamaConfig(vocab_size=len(tokens), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=128, bos_token_id=0, eos_token_id=1,
                      rms_norm_eps=1e-5, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(128)
    w.add_embedding_length(32)
    w.add_block_count(2)
    w.add_feed_forward_length(64)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(8)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 2] + [1] * (len(tokens) - 3))
    w.add_token_merges(["g o", "o d", "b a"])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    w.add_unk_token_id(2)

    def permute(x, n_head):
        return x.reshape(n_head, 2, x.shape[0] // n_head // 2, *x.shape[1:]).swapaxes(1, 2) \
            .reshape(x.shape)

    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    names = {"attn_norm": "input_layernorm", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
             "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    for i in range(2):
        p = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_q.weight", permute(sd[p + "self_attn.q_proj.weight"], 4))
        w.add_tensor(f"blk.{i}.attn_k.weight", permute(sd[p + "self_attn.k_proj.weight"], 2))
        for g, h in names.items():
            w.add_tensor(f"blk.{i}.{g}.weight", sd[p + h + ".weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model


def test_gguf_converts_once_to_an_equivalent_hf_folder(tmp_path):
    pytest.importorskip("gguf")
    from transformers import AutoTokenizer, LlamaForCausalLM

    from textune.modeling import resolve_model

    original = _write_tiny_gguf(tmp_path / "tiny.gguf")
    folder = Path(resolve_model(str(tmp_path / "tiny.gguf")))
    assert folder == tmp_path / "tiny-hf" and (folder / ".complete").exists()
    converted = LlamaForCausalLM.from_pretrained(folder).eval()
    ids = torch.tensor([[0, 5, 9, 12, 3, 30, 31]])
    with torch.no_grad():
        torch.testing.assert_close(converted(ids).logits, original(ids).logits)
    tok = AutoTokenizer.from_pretrained(folder)
    assert tok.convert_ids_to_tokens(tok("go bad")["input_ids"]) == ["go", "Ġ", "ba", "d"]
    # later runs use the cached folder: nothing is converted again
    mtime = (folder / "model.safetensors").stat().st_mtime_ns
    assert Path(resolve_model(str(tmp_path / "tiny.gguf"))) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == mtime
