"""Prompting on a tiny random causal LM: label scoring is the per-label log-likelihood, the KV
cache path equals the plain path, few-shot demonstrations never come from evaluated texts."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from textune.cli import main
from textune.prompting import PromptScorer, build_parts, calibrate, draw_demos, parse_verbalizers

from .conftest import NEG, POS


@pytest.fixture(scope="module")
def tiny_lm(tiny_llama):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    tok.pad_token = tok.eos_token
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, bos_token_id=0, eos_token_id=1)
    return LlamaForCausalLM(cfg).eval(), tok


@pytest.fixture(scope="module")
def lm_folder(tiny_lm, tmp_path_factory):
    """The tiny LM saved, for the CLI."""
    model, tok = tiny_lm
    folder = tmp_path_factory.mktemp("lm")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def manual_score(model, ids: list[int], verb: list[int]) -> float:
    """log p(verb | ids) from one plain forward of the whole sequence, no batching."""
    full = torch.tensor([ids + verb])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=full).logits[0].double(), -1)
    return sum(float(logp[len(ids) + t - 1, v]) for t, v in enumerate(verb))


@pytest.mark.parametrize("verbalizers", [["good", "bad"], ["good film", "bad plot very"]])
def test_label_scores_equal_manual_log_likelihood(tiny_lm, verbalizers):
    model, tok = tiny_lm
    texts = ["the film was great", "awful", "a movie and it was really quite boring",
             "nice story"]
    demos = [("lovely plot", verbalizers[0]), ("dull actors", verbalizers[1])]
    parts = build_parts(tok, texts, verbalizers, demos, template="the {text} film",
                        instruction="")
    scorer = PromptScorer(model, tok)
    got = scorer.score(parts, batch_size=3)  # uneven batches, length-sorted, padded
    for i in range(len(texts)):
        for j, v in enumerate(parts.verbalizers):
            want = manual_score(model, parts.prefix + parts.examples[i], v)
            assert got[i, j] == pytest.approx(want, abs=1e-4)
    assert len(parts.verbalizers[1]) > 1 or len(verbalizers[1].split()) == 1


def test_kv_cache_path_equals_plain_path(tiny_lm):
    model, tok = tiny_lm
    texts = [" ".join(np.random.default_rng(i).choice(POS + NEG, size=1 + i % 7))
             for i in range(11)]
    for verbalizers in (["good", "bad"], ["good film", "bad"]):
        parts = build_parts(tok, texts, verbalizers, [("nice plot", verbalizers[0])],
                            template="{text} was", instruction="this movie")
        assert len(parts.prefix) > 3
        scorer = PromptScorer(model, tok)
        fast = scorer.score(parts, batch_size=4, kv_cache=True)
        plain = scorer.score(parts, batch_size=4, kv_cache=False)
        np.testing.assert_allclose(fast, plain, atol=1e-4)


def test_bf16_scores_cast_the_weights_once_with_the_same_numbers(tiny_lm, monkeypatch):
    model, tok = tiny_lm
    parts = build_parts(tok, ["the film was great", "awful", "nice story"], ["good", "bad"],
                        [("lovely plot", "good")], template="{text} was", instruction="")
    proj = model.model.layers[0].mlp.down_proj
    seen = []
    hook = proj.register_forward_pre_hook(lambda m, a: seen.append(m.weight.dtype))
    try:
        got = PromptScorer(model, tok, torch.device("cpu"), torch.bfloat16).score(parts, 2)
        assert set(seen) == {torch.bfloat16}  # cast once, before the batches
        monkeypatch.setenv("TEXTUNE_CPU_FASTPATH", "0")
        seen.clear()
        ref = PromptScorer(model, tok, torch.device("cpu"), torch.bfloat16).score(parts, 2)
        assert set(seen) == {torch.float32}
    finally:
        hook.remove()
    np.testing.assert_array_equal(got, ref)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_mean_calibration_removes_label_bias():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    signal = np.where(y[:, None] == np.arange(2)[None], 0.5, 0.0)
    raw = signal + np.array([0.0, 3.0])[None] + rng.normal(0, 0.1, (200, 2))  # biased to 1
    assert (raw.argmax(1) == y).mean() == pytest.approx(0.5, abs=0.1)
    assert (calibrate(raw, "mean").argmax(1) == y).mean() > 0.95
    cf = np.array([[0.0, 3.0]] * 3)
    assert (calibrate(raw, "content-free", cf).argmax(1) == y).mean() > 0.95


def test_demos_come_from_training_rows_only():
    texts = [f"text {i}" for i in range(40)]
    labels = ["a" if i % 2 else "b" for i in range(40)]
    exclude = {f"text {i}" for i in range(0, 40, 3)}
    demos = draw_demos(texts, labels, ["a", "b"], 4, seed=1, exclude=exclude)
    assert len(demos) == 8 and not {t for t, _ in demos} & exclude
    assert [y for _, y in demos] == ["a", "b"] * 4  # round-robin
    assert draw_demos(texts, labels, ["a", "b"], 4, seed=1, exclude=exclude) == demos


def test_verbalizer_parsing():
    assert parse_verbalizers(None, ["neg", "pos"]) == ["neg", "pos"]
    assert parse_verbalizers("bad, good", ["neg", "pos"]) == ["bad", "good"]
    assert parse_verbalizers("pos=great", ["neg", "pos"]) == ["neg", "great"]
    from textune.errors import UserError

    with pytest.raises(UserError, match="verbalizers for 2 labels"):
        parse_verbalizers("a,b,c", ["neg", "pos"])


def test_prompt_cli_fewshot_changes_result_and_never_uses_eval_texts(lm_folder, toy_csv,
                                                                      tmp_path):
    folder = lm_folder
    runs = {}
    for shots in (0, 4):
        out = tmp_path / f"p{shots}"
        code = main(["prompt", "--model", str(folder), "--data", str(toy_csv), "--shots",
                     str(shots), "--limit", "60", "--labels", "bad,good", "--out", str(out), "--quiet"])
        assert code == 0
        runs[shots] = json.loads((out / "metrics.json").read_text())
        assert (out / "report.html").exists() and (out / "predictions.csv").exists()
    m0, m4 = runs[0], runs[4]
    assert m0["n_eval"] == m4["n_eval"] == 60 and m0["split"] == "test"
    assert set(m0["calibrations"]) == {"mean", "content-free", "none"}
    assert len(m4["demonstrations"]) == 8
    import csv

    evaluated = {r["text"] for r in csv.DictReader(open(tmp_path / "p4" / "predictions.csv"))}
    assert not {d["text"] for d in m4["demonstrations"]} & evaluated
    s0 = open(tmp_path / "p0" / "predictions.csv").read()
    s4 = open(tmp_path / "p4" / "predictions.csv").read()
    assert s0 != s4  # the demonstrations change the scores


def test_prompt_probabilities_get_a_temperature_fitted_on_validation_rows(lm_folder, toy_csv,
                                                                         tmp_path):
    import csv

    import numpy as np

    from textune.metrics import calibration_error, fit_temperature, softmax
    from textune.prompting import PromptClassifier

    folder = lm_folder
    args = ["prompt", "--model", str(folder), "--data", str(toy_csv), "--limit", "60",
            "--labels", "bad,good", "--quiet"]
    assert main([*args, "--temperature-rows", "80", "--out", str(tmp_path / "t")]) == 0
    m = json.loads((tmp_path / "t" / "metrics.json").read_text())
    fitted = json.loads((tmp_path / "t" / "calibration.json").read_text())
    assert fitted["fitted_on"] == "validation split (80 rows)"
    assert m["environment"]["device_name"] and m["environment"]["torch"]  # what it ran on
    assert m["temperature"] == pytest.approx(fitted["temperature"], abs=1e-4) != 1.0
    # the reloaded run scores new texts at that temperature: its probabilities of the test
    # rows are the softmax of their (calibrated) scores over it, whose ECE the run reported
    rows = list(csv.DictReader(open(tmp_path / "t" / "predictions.csv")))
    scores = np.array([[float(r["score_neg"]), float(r["score_pos"])] for r in rows])
    y = np.array([r["label"] == "pos" for r in rows], dtype=int)
    clf = PromptClassifier(tmp_path / "t", device="cpu")
    p = clf.predict_proba([r["text"] for r in rows])
    assert np.allclose(p, softmax(scores / fitted["temperature"]), atol=2e-3)
    assert m["ece"] == pytest.approx(calibration_error(y, p), abs=2e-3)
    assert m["ece_before_temperature"] == pytest.approx(calibration_error(y, softmax(scores)),
                                                        abs=2e-3)
    # and it is the validation rows' own best temperature, not the test rows'
    assert abs(fit_temperature(scores, y) - fitted["temperature"]) > 1e-3
    # --temperature-rows 0: none fitted, and no calibration error claimed for the raw scores
    assert main([*args, "--temperature-rows", "0", "--out", str(tmp_path / "n")]) == 0
    m0 = json.loads((tmp_path / "n" / "metrics.json").read_text())
    assert not (tmp_path / "n" / "calibration.json").exists()
    assert "ece" not in m0 and "temperature" not in m0 and m0["accuracy"] == m["accuracy"]


def test_prompt_refuses_an_encoder(tiny_bert, toy_csv, tmp_path, capsys):
    code = main(["prompt", "--model", str(tiny_bert), "--data", str(toy_csv), "--out",
                 str(tmp_path / "p"), "--quiet"])
    assert code == 2
    assert "causal (decoder) LM" in capsys.readouterr().err


def test_compare_runs_prompt_beside_training(lm_folder, tmp_path):
    from .conftest import toy_rows, write_csv

    folder = lm_folder
    # labels the tiny vocabulary can say, so the verbalizers differ
    rows = [(t, "good" if y == "pos" else "bad") for t, y in toy_rows(300)]
    data = write_csv(tmp_path / "gb.csv", rows)
    out = tmp_path / "cmp"
    code = main(["compare", "--model", str(folder), "--data", str(data), "--strategies",
                 "full,prompt", "--epochs", "1", "--test-fraction", "0.2", "--out", str(out),
                 "--quiet"])
    assert code == 0
    got = json.loads((out / "compare.json").read_text())["rows"]
    assert [r["status"] for r in got] == ["ok", "ok"]
    prompt = json.loads((out / "prompt" / "metrics.json").read_text())
    full = json.loads((out / "full" / "metrics.json").read_text())
    assert prompt["n_eval"] == full["n_eval"] == 60  # the same test rows (--test-fraction too)
    assert all("accuracy_vs_best" in r for r in got)  # so they are compared row by row
    assert prompt["trainable_params"] == 0 and "| prompt |" in (out / "compare.md").read_text()


def test_prompt_from_python(lm_folder, toy_csv, tmp_path):
    """textune.prompt: a DataFrame in, the run folder written, the run back as a predictor
    whose metrics are the folder's."""
    import pandas as pd

    import textune
    from textune.errors import UserError

    clf = textune.prompt(pd.read_csv(toy_csv), tmp_path / "p", model=str(lm_folder), limit=40,
                         labels="bad,good", shots=1, progress=False)
    m = json.loads((tmp_path / "p" / "metrics.json").read_text())
    assert clf.metrics["accuracy"] == m["accuracy"] and m["n_eval"] == 40
    assert len(m["demonstrations"]) == 2 and clf.labels == ["neg", "pos"]
    assert clf.predict(["good film"])[0] in ("neg", "pos")
    with pytest.raises(UserError, match="epochs=: not a prompt option"):
        textune.prompt(toy_csv, tmp_path / "q", model=str(lm_folder), epochs=3)


def test_compare_prompt_baseline_keeps_trust_remote_code(monkeypatch):
    """compare's prompt baseline is run_prompt on the run's config: the model's
    --trust-remote-code must reach it as it reaches the trained strategies."""
    from textune import prompting
    from textune.config import RunConfig
    from textune.multirun import _prompt

    got = []
    monkeypatch.setattr(prompting, "run_prompt", lambda a, progress: got.append(a) or {})
    cfg = RunConfig.from_options(data="x.csv", out="o", model="m", strategy="prompt",
                                 trust_remote_code=True)
    _prompt(cfg, False)
    assert got[0].trust_remote_code and got[0].model == "m"
