"""xclip: second-order caption-token x image-patch attributions for CLIP-style dual encoders."""

from __future__ import annotations

from xclip.adapters import DualEncoderAdapter, get_adapter_cls, list_families
from xclip.attribution import InteractionAttribution, interaction_map, interaction_maps, pair_numbers
from xclip.core.quadrature import quadrature
from xclip.errors import ConfigError, InputError, ModelFamilyError, StoreError, XclipError
from xclip.loading import load_model
from xclip.result import Contributions, InteractionMap, PairNumbers

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "Contributions",
    "DualEncoderAdapter",
    "InputError",
    "InteractionAttribution",
    "InteractionMap",
    "ModelFamilyError",
    "PairNumbers",
    "StoreError",
    "XclipError",
    "__version__",
    "get_adapter_cls",
    "interaction_map",
    "interaction_maps",
    "list_families",
    "load_model",
    "pair_numbers",
    "quadrature",
]
