"""Quantization helpers around ``torch.ao.quantization``.

torch 2.13 marks eager-mode ``torch.ao.quantization`` (and the quantized tensor types it
produces) deprecated in favour of torchao, and warns on every call. torchao is not a
dependency, and the eager API still works, so the daemon keeps using it; these helpers
silence exactly those deprecation notices so that real warnings stay visible. When a torch
release removes the API, the calls here fail loudly instead.
"""

from __future__ import annotations

import copy
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

# Matched on the message so unrelated DeprecationWarnings/UserWarnings still show:
# the blanket notice on every torch.ao.quantization entry point, and the notice on the
# quantized tensor types (quint8/qint8/qint32) that quantized modules are built from.
_AO_DEPRECATION_MESSAGES: tuple[str, ...] = (
    r"torch\.ao\.quantization is deprecated",
    r"torch\.quantize_per_tensor, torch\.quantize_per_channel and other quantized tensor "
    r"creation functions .*are deprecated",
)


@contextmanager
def quiet_ao_deprecation() -> Iterator[None]:
    """Suppress the ``torch.ao.quantization`` deprecation warnings inside the block, only.

    Like :func:`warnings.catch_warnings`, not thread-safe: use it around model preparation,
    not around concurrently running inference threads.
    """
    with warnings.catch_warnings():
        for message in _AO_DEPRECATION_MESSAGES:
            for category in (DeprecationWarning, UserWarning, FutureWarning):
                # `message` is matched against the start of the warning text.
                warnings.filterwarnings("ignore", message=message, category=category)
        yield


def ao_deprecation_pattern() -> re.Pattern[str]:
    """One regex matching the silenced messages (for pytest ``filterwarnings`` and tests)."""
    return re.compile("|".join(f"(?:{m})" for m in _AO_DEPRECATION_MESSAGES))


def quantize_dynamic(model: nn.Module) -> nn.Module:
    """An int8 dynamically quantized copy of ``model`` for CPU inference.

    Weights of ``nn.Linear``, ``nn.LSTM`` and ``nn.GRU`` become int8; activations are
    quantized on the fly, so no calibration data is needed. The copy is in eval mode and
    keeps ``arch_name``/``arch_kwargs``; ``model`` itself is left untouched.
    """
    # Copy first so that eval() does not change the caller's model; in place afterwards
    # keeps the root object, and with it arch_name/arch_kwargs.
    quantized = copy.deepcopy(model).eval()
    with quiet_ao_deprecation():
        torch.ao.quantization.quantize_dynamic(
            quantized, {nn.Linear, nn.LSTM, nn.GRU}, dtype=torch.qint8, inplace=True
        )
    return quantized
