"""earlyexit: decode, evaluate and train decoder LLMs at intermediate ("exit") layers."""

from earlyexit.errors import EarlyExitError
from earlyexit.model import EarlyExitHead, Generation, parse_exit_layers, quarter_layers

__all__ = ["EarlyExitError", "EarlyExitHead", "Generation", "parse_exit_layers", "quarter_layers"]
__version__ = "0.1.0"
