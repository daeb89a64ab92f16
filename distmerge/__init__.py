"""distmerge: turn sharded training checkpoints into Hugging Face checkpoints, streaming and distributed.

`merge`, `MergeOptions` and `MergeResult` are imported on first use: they bring in the whole
merge machinery, which `python -m distmerge --help` (this package's first import) must not wait for."""
import importlib
import sys
import types

from .errors import MergeError

__all__ = ["merge", "MergeOptions", "MergeResult", "MergeError"]
__version__ = "0.1.0"


class _Package(types.ModuleType):
    """`distmerge.merge` stays the API function. Importing the submodule distmerge.merge makes
    Python bind the module to that name; the setter leaves the function in place."""

    @property
    def merge(self):
        from .merge import merge

        return merge

    @merge.setter
    def merge(self, value):
        pass


def __getattr__(name: str):
    if name in ("MergeOptions", "MergeResult"):
        return getattr(importlib.import_module(f"{__name__}.merge"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


sys.modules[__name__].__class__ = _Package
