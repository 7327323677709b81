"""Zero- and few-shot classification with a causal LM, scored like fine-tuning.

Every label is scored by the log-likelihood of its verbalizer after the prompt:

    score(x, l) = sum_t log p(v_l[t] | prefix, x, v_l[:t])       (``--label-score sum``)

(``mean`` divides by the verbalizer's token count). The prompt is

    prefix  = instruction + K demonstrations per class + the template's part before {text}
    example = the text + the template's part after {text}

The prefix is the same for every example, so its KV cache is computed once and shared across
all examples and labels; each batch (length-sorted) only runs its examples' tokens (and, when a
verbalizer has several tokens, the verbalizer tokens, one row per example and label).

Raw label scores of small LMs are biased towards some labels, so calibration is on by default
and both raw and calibrated metrics are reported:
- ``mean``: each label's scores are centred on their mean over the (unlabelled) evaluation texts;
- ``content-free``: contextual calibration (Zhao et al., 2021): label probabilities divided by
  those the model gives content-free inputs ("N/A", "", "[MASK]").
"""

from __future__ import annotations

import copy
import csv
import json
import logging
import time
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch

from . import cpu
from .classifier import Predictor
from .env import environment
from .errors import UserError
from .modeling import trust_remote_code

log = logging.getLogger(__name__)

CALIBRATIONS = ("mean", "content-free", "none")
CONTENT_FREE = ("N/A", "", "[MASK]")
DEFAULT_INSTRUCTION = ""
DEFAULT_TEMPLATE = "Text: {text}\nCategory:"
# catalog datasets name their task; a user's file gets the generic template
CATALOG_TEMPLATES = {"rt-polarity": "Text: {text}\nSentiment:",
                     "chnsenti": "Text: {text}\nSentiment:",
                     "bbc-news": "Text: {text}\nTopic:"}


@dataclass
class PromptArgs:
    model: str = "smollm2-135m"
    trust_remote_code: bool = False
    data: str = ""
    val: str | None = None
    test: str | None = None
    text_col: str | None = None
    label_col: str | None = None
    labels: str | None = None
    """Verbalizers, comma-separated, in the order of the dataset's sorted label names (or
    ``name=verbalizer`` pairs); default: the label names themselves."""
    template: str | None = None
    """Per-text format with {text}; default: CATALOG_TEMPLATES or DEFAULT_TEMPLATE."""
    instruction: str = DEFAULT_INSTRUCTION
    """Text before the demonstrations, may use {labels}."""
    chat: str = "off"
    """on: wrap the prompt in the tokenizer's chat template; auto: when it has one. Off by
    default: plain completion scored higher with the small catalog models (docs/BENCHMARKS.md)."""
    shots: int = 0
    """Demonstrations per class, drawn (seeded) from the training split only."""
    limit: int | None = None
    """Cap on evaluation rows (a stratified sample of the test split)."""
    split: str = "test"
    calibrate: str = "mean"
    temperature_rows: int = 200
    """Validation rows scored to fit a temperature, so the run's probabilities (``predict
    --min-confidence``, a distillation teacher's soft targets) mean what they say; 0: none."""
    label_score: str = "sum"
    batch_size: int = 32
    max_length: int = 256
    """Tokens of each text kept (its beginning)."""
    kv_cache: bool = True
    seed: int = 0
    split_seed: int | None = None
    """Seed of the split and of --limit's sample (default: ``seed``), as in `textune train`."""
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    out: str = ""


def cache_arg(decoder) -> str:
    """The name of ``decoder.forward``'s key-value cache argument: ``cache`` from transformers
    5.24 (``past_key_values`` is deprecated there, to go in 5.40), ``past_key_values`` before."""
    import inspect

    return "cache" if "cache" in inspect.signature(decoder.forward).parameters \
        else "past_key_values"


@dataclass
class PromptParts:
    """Token ids: the shared prefix, one list per example, one list per label."""
    prefix: list[int]
    examples: list[list[int]]
    verbalizers: list[list[int]]


