"""The public façade: ``InteractionAttribution(model).attribute(captions, images)``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from xclip.models.base import DualEncoderAdapter, ImageBatch, ImageLike, TextBatch, resolve_layer
from xclip.core.geometry import position_labels
from xclip.core.interaction import contributions, four_term_value, four_terms, interactions
from xclip.core.rules import (
    DEFAULT_INTERNAL_BATCH_SIZE,
    DEFAULT_SETTINGS,
    AttributionSettings,
    Convention,
    ImageReference,
    Mode,
    Rule,
    check_whole,
)
from xclip.core.quadrature import PathQuadrature
from xclip.core.transformer import Positions, UpperEncoder, embed_from_hidden
from xclip.errors import ConfigError, hint_unknown_arguments
from xclip.attribution.panels import PanelLayout, find_layout, layout_from_file, path_settings, weights_fingerprint
from xclip.attribution.result import Contributions, InteractionMap, PairNumbers, relative_error



# settings renamed since the first API (steps and method were the paper code's words): say the new name
RENAMED_SETTINGS = {"steps": "n_steps", "method": "rule"}
# the settings an attributor answers as attributes (see InteractionAttribution.__getattr__)
_SETTING_NAMES = frozenset(f.name for f in fields(AttributionSettings))


@dataclass(frozen=True)
class CutStates:
    """One tower's inputs at the cut layer: what the engine integrates between, and the encoder above it.

    Attributes:
        hidden: ``(B, S, d)`` hidden states entering the cut layer, in the dtype of ``upper`` (float32 for a
            low-precision model, whose layers below the cut run in its own dtype).
        reference: ``(B or 1, S, d)`` the reference's hidden states there.
        positions: masks and pooled positions of the inputs.
        upper: the encoder above the cut (in the dtype the engine differentiates in).
    """

    hidden: Tensor
    reference: Tensor
    positions: Positions
    upper: UpperEncoder


class InteractionAttribution:
    """Second-order caption-token x image-patch attributions of a dual encoder.

    Args:
        model: a family adapter from :func:`xclip.load_model`.
        settings: the settings below (``text_layer`` to ``mode``) as one
            :class:`~xclip.core.rules.AttributionSettings` (a run config's ``config.attribution.settings``); give
            either it or those keyword arguments, not both.
        text_layer, image_layer: block whose input is the cut (default -1: the input of the last block).
        tolerance: the relative completeness error each input must reach. Without ``n_steps`` the quadrature
            refines every caption and image until it does (or ``max_steps`` runs out); an input that misses it
            is flagged ``is_converged=False``.
        max_steps: the most integrand evaluations the adaptive rule spends on one input.
        n_steps: a fixed rule of N nodes instead (for comparisons with published figures and the reference
            convention); ``tolerance`` then only flags inputs that miss it (None: no flag).
        rule: rule of the fixed-step mode: ``gauss-legendre`` (default), ``midpoint`` or ``riemann-right``
            (the paper's code's rule). The adaptive rule is nested Gauss-Patterson panels.
        convention: ``exact`` (normalisation inside g, one pooled position: maps sum to the four-term value up
            to quadrature error) or ``reference`` (reproduces the paper's public code; needs ``n_steps``).
        text_filler: token id that replaces caption tokens in the text reference (default: pad token).
        image_reference: ``zeros`` (mean colour), ``black``, ``blur`` or ``noise``.
        scale_by_logit: multiply maps and scores by the model's logit scale.
        mode: ``auto``, ``forward`` or ``reverse`` differentiation.
        internal_batch_size: sequences pushed through the upper encoder at once (memory knob).
        panel_layout: where the adaptive rule's first panels end: ``auto`` (this model's calibrated layout for
            these settings, found beside a local checkpoint or in the layout cache; else the default), ``default``,
            a layout file from ``xclip calibrate``, or a :class:`~xclip.attribution.panels.PanelLayout`. The layout changes the
            cost, not the guarantee.

    Every setting is checked here, by :class:`~xclip.core.rules.AttributionSettings` and against the model (a
    :class:`~xclip.errors.ConfigError` names a bad one), and fixed afterwards:
    assigning to an attribute raises ``AttributeError``, so the maps always match the settings they report.
    Make a new ``InteractionAttribution`` for other settings; the model can be shared.
    """

    @hint_unknown_arguments(RENAMED_SETTINGS)
    def __init__(
        self,
        model: DualEncoderAdapter,
        *,
        settings: AttributionSettings | None = None,
        text_layer: int = DEFAULT_SETTINGS.text_layer,
        image_layer: int = DEFAULT_SETTINGS.image_layer,
        tolerance: float | None = DEFAULT_SETTINGS.tolerance,
        max_steps: int = DEFAULT_SETTINGS.max_steps,
        n_steps: int | None = DEFAULT_SETTINGS.n_steps,
        rule: Rule = DEFAULT_SETTINGS.rule,
        convention: Convention = DEFAULT_SETTINGS.convention,
        text_filler: int | None = DEFAULT_SETTINGS.text_filler,
        image_reference: ImageReference = DEFAULT_SETTINGS.image_reference,
        reference_seed: int = DEFAULT_SETTINGS.reference_seed,
        blur_radius: float = DEFAULT_SETTINGS.blur_radius,
        scale_by_logit: bool = DEFAULT_SETTINGS.scale_by_logit,
        mode: Mode = DEFAULT_SETTINGS.mode,
        internal_batch_size: int = DEFAULT_INTERNAL_BATCH_SIZE,
        panel_layout: PanelLayout | str | Path = "auto",
    ) -> None:
        from_keywords = AttributionSettings(
            text_layer=text_layer, image_layer=image_layer, tolerance=tolerance, max_steps=max_steps, n_steps=n_steps,
            rule=rule, convention=convention, text_filler=text_filler, image_reference=image_reference,
            reference_seed=reference_seed, blur_radius=blur_radius, scale_by_logit=scale_by_logit, mode=mode,
        )
        if settings is None:
            settings = from_keywords
        elif from_keywords != DEFAULT_SETTINGS:
            given = ", ".join(f"{f.name}=" for f in fields(AttributionSettings)
                              if getattr(from_keywords, f.name) != getattr(DEFAULT_SETTINGS, f.name))
            msg = f"InteractionAttribution() takes settings= or the settings as keyword arguments, not both (got settings= and {given})"
            raise TypeError(msg)
        elif not isinstance(settings, AttributionSettings):
            msg = f"settings must be an AttributionSettings, got {type(settings).__name__}"
            raise TypeError(msg)
        check_whole("internal_batch_size", internal_batch_size, low=1)
        if settings.text_filler is not None and settings.text_filler >= model.vocabulary_size:
            msg = f"text_filler {settings.text_filler} is not a token id of this tokenizer (0..{model.vocabulary_size - 1})"
            raise ConfigError(msg, setting="text_filler")
        self.model = model
        self.settings = settings
        self.text_layer = resolve_layer(settings.text_layer, len(model.text_blocks), "text")
        self.image_layer = resolve_layer(settings.image_layer, len(model.image_blocks), "image")
        # the settings that move the path: a calibrated layout is stored and found under them
        self.path_settings = path_settings(
            text_layer=self.text_layer, image_layer=self.image_layer, image_reference=settings.image_reference,
            text_filler=settings.text_filler, blur_radius=settings.blur_radius, reference_seed=settings.reference_seed,
        )
        self.panel_layout = _resolve_layout(panel_layout, model, self.path_settings) if settings.n_steps is None else PanelLayout()
        self._text_quadrature, self._image_quadrature = (
            PathQuadrature(n_steps=settings.n_steps, tolerance=settings.tolerance, max_steps=settings.max_steps,
                           rule=settings.rule, breakpoints=breakpoints)
            for breakpoints in (self.panel_layout.text, self.panel_layout.image)
        )
        self.internal_batch_size = internal_batch_size
        self._image_reference_cache: dict[tuple[int, ...], Tensor] = {}
        # below the cut a low-precision model runs as it is; above it, where the integral is taken, in float32,
        # so that the completeness error stays at float32 level (the identity holds for any hidden states)
        is_low_precision = model.dtype in (torch.bfloat16, torch.float16)
        self._upper_dtype = torch.float32 if is_low_precision else model.dtype
        self._text_upper = self._in_upper_dtype(model.text_upper(self.text_layer))
        self._image_upper = self._in_upper_dtype(model.image_upper(self.image_layer))
        self._is_frozen = True

    def __setattr__(self, name: str, value: object) -> None:
        if getattr(self, "_is_frozen", False):
            msg = f"InteractionAttribution settings are fixed at construction: make a new InteractionAttribution(model, {name}=...)"
            raise AttributeError(msg)
        super().__setattr__(name, value)

    def __getattr__(self, name: str) -> Any:
        # the settings read as attributes (attributor.tolerance, .convention, ...): called only for names the
        # instance lacks, so text_layer and image_layer are the resolved block indices, not the settings' negatives
        if name in _SETTING_NAMES and "settings" in self.__dict__:
            return getattr(self.settings, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def logit_scale(self) -> float:
        return self.model.logit_scale if self.settings.scale_by_logit else 1.0

    def text_contributions(self, captions: Sequence[str]) -> list[Contributions]:
        """Contribution vectors of each caption, BOS..EOS (SigLIP: all context positions)."""
        return self.text_batch_contributions(self.model.tokenize(captions))

    def image_contributions(self, images: Sequence[ImageLike]) -> list[Contributions]:
        """Contribution vectors of each image: prefix (CLS) positions, then patches row by row."""
        return self.image_batch_contributions(self.model.preprocess(images))

    def text_batch_contributions(self, batch: TextBatch) -> list[Contributions]:
        """:meth:`text_contributions` of captions already tokenised by ``model.tokenize``."""
        if self.settings.convention == "exact":
            reference_positions = batch.positions
        else:
            reference_ids = self.model.paper_code_text_ids(batch)
            reference_positions = Positions(batch.positions.mask, self.model.pooled_index(reference_ids))
        cut = self.text_cut(batch)
        values, embedding, reference_embedding, checks = self._attribute_tower(
            self._text_upper, self._text_quadrature, cut.hidden, cut.reference, batch.positions, reference_positions
        )
        return [
            Contributions(
                modality="text",
                values=values[b, :n],
                embedding=embedding[b],
                reference_embedding=reference_embedding[b],
                labels=batch.tokens[b].tokens,
                caption_tokens=batch.tokens[b],
                is_truncated=batch.is_truncated[b],
                **checks[b],
            )
            for b, n in enumerate(batch.n_positions)
        ]

    def image_batch_contributions(self, batch: ImageBatch) -> list[Contributions]:
        """:meth:`image_contributions` of images already preprocessed by ``model.preprocess``."""
        cut = self.image_cut(batch)
        hidden = cut.hidden
        values, embedding, reference_embedding, checks = self._attribute_tower(
            self._image_upper, self._image_quadrature, hidden, cut.reference, cut.positions, cut.positions
        )
        n_prefix = self.model.n_image_prefix
        grid = self.model.patch_grid
        labels = position_labels(n_prefix, grid)
        return [
            Contributions(
                modality="image",
                values=values[b],
                embedding=embedding[b],
                reference_embedding=reference_embedding[b],
                labels=labels,
                grid=grid,
                n_prefix=n_prefix,
                geometry=batch.geometry[b],
                **checks[b],
            )
            for b in range(hidden.shape[0])
        ]

    def text_cut(self, batch: TextBatch) -> CutStates:
        """The captions' hidden states entering the cut layer and their references' (the path's two ends)."""
        if self.settings.convention == "exact":
            reference_ids = self.model.text_reference_ids(batch, self.settings.text_filler)
        else:
            reference_ids = self.model.paper_code_text_ids(batch)
        # captions and their references share length and mask: one pass below the cut for both
        mask = batch.positions.mask
        both = Positions(mask=None if mask is None else torch.cat([mask, mask]))
        hidden, reference = self.model.text_hidden(torch.cat([batch.input_ids, reference_ids]), both, self.text_layer).chunk(2)
        dtype = self._upper_dtype
        return CutStates(hidden.to(dtype), reference.to(dtype), batch.positions, self._text_upper)

    def image_cut(self, batch: ImageBatch) -> CutStates:
        """The images' hidden states entering the cut layer and the reference's (the path's two ends)."""
        hidden = self.model.image_hidden(batch.pixel_values, self.image_layer)
        positions = Positions(pooled_index=self.model.image_pooled_index(hidden.shape[0]))
        dtype = self._upper_dtype
        return CutStates(hidden.to(dtype), self._image_reference_hidden(batch).to(dtype), positions, self._image_upper)

    def attribute(
        self,
        captions: Sequence[str],
        images: Sequence[ImageLike],
        *,
        pairs: Sequence[tuple[int, int]] | None = None,
    ) -> list[InteractionMap]:
        """Interaction maps of caption-image pairs.

        Each caption and each image is encoded once, so M captions x K images cost M + K attributions.

        Args:
            pairs: ``(caption index, image index)`` pairs to map; default every caption with every image,
                caption-major.
        """
        text = self.text_contributions(captions)
        image = self.image_contributions(images)
        if pairs is None:
            pairs = [(i, j) for i in range(len(text)) for j in range(len(image))]
        files = [str(item) if isinstance(item, (str, Path)) else None for item in images]
        return [replace(result, caption_index=i, image_index=j, image=files[j])
                for result, (i, j) in zip(interaction_maps(text, image, pairs, logit_scale=self.logit_scale), pairs)]

    # --- internals -----------------------------------------------------------------------------------
    def _attribute_tower(
        self,
        upper: UpperEncoder,
        quadrature: PathQuadrature,
        hidden: Tensor,
        reference: Tensor,
        positions: Positions,
        reference_positions: Positions,
    ) -> tuple[Tensor, Tensor, Tensor, list[dict[str, Any]]]:
        """(contributions, embedding, reference embedding, per-input accuracy fields of
        :class:`Contributions`) of one tower."""
        is_exact = self.settings.convention == "exact"
        hidden = hidden.to(self._upper_dtype)
        reference = reference.to(self._upper_dtype)
        path = contributions(
            upper,
            hidden,
            reference,
            positions,
            quadrature=quadrature,
            normalize=is_exact,
            mode=self.settings.mode,
            internal_batch_size=self.internal_batch_size,
        )
        values, target = path.values, path.end - path.start
        if is_exact:  # the path starts at the reference: same pooling, same embedding
            reference_embedding = path.start
        else:
            with torch.no_grad():
                reference_embedding = embed_from_hidden(
                    upper, reference.expand_as(hidden), reference_positions, normalize=True
                ).to(values.dtype)
            # the paper's code divides by the input's embedding norm outside the Jacobian
            scale = path.end.norm(dim=-1, keepdim=True)
            values, target = values / scale[:, :, None], target / scale
        errors = (values.sum(1) - target).norm(dim=-1).tolist()
        difference_norms = target.norm(dim=-1).tolist()
        # the bound is on the unscaled contributions: relative, so the reference convention's scale cancels
        values_norm = path.values.flatten(1).norm(dim=-1).double()
        map_errors = torch.where(values_norm > 0, path.map_error / values_norm, path.map_error).tolist()
        checks = [
            {
                "completeness_error": error,
                "difference_norm": norm,
                "n_nodes": n_nodes,
                "n_endpoints": n_endpoints,
                "map_error_bound": map_error,
                "is_converged": self.tolerance is None or (
                    relative_error(error, norm) <= self.tolerance and not map_error > self.tolerance  # NaN: fixed rule
                ),
            }
            for error, norm, n_nodes, n_endpoints, map_error in zip(
                errors, difference_norms, path.n_nodes.tolist(), path.n_endpoints.tolist(), map_errors
            )
        ]
        embedding = torch.nn.functional.normalize(path.end, dim=-1)
        return values, embedding, reference_embedding, checks

    def _in_upper_dtype(self, upper: UpperEncoder) -> UpperEncoder:
        return upper if self._upper_dtype == self.model.dtype else upper.to(self._upper_dtype)

    def _image_reference_hidden(self, batch: ImageBatch) -> Tensor:
        """Reference hidden states; shared references are computed once per image shape and reused."""
        is_shared = self.settings.image_reference != "blur"
        key = (self.image_layer, *batch.pixel_values.shape[1:])
        if is_shared and key in self._image_reference_cache:
            return self._image_reference_cache[key]
        pixels = self.model.image_reference_pixels(
            batch, self.settings.image_reference, seed=self.settings.reference_seed, blur_radius=self.settings.blur_radius
        )
        reference = self.model.image_hidden(pixels, self.image_layer)
        if is_shared:
            self._image_reference_cache[key] = reference
        return reference


def interaction_map(a: Contributions, b: Contributions, *, logit_scale: float = 1.0) -> InteractionMap:
    """The interaction map of two inputs from their stored contributions (caption-image, or same modality).

    Args:
        a: rows (usually the caption); b: columns (usually the image).
        logit_scale: factor for interactions and terms (the model's ``logit_scale.exp()``, or 1).
    """
    return interaction_maps([a], [b], [(0, 0)], logit_scale=logit_scale)[0]


def interaction_maps(
    rows: Sequence[Contributions],
    columns: Sequence[Contributions],
    pairs: Sequence[tuple[int, int]],
    *,
    logit_scale: float = 1.0,
    block: int = 4096,
) -> list[InteractionMap]:
    """Maps of many ``(row index, column index)`` pairs at once: one batched matrix product per ``block`` pairs.

    Inputs are zero-padded to a common length, which adds nothing to any product or sum.
    """
    if not pairs:
        return []
    row_values = torch.nn.utils.rnn.pad_sequence([r.values for r in rows], batch_first=True)  # (M, L, E)
    column_values = torch.nn.utils.rnn.pad_sequence([c.values for c in columns], batch_first=True)  # (K, S, E)
    maps: list[InteractionMap] = []
    for start in range(0, len(pairs), block):
        chunk = pairs[start : start + block]
        index = torch.tensor(chunk, device=row_values.device)
        values = interactions(row_values[index[:, 0]], column_values[index[:, 1]]) * logit_scale  # (P, L, S)
        map_norms = values.flatten(1).norm(dim=-1) / abs(logit_scale)
        numbers = _pair_numbers(rows, columns, chunk, values.sum(dim=(1, 2)), map_norms, logit_scale)
        for k, ((i, j), pair) in enumerate(zip(chunk, numbers)):
            row, column = rows[i], columns[j]
            maps.append(
                InteractionMap(
                    **{field.name: getattr(pair, field.name) for field in fields(PairNumbers)},
                    interactions=values[k, : row.values.shape[0], : column.values.shape[0]],
                    row_labels=row.labels,
                    column_labels=column.labels,
                    grid=column.grid,
                    n_prefix=column.n_prefix,
                    logit_scale=logit_scale,
                    caption_tokens=row.caption_tokens,
                    geometry=column.geometry,
                    is_caption_truncated=row.is_truncated,
                )
            )
    return maps


def pair_numbers(
    rows: Sequence[Contributions],
    columns: Sequence[Contributions],
    pairs: Sequence[tuple[int, int]],
    *,
    logit_scale: float = 1.0,
) -> list[PairNumbers]:
    """The numbers :func:`interaction_maps` gives for each pair, without its ``L x S`` map: the map's sum is the
    dot product of the two inputs' summed contributions, so a pair costs one dot product, not a matrix
    product."""
    if not pairs:
        return []
    index = torch.tensor(pairs, device=rows[0].values.device)
    row_sums = torch.stack([r.values.sum(0) for r in rows])  # (M, E)
    column_sums = torch.stack([c.values.sum(0) for c in columns])
    map_sums = (row_sums[index[:, 0]] * column_sums[index[:, 1]]).sum(-1) * logit_scale
    # |C_a C_b^T|_F^2 = <C_a^T C_a, C_b^T C_b>: the maps' norms from E x E Gram matrices, without the maps
    row_grams = torch.stack([r.values.T @ r.values for r in rows])
    column_grams = torch.stack([c.values.T @ c.values for c in columns])
    map_norms = torch.cat([
        (row_grams[part[:, 0]] * column_grams[part[:, 1]]).sum(dim=(1, 2)).clamp(min=0).sqrt() for part in index.split(256)
    ])
    return _pair_numbers(rows, columns, pairs, map_sums, map_norms, logit_scale)


def _pair_numbers(
    rows: Sequence[Contributions],
    columns: Sequence[Contributions],
    pairs: Sequence[tuple[int, int]],
    map_sums: Tensor,
    map_norms: Tensor,
    logit_scale: float,
) -> list[PairNumbers]:
    """Score, four terms, completeness and map error bound of each pair, given the sum of each pair's map and its
    Frobenius norm (without the logit scale)."""
    index = torch.tensor(pairs, device=map_sums.device)
    a, b = index[:, 0], index[:, 1]
    row_embeddings = torch.stack([torch.stack([r.embedding, r.reference_embedding]) for r in rows])  # (M, 2, E)
    column_embeddings = torch.stack([torch.stack([c.embedding, c.reference_embedding]) for c in columns])
    terms = four_terms(row_embeddings[a, 0], row_embeddings[a, 1], column_embeddings[b, 0], column_embeddings[b, 1]) * logit_scale
    value = four_term_value(terms)
    errors = (map_sums - value).abs()
    map_error_bounds = pair_map_error_bounds(rows, columns, index, map_norms).tolist()
    return [
        PairNumbers(
            score=score,
            terms=terms[k],
            four_term_value=total,
            completeness_error=error,
            completeness_bound=completeness_bound(rows[i], columns[j]) * logit_scale,
            score_scale=rows[i].difference_norm * columns[j].difference_norm * logit_scale,
            map_error_bound=bound,
        )
        for k, ((i, j), score, total, error, bound) in enumerate(
            zip(pairs, terms[:, 0].tolist(), value.tolist(), errors.tolist(), map_error_bounds)
        )
    ]


def pair_map_error_bounds(
    rows: Sequence[Contributions], columns: Sequence[Contributions], index: Tensor, map_norms: Tensor
) -> Tensor:
    """``(P,)``: a bound on each pair map's relative (Frobenius) error, from its two inputs' bounds.

    With computed contributions ``C = T + D`` (``T`` the true ones, ``|D|_F <= rho |C|_F``), the computed map
    ``C_a C_b^T`` differs from the true one by ``D_a C_b^T + C_a D_b^T - D_a D_b^T``, so its error is at most
    ``rho_a |C_a|_F |C_b|_2 + rho_b |C_a|_2 |C_b|_F + rho_a rho_b |C_a|_F |C_b|_F`` (``|.|_2``: the largest singular
    value). Relative to the map's own norm this is large where the map is small next to its inputs: two inputs
    whose contributions hardly meet, although each is accurate. NaN where an input has no bound (fixed rules).
    """
    row_norms, column_norms = _contribution_norms(rows), _contribution_norms(columns)
    rho_a = torch.tensor([r.map_error_bound for r in rows], dtype=torch.float64)[index[:, 0].cpu()]
    rho_b = torch.tensor([c.map_error_bound for c in columns], dtype=torch.float64)[index[:, 1].cpu()]
    frobenius_a, spectral_a = row_norms[:, index[:, 0].cpu()]
    frobenius_b, spectral_b = column_norms[:, index[:, 1].cpu()]
    error = rho_a * frobenius_a * spectral_b + rho_b * spectral_a * frobenius_b + rho_a * rho_b * frobenius_a * frobenius_b
    norms = map_norms.detach().double().cpu()
    return torch.where(norms > 0, error / norms, torch.where(error > 0, torch.inf, 0.0))


def _contribution_norms(inputs: Sequence[Contributions]) -> Tensor:
    """``(2, M)`` float64: the Frobenius norm and the largest singular value of each input's contributions."""
    return torch.tensor([item.norms for item in inputs], dtype=torch.float64).T.reshape(2, -1)


def completeness_bound(a: Contributions, b: Contributions) -> float:
    """The most a pair map's completeness error can be, from its two inputs' own errors.

    With ``d`` the difference ``g(x) - g(r)`` and ``eps`` the residual ``sum(C) - d`` of each input, the map
    sums to ``(d_a + eps_a) . (d_b + eps_b)`` and the four-term value is ``d_a . d_b``; their difference is
    ``d_a . eps_b + eps_a . d_b + eps_a . eps_b``, bounded by Cauchy-Schwarz.
    """
    eps_a, eps_b = a.completeness_error, b.completeness_error
    return eps_a * b.difference_norm + a.difference_norm * eps_b + eps_a * eps_b


def _resolve_layout(panel_layout: PanelLayout | str | Path, model: DualEncoderAdapter, settings: dict[str, Any]) -> PanelLayout:
    """``auto``: this model's calibrated layout for these settings, else the default; ``default``; a layout file."""
    if isinstance(panel_layout, PanelLayout):
        return panel_layout
    if panel_layout == "default":
        return PanelLayout()
    if panel_layout == "auto":
        return find_layout(model, settings)
    if isinstance(panel_layout, (str, Path)):
        return layout_from_file(Path(panel_layout).expanduser(), weights_fingerprint(model), settings, strict=True)
    msg = f"panel_layout must be auto, default, a layout file or a PanelLayout, got {panel_layout!r}"
    raise ConfigError(msg, setting="panel_layout")
