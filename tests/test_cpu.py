"""The CPU training fast path (textune.cpu): dropout masks, attention, and the swap in and out."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from textune import cpu


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_keep_mask_keeps_one_minus_p(p):
    torch.manual_seed(0)
    keep = cpu.keep_mask(torch.Size([1000, 999]), p)  # n not a multiple of 4
    assert keep.shape == (1000, 999) and keep.dtype == torch.bool
    assert abs(keep.float().mean().item() - (1 - p)) < 0.003
    # no lane of the 64-bit draws is biased (a draw's top bit would be, without the full range)
    lanes = keep.flatten()[: 4 * (keep.numel() // 4)].view(-1, 4).float().mean(0)
    assert (lanes - (1 - p)).abs().max().item() < 0.006
    torch.manual_seed(0)
    assert torch.equal(cpu.keep_mask(torch.Size([1000, 999]), p), keep)  # seeded: reproducible


def test_dropout_is_inverted_dropout_with_matching_gradient():
    torch.manual_seed(0)
    x = torch.full((400, 500), 2.0, requires_grad=True)
    y = cpu.dropout(x, 0.1)
    zero = (y == 0).float().mean().item()
    assert abs(zero - 0.1) < 0.005
    scale = 65536 / (65536 - round(0.1 * 65536))
    assert torch.allclose(y[y != 0], torch.tensor(2.0 * scale))
    assert abs(y.mean().item() - 2.0) < 0.02  # expectation kept
    y.sum().backward()
    assert torch.equal(x.grad, (y / 2.0).detach())  # gradient flows through kept elements only
    assert torch.equal(cpu.dropout(x, 0.0), x)
    assert cpu.dropout(x, 1.0).abs().sum().item() == 0


def _qkv_mask(b=3, h=2, t=7, d=8):
    torch.manual_seed(1)
    q, k, v = (torch.randn(b, h, t, d) for _ in range(3))
    lengths = torch.tensor([t, 4, 2])
    keep = torch.arange(t)[None, :] < lengths[:, None]
    return q, k, v, keep[:, None, None, :].expand(b, 1, t, t)


class _Layer(torch.nn.Module):
    is_causal = False


def test_attention_matches_sdpa_without_dropout_and_applies_its_mask_with_it():
    q, k, v, mask = _qkv_mask()
    layer = _Layer().train()
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)
    # a rate below 1/65536 takes the math path but drops nothing
    out, _ = cpu.attention(layer, q, k, v, mask, dropout=1e-6)
    assert torch.allclose(out, ref, atol=1e-5)
    bias = torch.zeros(mask.shape).masked_fill_(~mask, torch.finfo(torch.float32).min)
    assert torch.allclose(cpu.attention(layer, q, k, v, bias, dropout=1e-6)[0], ref, atol=1e-5)
    ref_nomask = F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
    assert torch.allclose(cpu.attention(layer, q, k, v, None, dropout=1e-6)[0], ref_nomask,
                          atol=1e-5)
    # with dropout: softmax(QK^T) with the mask the generator gives, scaled, then V
    torch.manual_seed(5)
    out, _ = cpu.attention(layer, q, k, v, mask, dropout=0.25)
    torch.manual_seed(5)
    scores = (q @ k.transpose(-1, -2)) / 8 ** 0.5
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    keep = cpu.keep_mask(probs.shape, 0.25)
    expect = (probs * keep / 0.75) @ v
    assert torch.allclose(out, expect.transpose(1, 2), atol=1e-5)
    # eval mode, or a causal layer: SDPA itself
    layer.eval()
    assert torch.allclose(cpu.attention(layer, q, k, v, mask, dropout=0.0)[0], ref, atol=1e-6)


class _Decoder(torch.nn.Module):
    is_causal = True
    num_key_value_groups = 3


def test_attention_in_bf16_training_is_the_math_and_matches_sdpa(monkeypatch):
    """CPU training under bf16 autocast, no dropout (a LLaMA layer: causal, grouped key/value
    heads): the math path (SDPA's flash backward is several times slower there), with the
    numbers SDPA gives, forward and backward; fp32, eval, long sequences and a cache keep SDPA."""
    import transformers.integrations.sdpa_attention as sa

    torch.manual_seed(0)
    b, t, d = 4, 12, 16
    q = torch.randn(b, 6, t, d, requires_grad=True)
    k, v = (torch.randn(b, 2, t, d, requires_grad=True) for _ in range(2))
    lengths = torch.tensor([t, 9, 5, 1])
    pad = torch.arange(t)[None, :] < lengths[:, None]
    mask = torch.ones(t, t, dtype=torch.bool).tril()[None, None] & pad[:, None, None, :]
    layer = _Decoder().train()

    def sdpa(m):
        kk, vv = (x.repeat_interleave(3, dim=1) for x in (k, v))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return F.scaled_dot_product_attention(q, kk, vv, attn_mask=m,
                                                  is_causal=m is None).transpose(1, 2)

    calls = []
    real = sa.sdpa_attention_forward
    monkeypatch.setattr(sa, "sdpa_attention_forward", lambda *a, **kw: calls.append(1) or
                        real(*a, **kw))
    for m in (mask, None):  # (no mask: causal from the layer's flag, as SDPA does)
        ref = sdpa(m)
        grads_ref = torch.autograd.grad(ref.float().square().sum(), (q, k, v))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, _ = cpu.attention(layer, q, k, v, m)
        assert not calls and out.dtype == torch.bfloat16
        assert torch.allclose(out.float(), ref.float(), atol=0.03), m is None
        grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
        for g, g_ref in zip(grads, grads_ref):
            assert torch.allclose(g, g_ref, atol=0.1, rtol=0.05), m is None
    for how in ("fp32", "eval", "long", "cache"):
        layer.train(how != "eval")
        qq, kk, vv = (x[:, :, :1].expand(-1, -1, cpu.MATH_BF16_MAX_LENGTH + 1, -1)
                      for x in (q, k, v)) if how == "long" else (q, k, v)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=how != "fp32"):
            cpu.attention(layer, qq, kk, vv, None, cache=object() if how == "cache" else None)
        assert len(calls) == 1, how
        calls.clear()


def _tiny_bert(attn_dropout=0.1):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=32,
                     attention_probs_dropout_prob=attn_dropout)
    return BertModel(cfg)


def test_fast_training_swaps_in_and_puts_everything_back():
    from torch import nn

    model = _tiny_bert()
    ids = torch.randint(5, 50, (4, 9))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    eval_ref = model.eval()(input_ids=ids, attention_mask=mask).last_hidden_state
    fast = cpu.fast_training(model, torch.device("cpu"))
    assert model.config._attn_implementation == cpu.ATTENTION
    tables = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    assert len(tables) == 3 and all(type(m) is cpu.Embedding for m in tables)  # words, positions, types
    drops = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert drops and all(type(m) is cpu.Dropout for m in drops)
    # eval: the same numbers as before; training: dropout on, from the seeded generator
    assert torch.allclose(model(input_ids=ids, attention_mask=mask).last_hidden_state, eval_ref,
                          atol=1e-5)
    model.train()
    torch.manual_seed(3)
    a = model(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.manual_seed(3)
    b = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.equal(a, b) and not torch.allclose(a, eval_ref, atol=1e-3)
    a.sum().backward()
    assert all(p.grad is not None for p in model.encoder.parameters())
    assert model.embeddings.word_embeddings.weight.grad is fast.tables[0].buf
    fast.restore()
    assert model.config._attn_implementation == "sdpa"
    assert all(type(m) is nn.Dropout for m in drops)
    assert all(type(m) is nn.Embedding and not hasattr(m, "_textune_rows") for m in tables)
    assert cpu.ATTENTION not in str(model.config.to_dict())  # never saved into config.json


def test_fast_training_is_off_elsewhere(monkeypatch):
    from torch import nn

    model = _tiny_bert(attn_dropout=0.0)
    cpu.fast_training(model, torch.device("cpu"))
    # no attention dropout: attention() still decides call by call (bf16: the math; else SDPA)
    assert model.config._attn_implementation == cpu.ATTENTION
    assert all(type(m) is cpu.Dropout for m in model.modules() if isinstance(m, nn.Dropout))
    for off in (dict(device=torch.device("meta")), dict(env="0")):
        model = _tiny_bert()
        if "env" in off:
            monkeypatch.setenv("TEXTUNE_CPU_FASTPATH", "0")
        fast = cpu.fast_training(model, off.get("device", torch.device("cpu")))
        assert not fast.on and not fast.tables
        assert model.config._attn_implementation == "sdpa"
        assert all(type(m) is nn.Dropout for m in model.modules() if isinstance(m, nn.Dropout))
        assert all(type(m) is nn.Embedding for m in model.modules() if isinstance(m, nn.Embedding))
    # several processes: DDP must see each gradient arrive, so embeddings keep autograd's
    monkeypatch.delenv("TEXTUNE_CPU_FASTPATH")
    model = _tiny_bert()
    fast = cpu.fast_training(model, torch.device("cpu"), distributed=True)
    assert fast.on and not fast.tables and model.config._attn_implementation == cpu.ATTENTION


class _Bag(torch.nn.Module):
    """Embedding, mean over positions, linear: a model whose table is all of the update."""

    def __init__(self, tied: bool = False):
        super().__init__()
        self.emb = torch.nn.Embedding(40, 6, padding_idx=0)
        self.out = torch.nn.Linear(6, 40)
        if tied:
            self.out.weight = self.emb.weight

    def forward(self, ids):
        return self.out(self.emb(ids).mean(1))


def _train(model, fast, steps, max_norm, fused=True, accumulate=2):
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.01, fused=fused)
    params = list(model.parameters())
    gen = torch.Generator().manual_seed(0)
    touched = []
    for _ in range(steps):
        for _ in range(accumulate):  # gradient accumulation: two backwards, one step
            ids = torch.randint(0, 40, (3, 5), generator=gen)
            ids[0, 3:] = 0  # padding
            y = torch.randint(0, 40, (3,), generator=gen)
            F.cross_entropy(model(ids) * 4, y).backward()
            touched.append(ids)
        if fast is None:
            if max_norm:
                torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
            opt.step()
        else:
            rows = model.emb.weight.grad.abs().sum(1).nonzero().flatten()
            ids = torch.cat(touched).unique()
            assert set(rows.tolist()) <= set(ids[ids != 0].tolist())  # only the batch's rows
            fast.step(opt, params, max_norm)
        opt.zero_grad(set_to_none=True)
        touched.clear()
    return model


@pytest.mark.parametrize("max_norm", [0.05, 0.0])
@pytest.mark.parametrize("fused", [True, False])
def test_row_gradients_and_folded_clip_train_as_autograd_and_clip_grad_norm(max_norm, fused):
    import copy

    torch.manual_seed(0)
    ref = _Bag()
    model = copy.deepcopy(ref)
    fast = cpu.fast_training(model, torch.device("cpu"))
    assert type(model.emb) is cpu.Embedding and fast.tables
    _train(ref, None, 6, max_norm, fused)
    _train(model, fast, 6, max_norm, fused)
    for a, b in zip(ref.parameters(), model.parameters()):
        assert torch.allclose(a, b, atol=1e-6), (a - b).abs().max()
    assert torch.equal(model.emb.weight[0], ref.emb.weight[0])  # the padding row: weight decay only
    fast.restore()
    assert type(model.emb) is torch.nn.Embedding


def test_a_tied_table_keeps_nn_embedding():
    model = _Bag(tied=True)
    fast = cpu.fast_training(model, torch.device("cpu"))
    assert type(model.emb) is torch.nn.Embedding and not fast.tables


class _Tied(torch.nn.Module):
    """A linear layer of its own and an output layer tied to an embedding table."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(10, 16)
        self.proj = torch.nn.Linear(16, 16)
        self.out = torch.nn.Linear(16, 10, bias=False)
        self.out.weight = self.emb.weight
        self.seen: list[torch.dtype] = []
        self.proj.register_forward_pre_hook(lambda m, a: self.seen.append(m.weight.dtype))

    def forward(self, features):
        return self.out(torch.relu(self.proj(features)) + self.emb.weight[:1])


def test_inference_casts_linear_weights_once_with_the_same_numbers(monkeypatch):
    from textune.loop import FeatureData, predict_logits

    model = _Tied()
    data = FeatureData(torch.randn(37, 16), None)
    weights = {n: p.data_ptr() for n, p in model.named_parameters()}
    got = predict_logits(model, data, 8, torch.device("cpu"), torch.bfloat16)
    assert set(model.seen) == {torch.bfloat16}  # cast before the batches, not by autocast in each
    # afterwards: the very same fp32 tensors, the tied table never cast
    assert all(p.data_ptr() == weights[n] and p.dtype == torch.float32
               for n, p in model.named_parameters())
    monkeypatch.setenv("TEXTUNE_CPU_FASTPATH", "0")  # off: autocast casts each call
    model.seen.clear()
    ref = predict_logits(model, data, 8, torch.device("cpu"), torch.bfloat16)
    assert set(model.seen) == {torch.float32}
    assert np.array_equal(got, ref)
    with cpu.autocast_weights(model, torch.device("cpu"), None):  # fp32 runs: nothing changes
        assert model.proj.weight.dtype == torch.float32


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing`:FutureWarning")  # (PEFT's call)
def test_frozen_weights_train_in_bf16_with_the_same_gradients():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_tiny_bert(attn_dropout=0.0),
                           LoraConfig(r=4, target_modules=["query", "value", "dense"],
                                      lora_dropout=0.0, init_lora_weights=False)).eval()
    ids = torch.randint(5, 50, (4, 9))
    trained = [p for p in model.parameters() if p.requires_grad]
    frozen = model.base_model.model.encoder.layer[0].attention.self.query.base_layer.weight

    def grads():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(input_ids=ids)
            loss = out.last_hidden_state.float().square().mean() + out.pooler_output.sum()
        loss.backward()
        out = [p.grad.clone() for p in trained]
        model.zero_grad(set_to_none=True)
        return loss.item(), out

    ref = grads()
    fast = cpu.fast_training(model, torch.device("cpu"), amp=torch.bfloat16)
    lora_layers = [m for m in model.modules() if hasattr(m, "cast_input_dtype_enabled")]
    assert lora_layers and not any(m.cast_input_dtype_enabled for m in lora_layers)
    assert all(not p.requires_grad for p in fast.frozen.params) and frozen.dtype == torch.float32
    with fast.low_weights():
        assert frozen.dtype == torch.bfloat16
        got = grads()
    assert frozen.dtype == torch.float32
    assert got[0] == ref[0] and all(torch.equal(a, b) for a, b in zip(got[1], ref[1]))
    fast.restore()
    assert all(m.cast_input_dtype_enabled for m in lora_layers)
    assert cpu.fast_training(model, torch.device("cpu")).frozen is None  # fp32: nothing cast


def test_kept_low_weights_are_reused_until_a_weight_changes(monkeypatch):
    from textune.loop import FeatureData, predict_logits

    made = []
    real = cpu.LowWeights.__init__

    def counting(self, model, dtype, frozen_only=False):
        real(self, model, dtype, frozen_only)
        made.append(len(self.params))

    monkeypatch.setattr(cpu.LowWeights, "__init__", counting)
    model, kept = _Tied(), cpu.KeptLowWeights()
    data = FeatureData(torch.randn(37, 16), None)

    def predict():
        with kept(model, torch.device("cpu"), torch.bfloat16):
            return predict_logits(model, data, 8, torch.device("cpu"), torch.bfloat16)

    first = predict()
    # proj's weight and bias (the tied one left); predict_logits inside makes none of its own
    assert made == [2]
    assert np.array_equal(predict(), first) and made == [2]  # kept: not cast again
    with torch.no_grad():
        model.proj.weight.mul_(2)  # trained further, in place
    assert not np.array_equal(predict(), first) and made == [2, 2]
    assert model.proj.weight.dtype == torch.float32
    ref = predict_logits(model, data, 8, torch.device("cpu"), torch.bfloat16)
    assert np.array_equal(predict(), ref)  # the new weights' copies: the same numbers
    import copy
    import pickle

    again = pickle.loads(pickle.dumps(kept))  # (a classifier pickled, or deep-copied)
    assert again.low is None and copy.deepcopy(kept).low is None
