"""distmerge: turn sharded training checkpoints into Hugging Face checkpoints, streaming and distributed."""
from .errors import MergeError
from .merge import MergeOptions, MergeResult, merge

__all__ = ["merge", "MergeOptions", "MergeResult", "MergeError"]
__version__ = "0.1.0"
