"""dsv3: DeepSeek-V3, understood and run.

Public API: ModelArgs, Transformer, load_model, generate (and the `dsv3` command).

The names resolve on first use (PEP 562), so `import dsv3` and the command line's argument
checks and --help do not pay for importing torch.
"""

import importlib

_PUBLIC = {
    "ModelArgs": "dsv3.config", "Transformer": "dsv3.model", "load_model": "dsv3.checkpoint",
    "generate": "dsv3.generation", "Dsv3Error": "dsv3.errors", "ConfigError": "dsv3.errors",
    "CheckpointError": "dsv3.errors", "UsageError": "dsv3.errors",
}
__all__ = list(_PUBLIC)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'dsv3' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_PUBLIC])
