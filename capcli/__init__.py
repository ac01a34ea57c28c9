"""capcli: CNN + attention-LSTM image captioning, from data preparation to benchmarks.

The Python API is :class:`capcli.Captioner` (imported on first use, so that ``import capcli``
stays light for the command line).
"""

from capcli.version import __version__

__all__ = ["Captioner", "__version__"]


def __getattr__(name: str):
    if name == "Captioner":
        from capcli.api import Captioner

        return Captioner
    raise AttributeError(f"module 'capcli' has no attribute {name!r}")
