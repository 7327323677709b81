"""Each strategy on tiny models: what trains, that it learns, and that reloading is exact."""

import json
import os

import numpy as np
import pytest
import torch

import textune
from textune.api import train
from textune.config import DataArgs, ModelArgs, RunConfig, StrategyArgs, TrainArgs
from textune.modeling import TextClassifier, load_backbone, pool
from textune.strategies import get_strategy


def config(model, data, out, strategy="full", **train_kw) -> RunConfig:
    kw = {"epochs": 3, "batch_size": 16, "seed": 0, "log_every": 5, **train_kw}
    return RunConfig(DataArgs(str(data), max_length=32), ModelArgs(str(model)),
                     StrategyArgs(strategy), TrainArgs(**kw), str(out))


# (lr, epochs) that learn the toy task on a random 32-wide backbone
RECIPE = {"full": (1e-3, 4), "frozen": (1e-1, 8), "lora": (5e-3, 12), "adapter": (1e-2, 8)}


@pytest.mark.parametrize("strategy", ["full", "frozen", "lora", "adapter"])
def test_strategy_learns_and_reloads_exactly(strategy, tiny_bert, toy_csv, tmp_path):
    out = tmp_path / strategy
    lr, epochs = RECIPE[strategy]
    m = train(config(tiny_bert, toy_csv, out, strategy, lr=lr, epochs=epochs), progress=False)
    # A random 32-wide backbone gives weak features: with it frozen, a head (or a head and
    # token-wise bottlenecks) reaches ~0.75; the real-model tests check real accuracy.
    assert m["accuracy"] >= (0.7 if strategy in ("frozen", "adapter") else 0.9), m
    hist = [__import__("json").loads(x) for x in (out / "history.jsonl").read_text().splitlines()]
    losses = [h["loss"] for h in hist if "loss" in h]
    assert losses[-1] < losses[0]
    for f in ("config.json", "labels.json", "metrics.json", "history.jsonl", "head.safetensors"):
        assert (out / f).exists(), f
    assert not (out / "checkpoint").exists()

    clf = textune.load(out)
    table = textune.api.load_splits(textune.config.RunConfig.load(out / "config.json")).test
    again = clf.evaluate(table)
    assert again["accuracy"] == pytest.approx(m["accuracy"], abs=1e-9)
    texts = ["good film", "awful plot"]
    p = clf.predict_proba(texts)
    assert p.shape == (2, 2) and np.allclose(p.sum(1), 1, atol=1e-5)
    assert textune.load(out).predict(texts) == clf.predict(texts)


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_trainable_parameters_per_strategy(tiny_bert):
    counts = {}
    for name in ("full", "frozen", "lora", "adapter"):
        model = TextClassifier(load_backbone(str(tiny_bert)), 3)
        model = get_strategy(name).setup(model)
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        counts[name] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert any(n.startswith("head.") for n in trainable)
        if name == "frozen":
            assert all(n.startswith("head.") for n in trainable)
        if name == "lora":
            assert all(n.startswith("head.") or "lora_" in n for n in trainable)
        if name == "adapter":
            assert all(n.startswith("head.") or ".adapter." in n for n in trainable)
    total = sum(p.numel() for p in TextClassifier(load_backbone(str(tiny_bert)), 3).parameters())
    assert counts["frozen"] < counts["lora"] < counts["full"] == total
    # adapter: 2 layers x 2 sites x (32*2 + 2 + 2*32 + 32) + head (32*3 + 3), reduction 16
    assert counts["adapter"] == 2 * 2 * (32 * 2 + 2 + 2 * 32 + 32) + 32 * 3 + 3


def test_adapter_starts_as_identity_and_sits_after_both_projections(tiny_bert):
    from textune.strategies.adapter import adapter_sites, insert_adapters

    base = TextClassifier(load_backbone(str(tiny_bert)), 2).eval()
    ids = torch.tensor([[2, 10, 11, 12, 3]])
    mask = torch.ones_like(ids)
    before = base.features(ids, mask)
    sites = adapter_sites(base.backbone, "both")
    assert sorted(sites) == sorted([f"encoder.layer.{i}.{s}" for i in range(2)
                                    for s in ("attention.output.dense", "output.dense")])
    assert len(adapter_sites(base.backbone, "ffn")) == 2
    insert_adapters(base.backbone, 16, "both")
    assert torch.allclose(base.features(ids, mask), before, atol=1e-6)


