"""Backbones, pooling and heads: one :class:`TextClassifier` for encoders and decoders."""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
import inspect
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UserError

log = logging.getLogger(__name__)

POOLINGS = ("auto", "cls", "mean", "last")
HEADS = ("linear", "mlp")


def resolve_model(spec: str | Path) -> str:
    """A catalog name, local folder, ``.gguf`` file or hub id -> what ``from_pretrained`` takes."""
    from . import hub

    s = str(spec)
    if s in hub.CATALOG:
        entry = hub.CATALOG[s]
        if entry.kind != "model":
            raise UserError(f"--model {s} is a {entry.kind}, not a model; models: "
                            f"{', '.join(hub.catalog_names('model'))}")
        folder = hub.fetch(s)
        if (folder / "model.gguf").exists():
            return str(gguf_to_hf(folder / "model.gguf", folder / "hf"))
        return str(folder)
    p = Path(s).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return str(gguf_to_hf(p, p.with_name(p.stem + "-hf")))
    if p.is_dir():
        if not (p / "config.json").exists():
            raise UserError(f"--model {s}: folder has no config.json; pass a Hugging Face model "
                            f"folder, a textune pretrain output, or a catalog name")
        return str(p)
    if p.exists() or s.startswith((".", "/", "~")):
        raise UserError(f"--model {s}: not a model folder or .gguf file")
    if s.count("/") > 1:
        raise UserError(f"--model {s}: no such folder; catalog models: "
                        f"{', '.join(hub.catalog_names('model'))}")
    return hub_model(s)


def hub_reachable(timeout: float = 5.0) -> bool:
    """Whether the Hugging Face endpoint answers one request (no retries: the hub client retries
    a dead connection for ~25 s per file, and a model load asks for several files). Asked once
    per process and endpoint; ``HF_HUB_OFFLINE=1`` means no."""
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    return not constants.HF_HUB_OFFLINE and _answers(constants.ENDPOINT, timeout)


@functools.cache
def _answers(endpoint: str, timeout: float) -> bool:
    try:
        from huggingface_hub.utils import get_session

        get_session().head(endpoint, timeout=timeout)
        return True
    except Exception:  # any failure (DNS, refused, timeout, proxy): not reachable
        return False


def hub_model(repo_id: str) -> str:
    """A hub id -> the id itself when the hub answers, else the folder of its cached copy;
    neither: a :class:`UserError` at once instead of a minute of retries."""
    if hub_reachable():
        return repo_id
    from huggingface_hub import constants, snapshot_download

    from . import hub

    try:
        folder = snapshot_download(repo_id, local_files_only=True)
    except Exception:
        raise UserError(f"--model {repo_id}: the Hugging Face hub cannot be reached from here and "
                        f"the model is not in its cache ({constants.HF_HUB_CACHE}); pass a local "
                        f"folder or a catalog name ({', '.join(hub.catalog_names('model'))})") \
            from None
    log.info("the Hugging Face hub cannot be reached: using the cached copy of %s", repo_id)
    return folder


def gguf_to_hf(gguf: Path, out: Path) -> Path:
    """Dequantise a GGUF decoder once into a plain Hugging Face folder (later loads: seconds)."""
    if (out / "config.json").exists() and (out / ".complete").exists():
        return out
    try:
        import gguf as _  # noqa: F401
    except ImportError:
        raise UserError(f"{gguf}: reading GGUF needs the gguf package; pip install gguf") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to a Hugging Face folder (once)", gguf.name)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                 dtype=torch.float32)
    # save_pretrained refuses a model that still carries its GGUF quantizer
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / ".complete").write_text("ok\n")
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)
    return out


def model_not_found_hint() -> str:
    from . import hub

    return (f"catalog models: {', '.join(hub.catalog_names('model'))}; a hub id needs network "
            f"access, or pass a local folder")


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # (its parent package is missing)
        return False