class PromptScorer:
    """Scores labels for texts with a causal LM; the prefix KV cache is computed once."""

    def __init__(self, model, tokenizer, device: torch.device | None = None,
                 dtype: torch.dtype | None = None):
        self.model = model.eval()
        self.tok = tokenizer
        self.device = device or next(model.parameters()).device
        self.dtype = dtype
        self._prefix_key: tuple | None = None
        self._prefix_cache = None
        self._low_weights = cpu.KeptLowWeights()

    def _autocast(self):
        enabled = self.dtype is not None
        return torch.autocast(self.device.type, dtype=self.dtype or torch.float32,
                              enabled=enabled)

    @torch.inference_mode()
    def prefix_cache(self, prefix: list[int]):
        key = tuple(prefix)
        if self._prefix_key != key:
            ids = torch.tensor([prefix], device=self.device)
            with self._autocast():
                out = self.model.get_decoder()(input_ids=ids, use_cache=True)
            cache = getattr(out, "cache", None)  # (transformers >= 5.24; past_key_values before)
            self._prefix_key = key
            self._prefix_cache = cache if cache is not None else out.past_key_values
        return self._prefix_cache

    @torch.inference_mode()
    def score(self, parts: PromptParts, batch_size: int = 32, reduce: str = "sum",
              kv_cache: bool = True, progress: bool = False) -> np.ndarray:
        """Log-likelihood of every verbalizer after every example: (n_examples, n_labels)."""
        from tqdm.auto import tqdm

        n, L = len(parts.examples), len(parts.verbalizers)
        scores = np.zeros((n, L), dtype=np.float64)
        order = np.argsort([-len(e) for e in parts.examples], kind="stable")  # length-sorted
        single = all(len(v) == 1 for v in parts.verbalizers)
        bar = tqdm(total=n, desc="prompt", disable=not progress, unit="text", mininterval=1)
        with self._low_weights(self.model, self.device, self.dtype):
            for s in range(0, n, batch_size):
                idx = order[s:s + batch_size].tolist()
                if kv_cache and single:
                    scores[idx] = self._single_token(parts, idx)
                else:
                    scores[idx] = self._continuations(parts, idx, kv_cache)
                bar.update(len(idx))
        bar.close()
        if reduce == "mean":
            scores /= np.array([len(v) for v in parts.verbalizers], dtype=np.float64)[None]
        return scores

    def _hidden(self, rows: list[list[int]], prefix: list[int], kv_cache: bool) -> torch.Tensor:
        """Final hidden states at every position of right-padded ``rows`` (prefix excluded).
        Only the few positions that predict a verbalizer token go through the LM head (its
        vocabulary-sized matmul at every position would be ~20% of a small LM's compute)."""
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r)
            mask[i, :len(r)] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        P = len(prefix)
        body = self.model.get_decoder()
        with self._autocast():
            if kv_cache and P:
                cache = copy.deepcopy(self.prefix_cache(prefix))
                cache.batch_repeat_interleave(len(rows))
                full_mask = torch.cat([mask.new_ones((len(rows), P)), mask], 1)
                pos = torch.arange(P, P + width, device=self.device).expand(len(rows), -1)
                # position j of a row predicts its token j+1; the prefix's last position
                # predicts token 0, which is never a verbalizer token
                return body(input_ids=ids, attention_mask=full_mask, position_ids=pos,
                            use_cache=True, **{cache_arg(body): cache}).last_hidden_state
            pre = torch.tensor(prefix, dtype=torch.long, device=self.device).expand(len(rows), -1)
            h = body(input_ids=torch.cat([pre, ids], 1),
                     attention_mask=torch.cat([torch.ones_like(pre), mask], 1),
                     use_cache=False).last_hidden_state
            return h[:, P:]

    def _logp(self, hidden: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            logits = self.model.get_output_embeddings()(hidden).float()
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return torch.log_softmax(logits, -1)

    def _single_token(self, parts: PromptParts, idx: list[int]) -> np.ndarray:
        rows = [parts.examples[i] for i in idx]
        h = self._hidden(rows, parts.prefix, kv_cache=True)
        last = torch.tensor([len(r) - 1 for r in rows], device=h.device)
        logp = self._logp(h[torch.arange(len(rows), device=h.device), last])
        label_ids = torch.tensor([v[0] for v in parts.verbalizers], device=h.device)
        return logp[:, label_ids].double().cpu().numpy()

    def _continuations(self, parts: PromptParts, idx: list[int], kv_cache: bool) -> np.ndarray:
        L = len(parts.verbalizers)
        rows = [parts.examples[i] + v for i in idx for v in parts.verbalizers]
        h = self._hidden(rows, parts.prefix, kv_cache)
        r_idx, p_idx, tgt = [], [], []
        for r, row in enumerate(rows):
            v = parts.verbalizers[r % L]
            start = len(row) - len(v)
            r_idx += [r] * len(v)
            p_idx += list(range(start - 1, len(row) - 1))
            tgt += v
        dev = h.device
        logp = self._logp(h[torch.tensor(r_idx, device=dev), torch.tensor(p_idx, device=dev)])
        tok_lp = logp[torch.arange(len(tgt), device=dev), torch.tensor(tgt, device=dev)].double()
        sums = torch.zeros(len(rows), dtype=torch.float64, device=dev)
        sums.index_add_(0, torch.tensor(r_idx, device=dev), tok_lp)
        return sums.view(len(idx), L).cpu().numpy()


# ---------------------------------------------------------------------------------------------
# building the prompt


def parse_verbalizers(spec: str | None, names: list[str]) -> list[str]:
    if not spec:
        return list(names)
    items = [s.strip() for s in spec.split(",") if s.strip()]
    if all("=" in s for s in items):
        pairs = dict(s.split("=", 1) for s in items)
        unknown = sorted(set(pairs) - set(names))
        if unknown:
            raise UserError(f"--labels: {', '.join(unknown)} not among the dataset's labels "
                            f"({', '.join(names)})")
        return [pairs.get(n, n).strip() for n in names]
    if len(items) != len(names):
        raise UserError(f"--labels gives {len(items)} verbalizers for {len(names)} labels "
                        f"({', '.join(names)}); give one per label in that order, or name=word")
    return items


def use_chat(tokenizer, chat: str) -> bool:
    if chat == "on":
        if not getattr(tokenizer, "chat_template", None):
            raise UserError("--chat on: this model's tokenizer has no chat template")
        return True
    return chat == "auto" and bool(getattr(tokenizer, "chat_template", None))


def build_parts(tokenizer, texts: list[str], verbalizers: list[str],
                demos: list[tuple[str, str]], *, template: str = DEFAULT_TEMPLATE,
                instruction: str = DEFAULT_INSTRUCTION, chat: bool = False,
                max_text_tokens: int = 256) -> PromptParts:
    if "{text}" not in template:
        raise UserError("--template must contain {text}, where the text goes")
    head, tail = template.split("{text}", 1)
    label_list = ", ".join(verbalizers)
    intro = instruction.format(labels=label_list) if instruction else ""
    shots = "".join(f"{template.format(text=t)} {v}\n\n" for t, v in demos)
    context = (intro + "\n\n" if intro else "") + shots + head
    if chat:
        sentinel = "\x00TEXT\x00"
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": context + sentinel + tail}], tokenize=False,
            add_generation_prompt=True)
        before, after = rendered.split(sentinel, 1)
        prefix = tokenizer(before, add_special_tokens=False)["input_ids"]
        suffix, lead = after, ""   # the answer starts the assistant turn
    else:
        prefix = tokenizer(context, add_special_tokens=True)["input_ids"]
        suffix, lead = tail, " "
    suffix_ids = tokenizer(suffix, add_special_tokens=False)["input_ids"]
    examples = []
    for t in texts:
        ids = tokenizer(t, add_special_tokens=False)["input_ids"][:max_text_tokens]
        examples.append(ids + suffix_ids)
    verb = [tokenizer(lead + v, add_special_tokens=False)["input_ids"] for v in verbalizers]
    if any(len(v) == 0 for v in verb):
        raise UserError("--labels: a verbalizer tokenizes to nothing; give non-empty words")
    if len({tuple(v) for v in verb}) < len(verb):
        raise UserError("--labels: two labels have the same verbalizer tokens; make them differ")
    return PromptParts(prefix, examples, verb)