@pytest.mark.parametrize("strategy", ["frozen", "adapter", "lora"])
def test_backbone_stays_bit_identical(strategy, tiny_bert, toy_csv, tmp_path):
    """Strategies that freeze the backbone must leave its pretrained weights untouched."""
    from textune.classifier import load

    out = tmp_path / strategy
    train(config(tiny_bert, toy_csv, out, strategy, epochs=2, lr=1e-2), progress=False)
    before = _params(TextClassifier(load_backbone(str(tiny_bert)), 2).backbone)  # minus pooler
    model = load(out, merge=False).model  # (LoRA: the adapter beside the weights, not in them)
    after = {}
    for n, p in model.backbone.named_parameters():  # strip wrapper prefixes, skip added weights
        if "lora_" in n or ".adapter." in n:
            continue
        key = n.replace("base_model.model.", "").replace(".base_layer", "").replace(".linear.", ".")
        after[key] = p.detach()
    assert before.keys() == after.keys()
    # (on a GPU a frozen backbone is kept in bf16: equal to the bf16 cast of the original)
    assert all(torch.equal(before[k].to(after[k]), after[k]) for k in before)
    if strategy == "lora":  # reloaded to predict in fp32, the adapter is merged (in bf16 it
        merged = load(out)  # stays beside the weights): the same probabilities either way
        fp32 = merged._amp() is None and model.backbone.base_model.model.embeddings \
            .word_embeddings.weight.dtype == torch.float32
        assert fp32 == (not any("lora_" in n for n, _ in merged.model.backbone.named_parameters()))
        texts = ["good film", "an awful, dull plot", "it was a film"]
        assert np.allclose(merged.predict_proba(texts),
                           load(out, merge=False).predict_proba(texts), atol=1e-5)


def test_frozen_features_are_computed_once(tiny_bert, toy_csv, tmp_path, monkeypatch):
    monkeypatch.setenv("TEXTUNE_FEATURE_CACHE", "0")  # (the second run would read them all)
    calls = []
    orig = TextClassifier.features

    def spy(self, *a, **k):
        calls.append(1)
        return orig(self, *a, **k)

    monkeypatch.setattr(TextClassifier, "features", spy)
    train(config(tiny_bert, toy_csv, tmp_path / "a", "frozen", epochs=1), progress=False)
    one = len(calls)
    calls.clear()
    train(config(tiny_bert, toy_csv, tmp_path / "b", "frozen", epochs=6), progress=False)
    assert len(calls) == one  # extra epochs never touch the backbone


def test_frozen_features_are_reused_by_later_runs(tiny_bert, toy_csv, tmp_path, monkeypatch):
    import pandas as pd

    calls = []
    orig = TextClassifier.features

    def spy(self, *a, **k):
        calls.append(len(a[0]) if a else len(k["input_ids"]))
        return orig(self, *a, **k)

    monkeypatch.setattr(TextClassifier, "features", spy)
    first = train(config(tiny_bert, toy_csv, tmp_path / "a", "frozen", lr=1e-1, epochs=2),
                  progress=False)
    rows = sum(first["splits"][k] for k in ("train", "val")) + first["n_eval"]
    assert first["features_from_cache"] == 0 and sum(calls) == rows
    calls.clear()
    again = train(config(tiny_bert, toy_csv, tmp_path / "b", "frozen", lr=1e-1, epochs=2),
                  progress=False)
    assert calls == [] and again["features_from_cache"] == rows
    # the same features, so the same run: identical test predictions
    a, b = (pd.read_csv(tmp_path / x / "predictions.csv") for x in "ab")
    pd.testing.assert_frame_equal(a, b)
    assert again["accuracy"] == first["accuracy"]
    # a smaller training sample: every row already stored
    train(config(tiny_bert, toy_csv, tmp_path / "c", "frozen", epochs=1), progress=False)
    assert calls == []
    # other weights in the model folder (a newer file): nothing reused
    w = next(tiny_bert.glob("*.safetensors"))
    w.touch()
    os.utime(w, ns=(w.stat().st_atime_ns, w.stat().st_mtime_ns + 10**9))
    third = train(config(tiny_bert, toy_csv, tmp_path / "d", "frozen", epochs=1), progress=False)
    assert third["features_from_cache"] == 0 and sum(calls) == rows


