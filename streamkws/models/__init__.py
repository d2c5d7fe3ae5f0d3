"""Keyword-spotting architectures, built by name from a registry.

Importing this package registers every family (``tutorial_cnn``, ``dscnn``, ``bcresnet``
and its ``bcresnet1``/``2``/``3`` presets, ``mobilenetv2``, ``speech_embedding``
(a frozen pretrained embedding with a trainable head), and ``ensemble``, which averages
trained networks); see :mod:`.registry` for the contract the models follow.
"""

from streamkws.models.registry import (
    ARCHITECTURES,
    _ensure_registered,
    build_model,
    count_parameters,
)

_ensure_registered()  # one list of families, in the registry

__all__ = ["ARCHITECTURES", "build_model", "count_parameters"]