def draw_demos(texts: list[str], labels: list[str], names: list[str], shots: int, seed: int,
               exclude: set[str]) -> list[tuple[str, str]]:
    """K training rows per class (seeded), never a text that is also being evaluated; ordered
    round-robin over classes so no label sits last in every prompt."""
    if shots <= 0:
        return []
    rng = np.random.default_rng(seed)
    per: list[list[str]] = []
    for name in names:
        pool = [t for t, y in zip(texts, labels) if y == name and t not in exclude]
        if len(pool) < shots:
            raise UserError(f"--shots {shots}: the training split has only {len(pool)} "
                            f"usable rows of class {name!r}; lower --shots")
        per.append([pool[i] for i in rng.choice(len(pool), size=shots, replace=False)])
    return [(per[c][k], names[c]) for k in range(shots) for c in range(len(names))]


def calibrate(scores: np.ndarray, how: str, content_free: np.ndarray | None = None) -> np.ndarray:
    if how == "none":
        return scores
    if how == "mean":
        return scores - scores.mean(0, keepdims=True)
    if how == "content-free":
        assert content_free is not None
        logp = scores - np.logaddexp.reduce(scores, axis=1, keepdims=True)
        cf = content_free - np.logaddexp.reduce(content_free, axis=1, keepdims=True)
        p_cf = np.exp(cf).mean(0)
        return logp - np.log(p_cf / p_cf.sum())[None]
    raise UserError(f"--calibrate {how}: choose one of {', '.join(CALIBRATIONS)}")