def test_feature_cache_rows_duplicates_damage_and_size(tmp_path):
    from textune.data import Encoded
    from textune.featcache import FeatureCache, row_keys, trim

    cache = FeatureCache(tmp_path / "features" / "k", hidden=4)
    enc = Encoded([np.array([1, 2, 3]), np.array([1, 2]), np.array([1, 2, 3])], None, None, 0)
    keys = row_keys(enc)
    assert (keys[0] == keys[2]).all() and not (keys[0] == keys[1]).all()
    pair = Encoded([np.array([1, 2, 3])], [np.array([0, 1, 1])], None, 0)
    assert not (row_keys(pair)[0] == keys[0]).all()  # segment ids are part of the key
    found, _ = cache.lookup(keys)
    assert not found.any()
    cache.add(keys[:1], torch.full((1, 4), 7.0))
    (cache.folder / "damaged.safetensors").write_bytes(b"not a shard")
    found, feats = cache.lookup(keys)
    assert found.tolist() == [True, False, True]  # a repeated row shares its key's features
    assert feats[0].tolist() == feats[2].tolist() == [7.0] * 4
    cache.add(keys[1:2], torch.full((1, 4), 5.0))
    assert cache.lookup(keys)[0].all() and cache.lookup(keys)[1][1].tolist() == [5.0] * 4
    trim(tmp_path / "features", 0)
    assert not list(cache.folder.glob("*.safetensors"))


def test_last_token_pooling_left_and_right_padding():
    h = torch.randn(3, 5, 4)
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    assert torch.equal(pool(h, right, "last"), torch.stack([h[0, 2], h[1, 4], h[2, 0]]))
    assert torch.equal(pool(h, left, "last"), torch.stack([h[0, 4], h[1, 4], h[2, 4]]))
    m = pool(h, right, "mean")
    assert torch.allclose(m[0], h[0, :3].mean(0))


def test_resume_after_interruption_matches_uninterrupted(tiny_bert, toy_csv, tmp_path,
                                                         monkeypatch):
    import textune.loop as loop

    ref = train(config(tiny_bert, toy_csv, tmp_path / "ref", epochs=2, lr=1e-3, save_every=3),
                progress=False)
    saves = []
    real_save = loop.save_checkpoint

    def crash_after_second_save(*a, **k):
        real_save(*a, **k)
        saves.append(1)
        if len(saves) == 2:  # mid-epoch (step 6 of 11 per epoch)
            raise RuntimeError("simulated crash")

    monkeypatch.setattr(loop, "save_checkpoint", crash_after_second_save)
    with pytest.raises(RuntimeError, match="simulated"):
        train(config(tiny_bert, toy_csv, tmp_path / "run", epochs=2, lr=1e-3, save_every=3),
              progress=False)
    monkeypatch.setattr(loop, "save_checkpoint", real_save)
    cfg = RunConfig.load(tmp_path / "run" / "config.json")
    cfg.out = str(tmp_path / "run")
    resumed = train(cfg, progress=False, resume=True)
    assert resumed["steps"] == ref["steps"]
    assert resumed["accuracy"] == ref["accuracy"]
    a = textune.load(tmp_path / "ref").predict_proba(["good film", "dull plot"])
    b = textune.load(tmp_path / "run").predict_proba(["good film", "dull plot"])
    assert np.allclose(a, b, atol=1e-5)


