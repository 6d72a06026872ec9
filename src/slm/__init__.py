"""slm: build a small language model from scratch.

The public API, imported lazily so that `import slm` (and `slm --help`) never loads torch:

    from slm import GPT, ModelConfig, Config, resolve, load_model, generate, get_tokenizer
"""

import importlib

__version__ = "0.1.0"

_API = {
    "GPT": "slm.model", "ModelConfig": "slm.config", "TrainConfig": "slm.config", "Config": "slm.config",
    "resolve": "slm.config", "load_model": "slm.checkpoint", "checkpoint_dir": "slm.checkpoint",
    "generate": "slm.generate", "get_tokenizer": "slm.tokenizer", "SlmError": "slm.errors",
}
__all__ = list(_API)


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'slm' has no attribute {name!r}")
    value = getattr(importlib.import_module(_API[name]), name)
    # Kept as the package's attribute: importing slm.generate has just set `slm.generate` to the module, which
    # `from slm import generate` would otherwise get instead of the function.
    globals()[name] = value
    return value