def calibrate_new(raw: np.ndarray, how: str, means: np.ndarray | None,
                  content_free: np.ndarray | None) -> np.ndarray:
    """Calibrated scores of texts other than the run's evaluated ones: ``mean`` subtracts the
    run's per-label means (so a text's probabilities do not depend on the texts scored beside
    it); the others as :func:`calibrate`."""
    if how == "mean" and means is not None:
        return raw - means[None]
    return calibrate(raw, how, content_free)


def content_free_scores(scorer: PromptScorer, verbalizers: list[str], demos, kw: dict,
                        a: PromptArgs) -> np.ndarray:
    """The label scores of content-free inputs ("N/A", "", "[MASK]"), for ``content-free``."""
    parts = build_parts(scorer.tok, list(CONTENT_FREE), verbalizers, demos, **kw)
    return scorer.score(parts, a.batch_size, a.label_score, a.kv_cache)


class PromptClassifier(Predictor):
    """A finished `textune prompt` run as a classifier of new texts (``textune.load`` returns
    one; `predict`, `eval`, `serve` and `train --teacher` take the run): its model, template,
    demonstrations, verbalizers and calibration (``mean``: each label's scores less their mean
    over the run's evaluated texts, so one text scores the same alone or among others).
    Its logits are the calibrated label scores; probabilities their softmax at the temperature
    fitted on validation rows (calibration.json; 1 for a run without one)."""

    def __init__(self, run, device: str | None = None):
        from pathlib import Path

        from .loop import native_bf16

        run = Path(run)
        cfg = json.loads((run / "config.json").read_text(encoding="utf-8"))
        self.metrics = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
        self.names = json.loads((run / "labels.json").read_text(encoding="utf-8"))
        known = {f.name for f in fields(PromptArgs)}
        self.args = PromptArgs(**{k: v for k, v in cfg.items() if k in known})
        self.config = run_config(self.args)
        from .classifier import fitted_calibration

        self.temperature = fitted_calibration(run, self.names)[0]
        verb = self.metrics["verbalizers"]
        self.verbalizers = [verb[n] for n in self.names]
        self.demos = [(d["text"], verb[d["label"]]) for d in self.metrics["demonstrations"]]
        dev = self.device = torch.device(device or ("cuda" if torch.cuda.is_available()
                                                   else "cpu"))
        with trust_remote_code(self.args.trust_remote_code):
            model, tok, _ = load_causal_lm(self.args.model, dev)
        self.kw = {"template": self.args.template or DEFAULT_TEMPLATE,
                   "instruction": self.args.instruction, "chat": use_chat(tok, self.args.chat),
                   "max_text_tokens": self.args.max_length}
        self.scorer = PromptScorer(model, tok, dev,
                                   torch.bfloat16 if native_bf16(dev.type) else None)
        self._cf: np.ndarray | None = None

    def read_as(self, truncation: str | None, max_windows: int | None = None) -> None:
        if truncation is not None or max_windows is not None:
            raise UserError("--truncation / --max-windows: a prompt run reads each text's "
                            "first --max-length tokens; rerun textune prompt with a larger one")

    def _check_pairs(self, pairs: list[str] | None) -> None:
        if pairs is not None:
            raise UserError("a prompt run scores single texts, not text pairs")

    def _logits(self, texts: list[str], pairs: list[str] | None, batch_size: int | None,
                progress: bool) -> np.ndarray:
        a = self.args
        parts = build_parts(self.scorer.tok, list(texts), self.verbalizers, self.demos,
                            **self.kw)
        raw = self.scorer.score(parts, batch_size or a.batch_size, a.label_score, a.kv_cache,
                                progress)
        if a.calibrate == "content-free" and self._cf is None:
            self._cf = content_free_scores(self.scorer, self.verbalizers, self.demos, self.kw, a)
        means = self.metrics.get("mean_label_scores")
        means = np.array([means[n] for n in self.names]) if means else None
        # (a run from before textune kept the means: centred on these texts)
        return calibrate_new(raw, a.calibrate, means, self._cf).astype(np.float32)