def test_token_budget_training_learns(tiny_bert, toy_csv, tmp_path):
    """--batch-tokens: batches by tokens; the step count comes from each epoch's real batches."""
    import json

    out = tmp_path / "tok"
    m = train(config(tiny_bert, toy_csv, out, "full", lr=1e-3, epochs=4, batch_tokens=256),
              progress=False)
    assert m["accuracy"] >= 0.9, m
    hist = [json.loads(x) for x in (out / "history.jsonl").read_text().splitlines()]
    assert max(h["step"] for h in hist) == m["steps"]
    rows = m["splits"]["train"]
    # toy rows are ~10 tokens: 256-token batches hold ~20 rows, more than --batch-size 16
    assert 4 * rows / 40 < m["steps"] < 4 * rows / 16
    # the given --lr is kept; without one the default is scaled by sqrt(rows per step / 16)
    assert textune.config.RunConfig.load(out / "config.json").train.lr == 1e-3
    cfg = config(tiny_bert, toy_csv, tmp_path / "auto", "full", epochs=1, batch_tokens=256)
    auto = train(cfg, progress=False)
    lr = textune.config.RunConfig.load(tmp_path / "auto" / "config.json").train.lr
    rows_per_step = auto["splits"]["train"] / auto["steps"]
    default = get_strategy("full").default_lr
    assert lr == pytest.approx(default * (rows_per_step / 16) ** 0.5, rel=0.15)
    # tune's default grid is centred on that learning rate (not on the unscaled default)
    from textune.tuning import default_lr_grid

    fresh = config(tiny_bert, toy_csv, tmp_path / "t", "full", epochs=1, batch_tokens=256)
    [(_, _, values)] = default_lr_grid(fresh)
    centre = [v for _, v in values][1]
    assert centre == pytest.approx(lr, rel=0.03) and lr > 1.1 * default


