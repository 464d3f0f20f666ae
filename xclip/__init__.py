"""xclip: second-order caption-token x image-patch attributions for CLIP-style dual encoders."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the names for type checkers; at run time they load on first access (PEP 562)
    from xclip.models.families import DualEncoderAdapter, get_adapter_cls, list_families
    from xclip.attribution.engine import InteractionAttribution, interaction_map, interaction_maps, pair_numbers
    from xclip.core.quadrature import quadrature
    from xclip.errors import ConfigError, InputError, ModelFamilyError, RunUnavailable, StoreError, XclipError
    from xclip.models.loading import load_model
    from xclip.attribution.result import Contributions, InteractionMap, PairNumbers


# public name -> the module that defines it; `import xclip` loads none of them (they pull in torch)
_LAZY = {
    "DualEncoderAdapter": "xclip.models.families",
    "get_adapter_cls": "xclip.models.families",
    "list_families": "xclip.models.families",
    "InteractionAttribution": "xclip.attribution.engine",
    "interaction_map": "xclip.attribution.engine",
    "interaction_maps": "xclip.attribution.engine",
    "pair_numbers": "xclip.attribution.engine",
    "quadrature": "xclip.core.quadrature",
    "ConfigError": "xclip.errors",
    "InputError": "xclip.errors",
    "ModelFamilyError": "xclip.errors",
    "StoreError": "xclip.errors",
    "RunUnavailable": "xclip.errors",
    "XclipError": "xclip.errors",
    "load_model": "xclip.models.loading",
    "Contributions": "xclip.attribution.result",
    "InteractionMap": "xclip.attribution.result",
    "PairNumbers": "xclip.attribution.result",
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
    if name == "__version__":  # pyproject.toml states it, once; read when asked (importlib.metadata costs 30 ms)
        from importlib.metadata import version

        return version("xclip")
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later accesses skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
