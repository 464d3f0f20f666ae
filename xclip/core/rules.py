"""The engine's settings, their values and their limits, without torch: the run config checks a run's
settings with them before anything heavy loads, and the engine, the adapters and the loader use the same ones
(each re-exports its own). :class:`AttributionSettings` holds them as one object, with each default written once
and every check that needs no model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from xclip.errors import ConfigError

Convention = Literal["exact", "reference"]
CONVENTIONS: tuple[str, ...] = get_args(Convention)
MAX_SEED = 2**64 - 1  # torch's generators take an unsigned 64-bit seed; a larger one overflows inside torch
Mode = Literal["auto", "forward", "reverse"]
MODES: tuple[str, ...] = get_args(Mode)
ImageReference = Literal["zeros", "black", "blur", "noise"]
IMAGE_REFERENCES: tuple[str, ...] = get_args(ImageReference)

# --- the quadrature -------------------------------------------------------------------------------------------
Rule = Literal["gauss-legendre", "riemann-right", "midpoint"]
RULES: tuple[str, ...] = get_args(Rule)

DEFAULT_TOLERANCE = 1e-3
DEFAULT_MAX_STEPS = 256
# The nested rules a panel climbs: 1 (never a stopping rule; it only gives the 3-node rule a partner to compare
# with), 3, 7, 15 nodes. On 120 demo-model inputs a 31-node level changed no input's count, and stopping at 7
# nodes cost 10 to 14 % more.
PATTERSON_SIZES = (1, 3, 7, 15)
FIRST_LEVEL, TOP_LEVEL = 1, len(PATTERSON_SIZES) - 1
STORED_LEVELS = TOP_LEVEL - FIRST_LEVEL + 1  # partial sums a panel keeps, one per rule it may still climb to
BISECTION_NODES = 2 * PATTERSON_SIZES[FIRST_LEVEL]
# Where the first panels end when a model has no calibrated layout.
DEFAULT_BREAKPOINTS: tuple[float, ...] = (0.25, 0.5, 0.75)
MIN_ADAPTIVE_STEPS = PATTERSON_SIZES[FIRST_LEVEL] * (len(DEFAULT_BREAKPOINTS) + 1)
MAX_BREAKPOINTS = 15
# A panel's residual cannot be measured below the rounding of F at its ends; in float32 on the demo model it
# stayed under 13 eps |F| on panels a 64th of the path wide. Panels at this level are not refined further.
ROUNDING_FLOOR = 32
# The most nodes one input may take: far past any useful accuracy (the float32 floor is reached within 64 nodes on
# the demo model). A fixed Gauss-Legendre rule of N nodes solves an N x N eigenproblem for its nodes (N = 4096:
# 134 MB and 4 s; N = 100000, a typo, would take 75 GiB), so fixed rules stop at 1024 nodes (0.1 s).
MAX_NODES = 4096
MAX_FIXED_NODES = 1024
# sequences pushed through the upper encoder at once: a memory knob, so not one of the AttributionSettings
DEFAULT_INTERNAL_BATCH_SIZE = 64


@dataclass(frozen=True)
class AttributionSettings:
    """The settings of an attribution, as one object: the run config's ``attribution`` section makes it
    (``config.attribution.settings``) and :class:`xclip.InteractionAttribution` takes it (``settings=``), or makes
    it from its keyword arguments of the same names (documented there). Its defaults are the defaults of both.

    Checked when made, by the one check of each setting (a :class:`~xclip.errors.ConfigError` names the setting
    at fault); what needs the model (a layer in range, a token id in the vocabulary) the engine checks.
    """

    text_layer: int = -1
    image_layer: int = -1
    tolerance: float | None = DEFAULT_TOLERANCE
    max_steps: int = DEFAULT_MAX_STEPS
    n_steps: int | None = None
    rule: Rule = "gauss-legendre"
    convention: Convention = "exact"
    text_filler: int | None = None
    image_reference: ImageReference = "zeros"
    reference_seed: int = 0
    blur_radius: float = 16.0
    scale_by_logit: bool = False
    mode: Mode = "auto"

    def __post_init__(self) -> None:
        check_choice("convention", self.convention, CONVENTIONS)
        check_choice("image_reference", self.image_reference, IMAGE_REFERENCES)
        check_choice("mode", self.mode, MODES)
        check_whole("reference_seed", self.reference_seed, low=0, high=MAX_SEED)
        check_whole("text_layer", self.text_layer)
        check_whole("image_layer", self.image_layer)
        if self.text_filler is not None:
            check_whole("text_filler", self.text_filler, low=0)
        blur_radius = self.blur_radius
        if isinstance(blur_radius, bool) or not isinstance(blur_radius, (int, float)) or not 0 < blur_radius < float("inf"):
            msg = f"blur_radius must be a positive number of pixels, got {blur_radius!r}"
            raise ConfigError(msg, setting="blur_radius")
        object.__setattr__(self, "blur_radius", float(blur_radius))
        if not isinstance(self.scale_by_logit, bool):
            msg = f"scale_by_logit must be true or false, got {self.scale_by_logit!r}"
            raise ConfigError(msg, setting="scale_by_logit")
        check_quadrature(n_steps=self.n_steps, tolerance=self.tolerance, max_steps=self.max_steps, rule=self.rule,
                         convention=self.convention)


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        msg = f"unknown {name} {value!r}; choose one of {', '.join(choices)}"
        raise ConfigError(msg, setting=name)


def check_whole(name: str, value: object, low: int | None = None, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or (low is not None and value < low) or (high is not None and value > high):
        bound = f" of at least {low}" if low is not None else ""
        bound += f" and at most {high}" if high is not None else ""
        msg = f"{name} must be a whole number{bound}, got {value!r}"
        raise ConfigError(msg, setting=name)


def check_quadrature(*, n_steps: int | None, tolerance: float | None, max_steps: int, rule: str,
                     convention: str = "exact") -> None:
    """The one check of the quadrature settings (the API, the config and :class:`PathQuadrature` use it).

    Raises:
        ConfigError: naming the setting at fault in its ``setting`` field.
    """
    if rule not in RULES:
        msg = f"unknown quadrature rule {rule!r}; choose one of {', '.join(RULES)}"
        raise ConfigError(msg, setting="rule")
    for name, value, most in (("n_steps", n_steps, MAX_FIXED_NODES), ("max_steps", max_steps, MAX_NODES)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most):
            msg = f"{name} must be a whole number from 1 to {most}, got {value!r}"
            raise ConfigError(msg, setting=name)
    if tolerance is not None and (isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0 < tolerance < 1):
        msg = f"tolerance must lie between 0 and 1 (a relative completeness error), got {tolerance!r}"
        raise ConfigError(msg, setting="tolerance")
    if n_steps is not None:
        return
    if convention == "reference":
        msg = ("convention 'reference' reproduces the paper's code's fixed rule: give n_steps (its maps do not sum "
               "to the four-term value, so there is no tolerance to refine to)")
        raise ConfigError(msg, setting="convention")
    if tolerance is None:
        msg = "tolerance is not set and neither is n_steps: give a tolerance to adapt to, or n_steps for a fixed rule"
        raise ConfigError(msg, setting="tolerance")
    if rule != "gauss-legendre":
        msg = f"rule {rule!r} is for fixed-step comparisons: give n_steps with it (the adaptive rule is nested Gauss-Patterson)"
        raise ConfigError(msg, setting="rule")
    check_first_panels(max_steps, len(DEFAULT_BREAKPOINTS) + 1)


def check_first_panels(max_steps: int, n_first: int) -> None:
    """The adaptive rule must afford its first panels.

    Raises:
        ConfigError: naming ``max_steps``.
    """
    needed = PATTERSON_SIZES[FIRST_LEVEL] * n_first
    if max_steps < needed:
        msg = f"max_steps must be at least {needed} (the first {n_first} panels of {PATTERSON_SIZES[FIRST_LEVEL]} nodes), got {max_steps}"
        raise ConfigError(msg, setting="max_steps")


DEFAULT_SETTINGS = AttributionSettings()