def load_tokenizer(src: str):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(src, **remote_code())
    except OSError as e:
        raise UserError(f"--model {src}: could not load a tokenizer ({str(e).splitlines()[0]}); "
                        f"{model_not_found_hint()}") from None
    except (ImportError, ValueError) as e:
        if "trust_remote_code" in str(e):
            raise UserError(f"--model {src}: {REMOTE_CODE_HINT}") from None
        # A SentencePiece model without a tokenizer.json (DeBERTa-v3, ALBERT, XLNet...) is
        # converted by transformers, which needs two packages; without them its last fallback
        # says `tiktoken` is missing, which sends the user the wrong way.
        missing = [p for p, mod in (("sentencepiece", "sentencepiece"),
                                    ("protobuf", "google.protobuf")) if not _importable(mod)]
        if missing:
            raise UserError(f"--model {src}: its tokenizer needs converting, which needs "
                            f"{' and '.join(missing)}: pip install {' '.join(missing)}") from None
        raise UserError(f"--model {src}: could not load its tokenizer "
                        f"({str(e).splitlines()[0]})") from None
    if tok.pad_token is None:
        # Reuse an existing token rather than growing the embedding matrix: the pad position is
        # masked out of attention and pooling, so which token it is does not matter.
        for cand in (tok.eos_token, tok.unk_token, tok.bos_token):
            if cand is not None:
                tok.pad_token = cand
                break
        else:
            raise UserError(f"--model {src}: tokenizer has no pad, eos, unk or bos token to pad "
                            f"with")
    return tok


def is_decoder(config) -> bool:
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_FOR_MASKED_LM_MAPPING

    t = type(config)
    return t in MODEL_FOR_CAUSAL_LM_MAPPING and t not in MODEL_FOR_MASKED_LM_MAPPING


_TRUST = contextvars.ContextVar("textune_trust_remote_code", default=False)


@contextlib.contextmanager
def trust_remote_code(flag: bool):
    """Inside it, models, configs and tokenizers are loaded with ``trust_remote_code=flag``
    (``--trust-remote-code``: a model whose repository brings its own modelling code)."""
    token = _TRUST.set(bool(flag))
    try:
        yield
    finally:
        _TRUST.reset(token)


def remote_code() -> dict:
    """The keyword every ``from_pretrained`` / ``from_config`` call of textune passes (False
    said outright: left unset, transformers asks on the terminal and waits for an answer)."""
    return {"trust_remote_code": _TRUST.get()}


REMOTE_CODE_HINT = ("the model's repository brings modelling code of its own (config.json "
                    "auto_map), which runs only with --trust-remote-code: pass it if you trust "
                    "that code")


@contextlib.contextmanager
def quiet_transformers():
    """transformers' load report and progress bars off, restored after: reloading a backbone
    textune saved, whose pooler is left out by design (its MISSING report would only alarm)."""
    from transformers.utils import logging as tl

    level, bars = tl.get_verbosity(), tl.is_progress_bar_enabled()
    tl.set_verbosity_error()
    tl.disable_progress_bar()
    try:
        yield
    finally:
        tl.set_verbosity(level)
        if bars:
            tl.enable_progress_bar()


def load_backbone(src: str, dtype: torch.dtype | None = None, load_in_4bit: bool = False,
                  gradient_checkpointing: bool = False) -> nn.Module:
    from transformers import AutoModel

    kw: dict = {}
    if load_in_4bit:
        if not torch.cuda.is_available():
            raise UserError("--load-in-4bit (QLoRA) needs a CUDA GPU and bitsandbytes; on this "
                            "machine use --strategy lora without it")
        try:
            import bitsandbytes  # noqa: F401
            from transformers import BitsAndBytesConfig
        except ImportError:
            raise UserError("--load-in-4bit needs bitsandbytes: pip install bitsandbytes") \
                from None
        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
        kw["device_map"] = {"": torch.cuda.current_device()}
    try:
        model = AutoModel.from_pretrained(src, dtype=dtype or torch.float32, **kw,
                                          **remote_code())
    except OSError as e:
        raise UserError(f"--model {src}: could not load ({str(e).splitlines()[0]}); a hub id "
                        f"needs network access, or pass a local folder / catalog name") from None
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False  # no generation: a KV cache would only cost memory
    if load_in_4bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    elif gradient_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise UserError(f"--gradient-checkpointing: {type(model).__name__} does not support it")
        kw = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # (its name from transformers 5.2x)
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
    return model