def fit_prompt_temperature(a: PromptArgs, splits, names: list[str], scorer: PromptScorer,
                           parts_of, calibrated, exclude: set[str], progress: bool
                           ) -> tuple[float, str | None]:
    """The temperature of the run's calibrated scores, fitted on up to ``a.temperature_rows``
    validation rows (a stratified sample, none of the evaluated texts) scored as new texts are;
    (1, None) when there are too few rows or no mistakes to fit it on."""
    from .api import MIN_CALIBRATION_ROWS
    from .data import limit_indices
    from .metrics import fit_temperature

    val = splits.val
    if a.split != "test" or a.temperature_rows <= 0 or val is None or val.labels is None:
        return 1.0, None
    keep = [i for i, (t, y) in enumerate(zip(val.texts, val.labels))
            if y in names and t not in exclude]
    keep = limit_indices(keep, val.labels, a.temperature_rows, a.seed)
    if len(keep) < MIN_CALIBRATION_ROWS:
        log.info("probabilities not calibrated: %d validation rows (needs %d)", len(keep),
                 MIN_CALIBRATION_ROWS)
        return 1.0, None
    texts = [val.texts[i] for i in keep]
    y = np.array([names.index(val.labels[i]) for i in keep])
    s = calibrated(scorer.score(parts_of(texts), a.batch_size, a.label_score, a.kv_cache,
                                progress))
    if (s.argmax(1) == y).all():
        return 1.0, None  # (no mistake: the fit would make every probability ~1)
    t = fit_temperature(s, y)
    log.info("temperature %.3f fitted on %d validation rows (probabilities calibrated; "
             "--temperature-rows 0 leaves it out)", t, len(keep))
    return t, f"validation split ({len(keep)} rows)"


def run_config(a: PromptArgs):
    """The data settings of a prompt run as a ``RunConfig``: the same splits (and seed) as
    `textune train` with these arguments."""
    from .config import DataArgs, ModelArgs, RunConfig, TrainArgs

    return RunConfig(DataArgs(a.data, val=a.val, test=a.test, text_col=a.text_col,
                              label_col=a.label_col, val_fraction=a.val_fraction,
                              test_fraction=a.test_fraction, split_seed=a.split_seed),
                     ModelArgs(a.model), train=TrainArgs(seed=a.seed))


# ---------------------------------------------------------------------------------------------
# the job


