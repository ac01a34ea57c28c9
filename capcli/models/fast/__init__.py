"""The speed: code that computes what :mod:`capcli.models` defines, faster. Each piece is tested
equal to the reference it replaces (``tests/test_fast.py`` and the per-piece tests) and can be
turned off, as timm's ``fused_attn`` can:

- :mod:`.recurrence`: the training pass of the decoder, all steps fused with a hand-written
  backward through time (one GEMM per weight gradient);
- :mod:`.inference`: a decoding step without gradients (beam search, sampling, evaluation's
  teacher-forced loss), its products fused and the word embeddings pre-multiplied;
- :mod:`.fold`: BatchNorm folded into the convolution before it, for a backbone run without
  gradients;
- :mod:`.depthwise`: the weight gradient of depthwise convolutions on small maps on a CPU;
- :mod:`.chunks`: a CPU encodes a batch a few images at a time, sized to stay in cache.

``CAPCLI_FAST=0`` in the environment turns them all off for models built afterwards (the
reference code runs instead: slower, same results up to float rounding); :func:`set_enabled`
does the same from Python. A built model keeps its setting in ``Decoder.fused`` and
``Encoder.fast``, which can also be set per model.

How much each one saves, measured, is in docs/performance.md.
"""

from __future__ import annotations

import os

_enabled = os.environ.get("CAPCLI_FAST", "1").strip().lower() not in ("0", "false", "no", "off")


def enabled() -> bool:
    """Whether models built from now on use the fast paths."""
    return _enabled


def set_enabled(flag: bool) -> None:
    """Use the fast paths (True, the default) or the reference code (False) in models built from
    now on."""
    global _enabled
    _enabled = bool(flag)