def test_gpu_chunked_prediction_equals_one_pass(tiny_bert, toy_csv, tmp_path, monkeypatch):
    """The GPU path (tokenize the next chunk while scoring this one; a chunk's last batch waits
    for the next; token budgets, ladder widths, short batches filled up to a power of two) gives
    the logits of a plain pass in the same order; run here on CPU with small chunks."""
    from textune import classifier
    from textune import loop as train_mod
    from textune.data import LADDER, padded_width

    out = tmp_path / "r"
    train(config(tiny_bert, toy_csv, out, "full", lr=1e-3, epochs=1), progress=False)
    clf = textune.load(out, device="cpu")
    texts = [("good film " * (i % 7)) + f"awful plot {i % 10}" for i in range(59)]
    plain = clf.logits(texts)
    calls, shapes = [], []
    orig = classifier.predict_logits

    def spy(model, enc, *a, **k):
        calls.append(len(enc))
        return orig(model, enc, *a, **k)

    monkeypatch.setattr(classifier, "predict_logits", spy)
    monkeypatch.setattr(clf, "CHUNK", 8)
    monkeypatch.setattr(train_mod, "gpu_batching", lambda device: True)
    clf.model.register_forward_pre_hook(
        lambda m, a, k: shapes.append(tuple(k["input_ids"].shape)), with_kwargs=True)
    chunked = clf._chunked_logits(texts, None, 1)  # GPU batches of up to 8 rows
    assert np.allclose(chunked, plain, atol=1e-5)
    assert calls == [8] * 6 + [11]  # scored as chunks arrive, each chunk's last batch held
    assert all(n in (1, 2, 4, 8) for n, _ in shapes)  # only the last batch was short
    assert sum(n for n, _ in shapes) == 60  # ...and it was filled up (3 rows -> 4)
    assert all(w == padded_width(w, LADDER) for _, w in shapes)
    assert [n for n, _ in shapes].count(8) == len(shapes) - 1
    pairs = [f"second text {i}" * (i % 3) for i in range(59)]  # token type ids travel too
    monkeypatch.setattr(train_mod, "gpu_batching", lambda device: False)
    plain_pairs = clf.logits(texts, pairs)
    monkeypatch.setattr(train_mod, "gpu_batching", lambda device: True)
    assert np.allclose(clf._chunked_logits(texts, pairs, 1), plain_pairs, atol=1e-5)
    assert not np.allclose(plain_pairs, plain, atol=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_head_steps_match_ordinary_steps(tiny_bert, toy_csv, tmp_path, monkeypatch):
    """Frozen on a GPU replays one CUDA graph per full batch; the head it trains is the one the
    ordinary step trains (no dropout, so both runs see the same arithmetic)."""
    from safetensors.torch import load_file

    from textune import loop as T

    built = []
    orig = T.GraphedStep.build

    def spy(*a, **k):
        g = orig(*a, **k)
        built.append(g)
        return g

    monkeypatch.setattr(T.GraphedStep, "build", spy)
    heads = {}
    for graphs in ("1", "0"):
        monkeypatch.setenv("TEXTUNE_CUDA_GRAPHS", graphs)
        cfg = config(tiny_bert, toy_csv, tmp_path / graphs, "frozen", lr=1e-2, epochs=3,
                     batch_size=7)
        cfg.model.head_dropout = 0.0
        m = train(cfg, progress=False)
        heads[graphs] = load_file(str(tmp_path / graphs / "head.safetensors"))
    assert built[0] is not None and built[1] is None
    for k in heads["1"]:
        assert torch.allclose(heads["1"][k], heads["0"][k], atol=1e-4), k
    assert m["accuracy"] > 0.5


@pytest.mark.parametrize("which", ["tiny_bert", "tiny_llama"])
def test_backbone_dropout_sets_every_dropout(which, request):
    """--backbone-dropout 0: no dropout anywhere in the backbone, so two training-mode
    forward passes agree exactly (with the model's own dropout they differ)."""
    from textune.modeling import set_dropout

    bb = load_backbone(str(request.getfixturevalue(which)))
    if which == "tiny_llama":  # LLaMA's only dropout is attention's, 0 by default: give it one
        for m in bb.modules():
            if isinstance(getattr(m, "attention_dropout", None), float):
                m.attention_dropout = 0.5
    bb.train()
    ids = torch.randint(5, 20, (4, 12))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        a, b = (bb(input_ids=ids, attention_mask=mask).last_hidden_state for _ in range(2))
    assert not torch.allclose(a, b)
    assert set_dropout(bb, 0.0) > 0
    with torch.no_grad():
        a, b = (bb(input_ids=ids, attention_mask=mask).last_hidden_state for _ in range(2))
    assert torch.equal(a, b)


def test_backbone_dropout_reaches_the_trained_model(tiny_bert, toy_csv, tmp_path, monkeypatch):
    from textune import classifier
    from textune.cli import main

    calls = []
    orig = classifier.set_dropout
    monkeypatch.setattr(classifier, "set_dropout", lambda bb, p: calls.append(p) or orig(bb, p))
    out = tmp_path / "d"
    assert main(["train", "--model", str(tiny_bert), "--data", str(toy_csv), "--epochs", "1",
                 "--backbone-dropout", "0", "--out", str(out), "--quiet"]) == 0
    cfg = textune.config.RunConfig.load(out / "config.json")
    assert cfg.model.backbone_dropout == 0.0 and calls == [0.0]  # set once, for training
    assert main(["train", "--model", str(tiny_bert), "--data", str(toy_csv),
                 "--backbone-dropout", "1.5", "--out", str(tmp_path / "e")]) == 2


def test_fit_from_python(tiny_bert, toy_csv, tmp_path):
    import textune
    from textune.errors import UserError

    lr, epochs = RECIPE["full"]
    clf = textune.fit(toy_csv, tmp_path / "run", model=tiny_bert, epochs=epochs, lr=lr,
                      batch_size=16, max_length=32, seed=0)
    assert clf.metrics["accuracy"] >= 0.9 and clf.config.train.epochs == epochs
    assert len(clf.predict(["good film"])) == 1
    # any iterable of strings: a pandas column (its index is not the order), an array, a generator
    import pandas as pd

    texts = ["good film", "a terrible, dull film"]
    expect = clf.predict_proba(texts)
    for given in (pd.Series(texts, index=[7, 3]), np.array(texts), (t for t in texts)):
        assert np.array_equal(clf.predict_proba(given), expect)
    with pytest.raises(UserError, match=r"texts\[1\] is float nan, not a string"):
        clf.predict(pd.Series(["good film", None, "ok"], dtype=object).fillna(np.nan))
    with pytest.raises(UserError, match="wrap a single text in a list"):
        clf.predict("good film")
    # a DataFrame in, the same frame out with the decisions, as `textune predict` writes a file
    df = pd.DataFrame({"id": [1, 2, 3], "review": ["good film", "", "a terrible, dull film"]},
                      index=["a", "b", "c"])
    got = clf.predict_frame(df)
    assert list(got.index) == ["a", "b", "c"] and list(got.columns[:2]) == ["id", "review"]
    assert got.loc["a", "label"] == clf.predict(["good film"])[0] and pd.isna(got.loc["b", "label"])
    assert np.allclose(got.loc[["a", "c"], ["p_neg", "p_pos"]].to_numpy(),
                       clf.predict_proba(["good film", "a terrible, dull film"]), atol=1e-6)
    sure = clf.predict_frame(df, min_confidence=1.0)  # (nothing reaches 1.0: all left blank)
    assert sure["label"].isna().all()
    # embed: the pooled features the head reads (its logits are the head of them)
    texts = ["good film", "a terrible, dull film", "it was fine"]
    emb = clf.embed(texts)
    assert emb.shape == (3, clf.model.hidden_size) and not clf.model.training
    amp = clf._amp()  # bf16 where the CPU does it natively (AVX512-BF16/AMX), as predict runs
    with torch.inference_mode(), torch.autocast("cpu", dtype=amp or torch.bfloat16,
                                                enabled=amp is not None):
        head = clf.model.head(torch.from_numpy(emb)).float().numpy()
    assert np.allclose(head, clf.logits(texts), atol=1e-4)
    assert textune.train is textune.api.train  # (the function, every time: not the loop module)
    assert textune.train is textune.api.train
    with pytest.raises(UserError, match="epoch=: not a textune option"):
        textune.fit(toy_csv, tmp_path / "other", model=tiny_bert, epoch=1)
    again = textune.fit(toy_csv, tmp_path / "run", model=tiny_bert, strategy="frozen", epochs=1,
                        batch_size="auto", overwrite=True, progress=False)
    assert again.config.strategy.name == "frozen" and again.metrics["strategy"]


def test_fit_defaults_are_the_cli_defaults():
    from textune.cli import build_parser, config_from_args
    from textune.config import RunConfig

    a = build_parser().parse_args(["train", "--data", "x", "--out", "o"])
    assert config_from_args(a, a.strategy).to_dict() == \
        RunConfig.from_options(data="x", out="o").to_dict()


def test_reloading_a_full_run_is_quiet(tiny_bert, toy_csv, tmp_path, capfd):
    """A saved backbone has no pooler (textune pools itself): transformers would report it
    MISSING and advise training, to a user who just did."""
    from transformers import AutoModel
    from transformers.utils import logging as tl

    train(config(tiny_bert, toy_csv, tmp_path / "r", "full", epochs=1), progress=False)
    train(config(tiny_bert, toy_csv, tmp_path / "l", "lora", epochs=1), progress=False)
    tl.set_verbosity_warning()
    tl.enable_progress_bar()  # (as a Python user has them; the CLI turns both off)
    try:
        capfd.readouterr()
        AutoModel.from_pretrained(str(tmp_path / "r" / "backbone"))
        out, err = capfd.readouterr()
        assert "Loading weights" in out + err  # what a plain reload prints (this tiny
        # backbone has no pooler to report MISSING; minilm-l6's does)
        textune.load(tmp_path / "r")
        out, err = capfd.readouterr()
        assert "MISSING" not in out + err and "Loading weights" not in out + err
        textune.load(tmp_path / "l")  # (its base model loads from the model's own folder)
        out, err = capfd.readouterr()
        assert "Loading weights" not in out + err
        assert tl.get_verbosity() == tl.WARNING and tl.is_progress_bar_enabled()  # restored
    finally:
        tl.set_verbosity_error()
        tl.disable_progress_bar()


@pytest.mark.parametrize("strategy", ["full", "frozen"])
def test_windows_read_past_max_length(strategy, tiny_bert, toy_csv, tmp_path):
    """--truncation windows: with 8-token windows the cue word past the head still counts
    (toy texts have up to 10 words, the cue anywhere), and a reloaded run scores alike."""
    lr, epochs = RECIPE[strategy]
    res = {}
    for how in ("head", "windows"):
        cfg = config(tiny_bert, toy_csv, tmp_path / how, strategy, lr=lr, epochs=epochs)
        cfg.data.max_length, cfg.data.truncation = 8, how
        res[how] = train(cfg, progress=False)
    w = res["windows"]
    assert w["windows"]["train"] > w["splits"]["train"] and w["truncation"] == "windows"
    # the head run was told, and its report says so
    from textune.report import caveats

    assert res["head"]["texts_longer_than_max_length"] > 0.3
    assert any("--truncation windows" in c for c in caveats(res["head"]))
    assert not any("--truncation windows" in c for c in caveats(w))
    assert w["n_eval"] == res["head"]["n_eval"]  # texts are scored, not windows
    clf = textune.load(tmp_path / "windows")
    table = textune.api.load_splits(textune.config.RunConfig.load(
        tmp_path / "windows" / "config.json")).test
    # test texts whose cue word lies past the first window: flipping it (pos <-> neg) cannot move
    # the head run's probabilities (it never reads it) and must move the windows run's
    from .conftest import NEG, POS

    flip = {**dict(zip(POS, NEG)), **dict(zip(NEG, POS))}
    late = [t for t in table.texts if next(i for i, x in enumerate(t.split()) if x in flip) >= 6]
    flipped = [" ".join(flip.get(x, x) for x in t.split()) for t in late]
    assert len(late) >= 8
    head_clf = textune.load(tmp_path / "head")
    assert np.array_equal(head_clf.predict_proba(late), head_clf.predict_proba(flipped))
    assert np.abs(clf.predict_proba(late) - clf.predict_proba(flipped)).max() > 0.05
    if strategy == "full":  # a trained backbone reads the cue: accuracy shows it (a random,
        # frozen 32-wide one gives weak features: 0.71-0.82 with windows vs 0.69-0.74 without,
        # seed to seed, not always ahead)
        assert w["accuracy"] >= res["head"]["accuracy"] + 0.05, res
    assert clf.evaluate(table)["accuracy"] == pytest.approx(w["accuracy"], abs=1e-9)
    assert clf.predict_proba(["the film was a movie plot and it story " + "good"]).shape == (1, 2)
    # the head run read in windows at prediction time (eval/predict --truncation windows)
    from textune.cli import main

    ev = tmp_path / "head-eval"
    assert main(["eval", str(tmp_path / "head"), "--data", str(toy_csv), "--truncation",
                 "windows", "--out", str(ev), "--quiet"]) == 0
    m = json.loads((ev / "metrics.json").read_text())
    assert m["truncation"] == "windows" and m["n_eval"] == res["head"]["n_eval"]
    # the same weights now see cue words past the head (measured: full 0.92 -> 0.95, frozen
    # 0.69 -> 0.73; the run trained on windows does better still)
    assert m["accuracy"] > res["head"]["accuracy"]


def test_compile_on_a_cpu_trains_eager_and_says_so(tiny_bert, toy_csv, tmp_path, caplog,
                                                    monkeypatch):
    """--compile without a GPU: a warning, eager training (measured 3x slower compiled on CPU),
    and the run's config says what ran."""
    if torch.cuda.is_available():
        pytest.skip("the CPU case")
    calls = []
    monkeypatch.setattr(torch, "compile", lambda m, **kw: calls.append(m) or m)
    m = train(config(tiny_bert, toy_csv, tmp_path / "r", "full", epochs=1, compile=True),
              progress=False)
    assert "--compile is for GPUs" in caplog.text and not calls
    saved = json.loads((tmp_path / "r" / "config.json").read_text())
    assert saved["train"]["compile"] is False and m["accuracy"] > 0
    monkeypatch.setenv("TEXTUNE_CPU_COMPILE", "1")  # the way to compile anyway
    train(config(tiny_bert, toy_csv, tmp_path / "c", "full", epochs=1, compile=True),
          progress=False)
    assert len(calls) == 1


def test_fit_takes_a_dataframe(tiny_bert, toy_csv, tmp_path):
    """A notebook's DataFrame (tags as lists, an index that is not positions) trains as its
    CSV does: kept as a file in $TEXTUNE_HOME/frames, so the run reloads and re-evaluates."""
    import pandas as pd

    import textune
    from textune.api import evaluate_run
    from textune.errors import UserError

    df = pd.read_csv(toy_csv)
    kw = dict(model=tiny_bert, epochs=1, batch_size=16, max_length=32, seed=0, progress=False)
    from_file = textune.fit(toy_csv, tmp_path / "file", **kw)
    from_frame = textune.fit(df.set_index(df.index + 100), tmp_path / "frame", **kw)
    assert from_frame.metrics["accuracy"] == from_file.metrics["accuracy"]
    kept = from_frame.config.data.data
    assert "frames" in kept and kept.endswith(".jsonl")
    assert evaluate_run(tmp_path / "frame", kept, progress=False)["accuracy"] == \
        from_frame.metrics["accuracy"]
    # the DataFrame itself: the run's own data, so its test split only; another frame in full
    assert evaluate_run(tmp_path / "frame", df.set_index(df.index + 100),
                        progress=False)["accuracy"] == from_frame.metrics["accuracy"]
    other = evaluate_run(tmp_path / "frame", df.head(50), progress=False)
    assert other["n_eval"] == 50 and other["split"].startswith("all rows of ")
    tags = pd.DataFrame({"text": df.text, "label": [[y] + (["x"] if i % 3 == 0 else [])
                                                   for i, y in enumerate(df.label)]})
    multi = textune.fit(tags, tmp_path / "tags", multi_label=True, **kw)
    assert sorted(multi.labels) == ["neg", "pos", "x"]
    with pytest.raises(UserError, match="data=: the DataFrame has no rows"):
        textune.fit(df.iloc[:0], tmp_path / "empty", **kw)


def test_whole_number_labels_come_back_as_ints(tiny_bert, toy_csv, tmp_path, capfd):
    """A 0/1 label column (a DataFrame's, or a CSV's as pandas reads it): predict returns ints,
    so comparing with the column compares like with like; the files keep the names as text."""
    import pandas as pd

    import textune
    from textune.cli import main

    df = pd.read_csv(toy_csv)
    df["label"] = (df["label"] == "pos").astype(int)
    clf = textune.fit(df, tmp_path / "ints", model=tiny_bert, epochs=2, lr=1e-3, max_length=16,
                      progress=False)
    assert "Loading weights" not in capfd.readouterr().err  # (progress=False: no bar at all)
    assert clf.labels == [0, 1] and clf.names == ["0", "1"]
    got = clf.predict(df.text[:200])
    assert {type(y) for y in got} == {int}
    assert np.mean(np.array(got) == df.label[:200].to_numpy()) > 0.8  # (was 0: '1' != 1)
    m = clf.evaluate(df.head(200))  # (a labelled DataFrame: its metrics)
    assert m["n_eval"] == 200 and m["accuracy"] == np.mean(np.array(got) == df.label[:200])
    assert clf.evaluate(df.head(200).rename(columns={"label": "y"}), label_col="y") == m
    frame = clf.predict_frame(df[["text"]].head(5))
    assert list(frame.columns) == ["text", "label", "p_0", "p_1"]
    assert frame["label"].tolist() == got[:5]
    again = textune.load(tmp_path / "ints")
    assert again.labels == [0, 1] and again.predict(["x"])[0] in (0, 1)
    # labels that are not all whole numbers stay text: '01' is not pandas' int 1
    clf.names = ["01", "1"]
    assert clf.labels == ["01", "1"] and isinstance(clf.predict(["x"])[0], str)
    clf.names = ["False", "True"]  # (a bool column)
    assert clf.labels == [False, True] and isinstance(clf.predict(["x"])[0], bool)
    # the CLI writes the names as before
    (tmp_path / "in.txt").write_text("good film\n")
    assert main(["predict", str(tmp_path / "ints"), "--input", str(tmp_path / "in.txt"),
                 "--jsonl", "--quiet"]) == 0
    assert json.loads(capfd.readouterr().out)["label"] in ("0", "1")