def load_causal_lm(spec: str, device: torch.device):
    from transformers import AutoConfig, AutoModelForCausalLM

    from .modeling import is_decoder, load_tokenizer, remote_code, resolve_model

    src = resolve_model(spec)
    config = AutoConfig.from_pretrained(src, **remote_code())
    if not is_decoder(config):
        raise UserError(f"--model {spec}: prompting needs a causal (decoder) LM, this is "
                        f"{type(config).__name__}; try smollm2-135m or gemma3-270m")
    dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() \
        else torch.float32
    model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, **remote_code()).to(device)
    return model, load_tokenizer(src), src


def prompt(data, out, *, overwrite: bool = False, progress: bool = True, **options):
    """``textune prompt`` from Python: classify ``data``'s test rows (a file, a catalog name or
    a pandas DataFrame; ``val=``, ``test=`` alike) by prompting a causal LM, no training;
    ``options`` are the command's flags with underscores (``model="smollm2-135m"``,
    ``shots=4``, ``labels="negative,positive"``, ``limit=500``...). Writes the run folder
    ``out`` and returns it reloaded (``PromptClassifier``: ``.metrics``, ``.predict``...), as
    ``textune.load`` would."""
    from .config import frames_as_files

    known = {f.name for f in fields(PromptArgs)} - {"out"}
    bad = sorted(set(options) - known)
    if bad:
        raise UserError(f"{bad[0]}=: not a prompt option; options: {', '.join(sorted(known))}")
    run_prompt(PromptArgs(out=str(out), **frames_as_files({"data": data, **options})),
               progress=progress, overwrite=overwrite)
    return PromptClassifier(out)


def run_prompt(a: PromptArgs, *, progress: bool = True, overwrite: bool = False) -> dict:
    """Score ``a.data``'s evaluation rows by prompting ``a.model``; write the run folder."""
    with trust_remote_code(a.trust_remote_code):
        return _run_prompt(a, progress=progress, overwrite=overwrite)


