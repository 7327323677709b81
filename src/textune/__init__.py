"""textune: fine-tune pretrained language models for text classification."""

__version__ = "0.1.0"

_API = {"fit": "api", "train": "api", "evaluate_run": "api", "load": "classifier",
        "Classifier": "classifier", "tune": "tuning", "compare": "multirun", "cv": "crossval",
        "curve": "learncurve", "prompt": "prompting", "pretrain": "pretraining",
        "RunConfig": "config"}
"""Each API name and the module that defines it (imported on first use: `import textune`
stays fast, the CLI's --help too). No module may share an API name: once imported, a
submodule is bound on the package and would hide the function."""


def __getattr__(name):
    if name not in _API:
        raise AttributeError(name)
    import importlib

    return getattr(importlib.import_module(f".{_API[name]}", __name__), name)


__all__ = [*_API, "__version__"]
