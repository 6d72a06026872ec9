"""slm: build a small language model from scratch.

The public API, imported lazily so that `import slm` (and `slm --help`) never loads torch:

    from slm import GPT, ModelConfig, Config, resolve, load_model, generate, get_tokenizer
"""

import importlib

__version__ = "0.1.0"

_API = {
    "GPT": "slm.model.gpt", "ModelConfig": "slm.config", "TrainConfig": "slm.config", "Config": "slm.config",
    "resolve": "slm.config", "load_model": "slm.runs.checkpoint", "checkpoint_dir": "slm.runs.checkpoint",
    "generate": "slm.inference.generate", "get_tokenizer": "slm.data.tokenizer", "SlmError": "slm.errors",
}
__all__ = list(_API)


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'slm' has no attribute {name!r}")
    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value  # kept as the package's attribute: looked up here once per name
    return value
