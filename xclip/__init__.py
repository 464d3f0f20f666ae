"""xclip: second-order caption-token x image-patch attributions for CLIP-style dual encoders."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the names for type checkers; at run time they load on first access (PEP 562)
    from xclip.adapters import DualEncoderAdapter, get_adapter_cls, list_families
    from xclip.attribution import InteractionAttribution, interaction_map, interaction_maps, pair_numbers
    from xclip.core.quadrature import quadrature
    from xclip.errors import ConfigError, InputError, ModelFamilyError, RunUnavailable, StoreError, XclipError
    from xclip.loading import load_model
    from xclip.result import Contributions, InteractionMap, PairNumbers

__version__ = "0.1.0"

# public name -> the module that defines it; `import xclip` loads none of them (they pull in torch)
_LAZY = {
    "DualEncoderAdapter": "xclip.adapters",
    "get_adapter_cls": "xclip.adapters",
    "list_families": "xclip.adapters",
    "InteractionAttribution": "xclip.attribution",
    "interaction_map": "xclip.attribution",
    "interaction_maps": "xclip.attribution",
    "pair_numbers": "xclip.attribution",
    "quadrature": "xclip.core.quadrature",
    "ConfigError": "xclip.errors",
    "InputError": "xclip.errors",
    "ModelFamilyError": "xclip.errors",
    "StoreError": "xclip.errors",
    "RunUnavailable": "xclip.errors",
    "XclipError": "xclip.errors",
    "load_model": "xclip.loading",
    "Contributions": "xclip.result",
    "InteractionMap": "xclip.result",
    "PairNumbers": "xclip.result",
}

__all__ = [
    "ConfigError",
    "Contributions",
    "DualEncoderAdapter",
    "InputError",
    "InteractionAttribution",
    "InteractionMap",
    "ModelFamilyError",
    "PairNumbers",
    "RunUnavailable",
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


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later accesses skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
