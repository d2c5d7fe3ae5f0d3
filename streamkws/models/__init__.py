"""Keyword-spotting architectures, built by name from a registry.

Importing this package registers every family (``tutorial_cnn``, ``dscnn``, ``bcresnet``
and its ``bcresnet1``/``2``/``3`` presets, ``mobilenetv2``, and ``ensemble``, which averages
trained networks); see :mod:`.registry` for the contract the models follow.
"""

from streamkws.models import bcresnet, cnn, dscnn, ensemble, mobile  # noqa: F401  (registration)
from streamkws.models.registry import ARCHITECTURES, build_model, count_parameters

__all__ = ["ARCHITECTURES", "build_model", "count_parameters"]