def set_dropout(backbone: nn.Module, p: float) -> int:
    """Every dropout of ``backbone`` to ``p``: its ``nn.Dropout`` modules and the attention
    dropout rates models keep as plain floats (``dropout_prob``, ``attention_dropout``, passed
    to SDPA). Returns how many were set."""
    n = 0
    for m in backbone.modules():
        if isinstance(m, nn.Dropout):
            m.p, n = p, n + 1
        for attr in ("dropout_prob", "attention_dropout"):
            if isinstance(getattr(m, attr, None), float):
                setattr(m, attr, p)
                n += 1
    cfg = backbone.config
    for key in ("hidden_dropout_prob", "attention_probs_dropout_prob", "attention_dropout",
                "hidden_dropout", "dropout"):
        if isinstance(getattr(cfg, key, None), float):
            setattr(cfg, key, p)  # (so a saved config says what trained)
    return n


def default_pooling(config) -> str:
    return "last" if is_decoder(config) else "mean"


def pool(hidden: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """Pool token states ``[B, T, H]`` to ``[B, H]``.

    ``last`` takes the last position whose mask is 1, which is right for left and right padding.
    """
    if how == "cls":
        return hidden[:, 0]
    if how == "mean":
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1)
    if how == "last":
        pos = torch.arange(mask.shape[1], device=mask.device)
        last = (mask * pos).argmax(-1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    raise ValueError(how)


class ClassifierHead(nn.Module):
    """``linear``: dropout + linear. ``mlp``: linear, GELU, dropout, linear."""

    def __init__(self, hidden: int, num_labels: int, kind: str = "linear", dropout: float = 0.1):
        super().__init__()
        if kind == "linear":
            self.net = nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden, num_labels))
        elif kind == "mlp":
            self.net = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Dropout(dropout),
                                     nn.Linear(hidden, num_labels))
        else:
            raise UserError(f"--head {kind}: choose one of {', '.join(HEADS)}")

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)


class TextClassifier(nn.Module):
    """A pretrained backbone, a pooling rule and a classification head."""

    def __init__(self, backbone: nn.Module, num_labels: int, pooling: str = "auto",
                 head: str = "linear", dropout: float = 0.1):
        super().__init__()
        self.backbone = backbone
        if getattr(backbone, "pooler", None) is not None:
            backbone.pooler = None  # unused: we pool ourselves (and DDP dislikes unused params)
        cfg = backbone.config.get_text_config() if hasattr(backbone.config, "get_text_config") \
            else backbone.config
        self.pooling = default_pooling(backbone.config) if pooling == "auto" else pooling
        if self.pooling not in POOLINGS[1:]:
            raise UserError(f"--pooling {pooling}: choose one of {', '.join(POOLINGS)}")
        self.hidden_size = cfg.hidden_size
        # segment ids only where the backbone has more than one segment embedding (RoBERTa and
        # XLM-R have one: a tokenizer's second-segment ids would index past it)
        self.segments = getattr(cfg, "type_vocab_size", 2) >= 2 and "token_type_ids" in \
            inspect.signature(backbone.forward).parameters
        self.head = ClassifierHead(cfg.hidden_size, num_labels, head, dropout)
        # A causal model reading right-padded rows needs no attention mask: a real token only
        # ever attends to earlier, real tokens, and pads are never pooled. Dropping the mask
        # lets SDPA take its causal flash path instead of a masked kernel.
        self.causal = is_decoder(backbone.config)

    def features(self, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
        """Pooled features. Rows must be right-padded (textune's collation always is)."""
        kw = {"token_type_ids": token_type_ids} if token_type_ids is not None and \
            self.segments else {}
        mask = None if self.causal else attention_mask
        out = self.backbone(input_ids=input_ids, attention_mask=mask, **kw)
        return pool(out.last_hidden_state, attention_mask, self.pooling)

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, features=None,
                labels=None):
        if features is None:
            features = self.features(input_ids, attention_mask, token_type_ids)
        return self.head(features.to(self.head.net[-1].weight.dtype))


def classification_loss(logits: torch.Tensor, labels: torch.Tensor, weight=None,
                        soft: bool = False) -> torch.Tensor:
    """Cross-entropy over the classes (``weight`` per class); ``soft``: against float rows of
    class probabilities (a teacher's); for multi-label 0/1 (or probability) float targets,
    binary cross-entropy per tag (``weight``: each tag's positive-row weight)."""
    if labels.is_floating_point() and not soft:
        return F.binary_cross_entropy_with_logits(logits.float(), labels, pos_weight=weight)
    return F.cross_entropy(logits.float(), labels, weight=weight)


def count_params(model: nn.Module) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total
