"""dsv3: DeepSeek-V3, understood and run.

Public API: ModelArgs, Transformer, load_model, generate (and the `dsv3` command).
"""

from dsv3.checkpoint import load_model
from dsv3.config import ModelArgs
from dsv3.errors import CheckpointError, ConfigError, Dsv3Error, UsageError
from dsv3.generation import generate
from dsv3.model import Transformer

__all__ = ["ModelArgs", "Transformer", "load_model", "generate", "Dsv3Error", "ConfigError",
           "CheckpointError", "UsageError"]
__version__ = "0.1.0"