def _run_prompt(a: PromptArgs, *, progress: bool, overwrite: bool) -> dict:
    from .api import (
        _data_key,
        _peak_memory_mb,
        _report,
        load_splits,
        prepare_out_dir,
        resolve_model_key,
        seed_everything,
    )
    from .data import limit_indices, save_labels
    from .metrics import classification_metrics

    if a.shots < 0:
        raise UserError("--shots must be 0 or more")
    if a.temperature_rows < 0:
        raise UserError("--temperature-rows must be 0 or more (0: no temperature)")
    if a.calibrate not in CALIBRATIONS:
        raise UserError(f"--calibrate {a.calibrate}: choose one of {', '.join(CALIBRATIONS)}")
    if a.label_score not in ("sum", "mean"):
        raise UserError(f"--label-score {a.label_score}: choose sum or mean")
    if a.split not in ("test", "val"):
        raise UserError(f"--split {a.split}: choose test or val")
    out = prepare_out_dir(a.out, overwrite)
    t0 = time.perf_counter()
    seed_everything(a.seed)
    cfg = run_config(a)
    splits = load_splits(cfg)  # the same splits (and seed) as `textune train`
    names = splits.labels
    ev = getattr(splits, a.split)
    assert ev.labels is not None and splits.train.labels is not None
    keep = [i for i, y in enumerate(ev.labels) if y in names]
    if len(keep) < len(ev):
        log.warning("%d %s rows have labels unseen in training; not scored", len(ev) - len(keep),
                    a.split)
    ev = ev.subset(limit_indices(keep, ev.labels, a.limit, cfg.split_seed))
    verbalizers = parse_verbalizers(a.labels, names)
    demos_named = draw_demos(splits.train.texts, splits.train.labels, names, a.shots, a.seed,
                             exclude=set(ev.texts))
    v_of = dict(zip(names, verbalizers))
    demos = [(t, v_of[y]) for t, y in demos_named]

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tok, src = load_causal_lm(a.model, device)
    chat = use_chat(tok, a.chat)
    template = a.template or CATALOG_TEMPLATES.get(a.data, DEFAULT_TEMPLATE)
    kw = {"template": template, "instruction": a.instruction, "chat": chat,
          "max_text_tokens": a.max_length}
    parts = build_parts(tok, ev.texts, verbalizers, demos, **kw)
    log.info("prompt: %d %s texts, %d labels (%s), %d demonstrations, prefix %d tokens, chat %s",
             len(ev), a.split, len(names), ", ".join(verbalizers), len(demos), len(parts.prefix),
             "on" if chat else "off")
    from .loop import native_bf16

    scorer = PromptScorer(model, tok, device,
                          torch.bfloat16 if native_bf16(device.type) else None)
    ts = time.perf_counter()
    raw = scorer.score(parts, a.batch_size, a.label_score, a.kv_cache, progress)
    seconds = time.perf_counter() - ts
    cf = content_free_scores(scorer, verbalizers, demos, kw, a)

    y = np.array([names.index(t) for t in ev.labels])
    results = {how: calibrate(raw, how, cf) for how in CALIBRATIONS}
    temperature, fitted_on = fit_prompt_temperature(
        a, splits, names, scorer, lambda texts: build_parts(tok, texts, verbalizers, demos, **kw),
        lambda r: calibrate_new(r, a.calibrate, raw.mean(0), cf), exclude=set(ev.texts),
        progress=progress)
    summary = {}
    for how, s in results.items():
        m = classification_metrics(y, s, names)
        summary[how] = {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"]}
    # label scores are log-likelihoods, not logits: their softmax is a probability only once a
    # temperature has been fitted on labelled rows
    metrics = classification_metrics(y, results[a.calibrate] / temperature, names,
                                     uncertainty=True, probabilities=fitted_on is not None)
    if fitted_on is not None:
        from .classifier import CALIBRATION
        from .metrics import calibration_error, softmax

        metrics["temperature"] = round(temperature, 4)
        metrics["ece_before_temperature"] = round(calibration_error(
            y, softmax(results[a.calibrate])), 4)
        (out / CALIBRATION).write_text(json.dumps(
            {"temperature": temperature, "fitted_on": fitted_on}, indent=2) + "\n")
    metrics.update({
        "split": a.split, "model": a.model, "strategy": "prompt" if not a.shots else
        f"prompt-fewshot ({a.shots} per class)", "calibration": a.calibrate,
        "raw": summary["none"], "calibrations": summary,
        "label_score": a.label_score, "verbalizers": dict(zip(names, verbalizers)),
        # (`mean` calibration's offsets: new texts are scored with these, not their own mean)
        "mean_label_scores": dict(zip(names, raw.mean(0).round(6).tolist())),
        "shots": a.shots, "demonstrations": [{"text": t, "label": y_} for t, y_ in demos_named],
        "chat_template": chat, "prefix_tokens": len(parts.prefix),
        "seconds": round(seconds, 3), "examples_per_second": round(len(ev) / max(seconds, 1e-9), 3),
        "train_seconds": 0.0, "trainable_params": 0,
        "total_params": sum(p.numel() for p in model.parameters()),
        "total_seconds": round(time.perf_counter() - t0, 3), "device": str(device),
        "peak_memory_mb": round(_peak_memory_mb(device), 1), "saved_bytes": 0,
        "splits": splits.split,
        "environment": environment(device),
    })
    cfg_out = {"kind": "prompt", **asdict(a), "template": template, "model": resolve_model_key(a.model),
               "data": _data_key(a.data), "val": _data_key(a.val), "test": _data_key(a.test)}
    (out / "config.json").write_text(json.dumps(cfg_out, indent=2, ensure_ascii=False) + "\n")
    save_labels(names, out / "labels.json")
    with open(out / "predictions.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "label", "predicted", *[f"score_{n}" for n in names]])
        pred = results[a.calibrate].argmax(1)
        for t, yt, p, s in zip(ev.texts, ev.labels, pred, results[a.calibrate]):
            w.writerow([t, yt, names[p], *[f"{x:.4f}" for x in s]])
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, ensure_ascii=False) + "\n")
    _report(out, metrics)
    return metrics
