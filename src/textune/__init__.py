"""textune: fine-tune pretrained language models for text classification."""

__version__ = "0.1.0"


def __getattr__(name):  # lazy: `import textune` stays fast, the CLI's --help too
    if name in ("fit", "train", "evaluate_run"):
        from . import api

        return getattr(api, name)
    if name in ("load", "Classifier"):
        from . import classifier

        return getattr(classifier, name)
    if name == "tune":
        from .tuning import tune

        return tune
    if name == "compare":
        from .multirun import compare

        return compare
    if name == "cv":
        from .crossval import cv

        return cv
    if name == "curve":
        from .learncurve import curve

        return curve
    if name == "prompt":
        from .prompting import prompt

        return prompt
    if name == "pretrain":
        from .pretraining import pretrain

        return pretrain
    if name == "RunConfig":
        from .config import RunConfig

        return RunConfig
    raise AttributeError(name)


__all__ = ["fit", "tune", "compare", "cv", "curve", "prompt", "pretrain", "train",
           "evaluate_run", "load", "Classifier", "RunConfig", "__version__"]
