"""Second-order (caption token x image patch) interaction attributions via integrated Jacobians.

Method: Moeller, Tilli, Vu, Pado, "Explaining Caption-Image Interactions in CLIP Models with Second-Order
Attributions", TMLR 2025 (arXiv 2408.14153), Sec. 3. Cut each encoder at a layer; ``x`` are the hidden states
entering it, ``r`` those of a reference input and ``g`` the rest of the encoder, L2 normalisation included. By
the fundamental theorem of calculus ``g(x) - g(r) = Jbar (x - r)`` exactly, with the integrated Jacobian
``Jbar = int_0^1 dg(r + a (x - r))/dx da`` (their Eq. 4). Splitting ``Jbar (x - r)`` by input position gives the
contribution vectors, and the product of two towers' contributions is the interaction matrix whose sum is the
four-term difference of cosines (their Eq. 6-7).

Symbols and their names here:
    x -> ``hidden`` (B, S, d);  r -> ``reference``;  x - r -> ``delta``;  g -> ``embed_from_hidden``;
    a -> ``alphas`` (quadrature nodes);  C[s] = (Jbar (x - r))[s] -> ``contributions`` (B, S, E);
    A = C_a C_b^T -> ``interactions`` (S_a, S_b).

Cost. ``Jbar (x - r)`` restricted to position s is a Jacobian-vector product with a tangent that is
``delta[s]`` on row s and zero elsewhere: S tangents per node (forward mode), or E cotangents (reverse mode).
When the cut is the last block and the readout reads one pooled position, the block's output is needed at
that position only, and a tangent on token s moves only row s of K and V: all S tangents then cost about
one block pass (:func:`_pooled_block_tangents`). The feature-pair matrix of the paper's code is never built.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import jvp, vjp, vmap

from xclip.core.quadrature import PathQuadrature
from xclip.core.rules import MODES, Mode  # noqa: F401  (re-exported)
from xclip.core.transformer import Positions, UpperEncoder, embed_from_hidden



@dataclass(frozen=True)
class PathContributions:
    """Contributions of a batch of inputs, with what they must sum to and what they cost.

    Attributes:
        values: ``(B, S, E)`` contribution vectors.
        start, end: ``(B, E)`` ``g(reference)`` and ``g(hidden)``; ``values.sum(1)`` approximates ``end - start``.
        n_nodes: ``(B,)`` integrand evaluations per input.
        n_endpoints: ``(B,)`` plain evaluations of g at panel edges per input.
        map_error: ``(B,)`` a bound on the Frobenius error of ``values``, NaN for a fixed rule (see
            :class:`~xclip.core.quadrature.PathIntegral`).
    """

    values: Tensor
    start: Tensor
    end: Tensor
    n_nodes: Tensor
    n_endpoints: Tensor
    map_error: Tensor


def contributions(
    upper: UpperEncoder,
    hidden: Tensor,
    reference: Tensor,
    positions: Positions,
    *,
    quadrature: PathQuadrature,
    normalize: bool = True,
    mode: Mode = "auto",
    internal_batch_size: int = 64,
) -> PathContributions:
    """Contribution vectors ``C`` of every input position, ``(B, S, E)``, and the two ends of the path.

    ``C[b].sum(0)`` equals ``g(hidden[b]) - g(reference[b])`` up to the quadrature error.

    Args:
        hidden: hidden states entering the cut layer, ``(B, S, d)``.
        reference: the reference's hidden states, ``(B, S, d)`` or ``(1, S, d)``.
        positions: masks and pooled positions of the inputs (shared by the reference and the path).
        quadrature: a fixed rule, or adaptive refinement to a completeness tolerance.
        normalize: put the L2 normalisation inside g (the exact convention).
        mode: "forward" (S tangents per node), "reverse" (E cotangents) or "auto" (the fast pooled-block
            path where it applies, else the cheaper of the two).
        internal_batch_size: how many sequences of S hidden states go through the upper encoder at once;
            the memory knob.

    Returns:
        float64 for float64 inputs, else float32 (the quadrature sum is accumulated in float32).
    """
    if internal_batch_size < 1:
        msg = f"internal_batch_size must be at least 1, got {internal_batch_size}"
        raise ValueError(msg)
    _prepare_forward_ad()
    n_inputs, n_positions, _ = hidden.shape
    shared_reference = reference
    reference = reference.expand_as(hidden)
    delta = hidden - reference

    def embed(h: Tensor, pos: Positions) -> Tensor:
        return embed_from_hidden(upper, h, pos, normalize=normalize)

    n_directions, tangent_fn = _choose_tangents(upper, embed, n_positions, mode, normalize)
    accumulate_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    points_per_call = max(1, internal_batch_size // n_directions)

    def path_point(item: Tensor, alpha: Tensor) -> Tensor:
        return reference[item] + alpha.to(hidden.dtype)[:, None, None] * delta[item]

    def weighted_sum(item: Tensor, alpha: Tensor, weights: Tensor, slot: Tensor, n_slots: int) -> Tensor:
        result: Tensor | None = None
        for chunk in torch.arange(len(item), device=hidden.device).split(points_per_call):
            point_item = item[chunk]
            tangents = tangent_fn(
                path_point(point_item, alpha[chunk]), delta[point_item], positions.select(point_item), internal_batch_size
            ).to(accumulate_dtype)
            if result is None:
                result = tangents.new_zeros((n_slots, weights.shape[1], *tangents.shape[1:]))
            # one weighted copy per rule: (points, rules, S, E); the rules are few (at most four)
            result.index_add_(0, slot[chunk], weights[chunk, :, None, None].to(accumulate_dtype) * tangents[:, None])
        assert result is not None
        return result

    def primitive(item: Tensor, alpha: Tensor) -> Tensor:
        return embed(path_point(item, alpha), positions.select(item)).to(accumulate_dtype)

    with torch.no_grad():
        start = _embed_reference(upper, shared_reference, positions, n_inputs, normalize=normalize)
        end = embed(hidden, positions)
        start, end = start.to(accumulate_dtype), end.to(accumulate_dtype)
        integral = quadrature.integrate(weighted_sum, primitive, start, end, n_positions=n_positions)
    return PathContributions(integral.values, start, end, integral.n_nodes, integral.n_endpoints, integral.map_error)


@functools.cache
def _prepare_forward_ad() -> None:
    """Run one tiny jvp with torch's ``torch.jit.script`` deprecation warning silenced: torch scripts its
    forward-AD decompositions on the first jvp of a process and warns about its own use of jit, which a user of
    xclip can do nothing about and which would sit in every log. Later jvps script nothing."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
        jvp(torch.sin, (torch.zeros(1),), (torch.ones(1),))


def _embed_reference(upper: UpperEncoder, reference: Tensor, positions: Positions, n_inputs: int, *, normalize: bool) -> Tensor:
    """``(n_inputs, E)`` embeddings of ``reference`` ``(1 or n_inputs, S, d)``; a single state shared by inputs
    of one structure (images) is embedded once, not once per input."""
    pooled = positions.pooled_index
    is_uniform = positions.mask is None and (pooled is None or bool((pooled == pooled[0]).all()))
    if reference.shape[0] == 1 and is_uniform:
        first = positions.select(torch.zeros(1, dtype=torch.long, device=reference.device))
        return embed_from_hidden(upper, reference, first, normalize=normalize).expand(n_inputs, -1)
    return embed_from_hidden(upper, reference.expand(n_inputs, -1, -1), positions, normalize=normalize)


def _choose_tangents(
    upper: UpperEncoder, embed: Callable[[Tensor, Positions], Tensor], n_positions: int, mode: Mode, normalize: bool
) -> tuple[int, Callable[[Tensor, Tensor, Positions, int], Tensor]]:
    """Pick the cheapest way to get all per-position directional derivatives; returns (directions, fn)."""
    if mode == "auto" and len(upper.blocks) == 1 and upper.pooled_readout is not None:
        pooled_readout = upper.pooled_readout

        def readout(y: Tensor) -> Tensor:
            e = pooled_readout(y)
            return F.normalize(e, dim=-1) if normalize else e

        return 1, lambda z, d, pos, _ibs: _pooled_block_tangents(upper, readout, z, d, pos)
    if mode == "forward" or (mode == "auto" and n_positions <= _embedding_dim_hint(upper)):
        return n_positions, lambda z, d, pos, ibs: _forward_tangents(embed, z, d, pos, ibs)
    if mode not in ("auto", "reverse"):
        msg = f"unknown mode {mode!r}; choose auto, forward or reverse"
        raise ValueError(msg)
    return _embedding_dim_hint(upper), lambda z, d, pos, ibs: _reverse_tangents(embed, z, d, pos, ibs)


def _embedding_dim_hint(upper: UpperEncoder) -> int:
    # the embedding width is not known before a forward pass; the hidden width is a close proxy for CLIP/SigLIP
    return upper.blocks[-1].fc2.out_features if upper.blocks else 1 << 30


def _forward_tangents(
    embed: Callable[[Tensor, Positions], Tensor], path_point: Tensor, delta: Tensor, positions: Positions, ibs: int
) -> Tensor:
    """``J(path_point)`` applied to ``delta`` restricted to each position, by forward mode: ``(P, S, E)``."""
    n_points, n_positions, _ = path_point.shape

    def directional(tangent: Tensor) -> Tensor:
        return jvp(lambda h: embed(h, positions), (path_point,), (tangent,))[1]

    outputs = []
    per_call = max(1, ibs // n_points)
    for start in range(0, n_positions, per_call):
        index = torch.arange(start, min(start + per_call, n_positions), device=delta.device)
        # tangents[i] is delta on row index[i] and zero elsewhere: (m, P, S, d)
        one_hot = F.one_hot(index, n_positions).to(delta.dtype)
        tangents = one_hot[:, None, :, None] * delta[None]
        outputs.append(vmap(directional)(tangents))  # primal is shared, only tangents are batched
    return torch.cat(outputs).permute(1, 0, 2)


def _reverse_tangents(
    embed: Callable[[Tensor, Positions], Tensor], path_point: Tensor, delta: Tensor, positions: Positions, ibs: int
) -> Tensor:
    """The same as :func:`_forward_tangents` by reverse mode: one cotangent per embedding dimension."""
    with torch.enable_grad():
        embedding, pullback = vjp(lambda h: embed(h, positions), path_point)
    n_points, n_dims = embedding.shape
    columns = []
    per_call = max(1, ibs // n_points)
    for start in range(0, n_dims, per_call):
        index = torch.arange(start, min(start + per_call, n_dims), device=delta.device)
        cotangents = F.one_hot(index, n_dims).to(embedding.dtype)[:, None, :].expand(-1, n_points, -1)
        (jacobian_rows,) = vmap(pullback)(cotangents)  # (m, P, S, d)
        columns.append(torch.einsum("mpsd,psd->psm", jacobian_rows, delta))
    return torch.cat(columns, dim=-1)


def _pooled_block_tangents(
    upper: UpperEncoder, readout: Callable[[Tensor], Tensor], path_point: Tensor, delta: Tensor, positions: Positions
) -> Tensor:
    """All S directional derivatives of a last block read at one position, linearised by hand: ``(P, S, E)``.

    With p the pooled position and n = LN1(z), the output is ``readout(mlp_residual(z_p + Attn(q_p, K, V)))``.
    A tangent on row s moves n_s only (LN acts per row), hence row s of K and V (and q when s = p): per head
    its effect on the attention output is ``a_s (dlogit_s (v_s - o) + dv_s)``, plus, for s = p, the query's
    effect on every weight. The logits are ``q_h . W_k,h n_j`` up to a constant that softmax ignores, so keys
    are never formed: the query is folded into ``W_k,h^T q_h``.
    """
    (block,) = upper.blocks
    assert positions.pooled_index is not None
    n_points, n_positions, width = path_point.shape
    n_heads = block.n_heads
    head_dim = width // n_heads
    rows = torch.arange(n_points, device=path_point.device)
    pooled = positions.pooled_index
    normed, d_normed = jvp(block.ln1, (path_point,), (delta,))  # (P, S, d) each; row s of d_normed is tangent s

    w_k = block.k_proj.weight.reshape(n_heads, head_dim, width)
    scale = head_dim**-0.5
    query = block.q_proj(normed[rows, pooled]).reshape(n_points, n_heads, head_dim)
    key_of_query = torch.einsum("phe,hed->phd", query, w_k) * scale  # (P, H, d)
    logits = torch.einsum("phd,psd->phs", key_of_query, normed)
    if positions.mask is not None:
        key_mask = positions.mask[rows, 0, pooled]  # (P, S): the pooled query's row of the mask
        logits = logits.masked_fill(~key_mask[:, None, :], float("-inf"))
    attn = torch.softmax(logits, dim=-1)  # (P, H, S)
    values = block.split_heads(block.v_proj(normed))  # (P, H, S, dh)
    d_values = block.split_heads(F.linear(d_normed, block.v_proj.weight))
    attended = torch.einsum("phs,phse->phe", attn, values)
    pooled_state = path_point[rows, pooled] + block.ls1(block.out_proj(attended.flatten(1)))  # (P, d)

    # tangent s through its own key and value: a_s (dlogit_s (v_s - o) + dv_s) per head
    own_d_logit = torch.einsum("phd,psd->phs", key_of_query, d_normed)
    d_attended = attn[..., None] * (own_d_logit[..., None] * (values - attended[:, :, None]) + d_values)
    # the pooled token's tangent also moves the query, and so every attention weight
    d_query = F.linear(d_normed[rows, pooled], block.q_proj.weight).reshape(n_points, n_heads, head_dim)
    d_logits = torch.einsum("phd,psd->phs", torch.einsum("phe,hed->phd", d_query, w_k) * scale, normed)
    d_attn = attn * (d_logits - (attn * d_logits).sum(-1, keepdim=True))
    d_attended[rows, :, pooled] += torch.einsum("phs,phse->phe", d_attn, values)
    d_attended = d_attended.transpose(1, 2).flatten(2)  # (P, S, d)
    d_pooled_state = block.ls1(F.linear(d_attended, block.out_proj.weight))  # LayerScale is linear: its own derivative
    d_pooled_state[rows, pooled] += delta[rows, pooled]  # the residual path of the pooled token

    # the MLP by hand: its activation is elementwise, so its Jacobian is a diagonal between fc1 and fc2, and
    # the S tangents cost two matrix products (autograd's jvp would redo the activation's algebra S times)
    normed2, d_normed2 = _jvp_per_tangent(block.ln2, pooled_state, d_pooled_state)
    pre_activation = block.fc1(normed2)  # (P, 4d)
    slope = jvp(block.activation, (pre_activation,), (torch.ones_like(pre_activation),))[1]
    block_output = pooled_state + block.ls2(block.fc2(block.activation(pre_activation)))
    d_hidden = F.linear(d_normed2, block.fc1.weight) * slope[:, None, :]
    d_block_output = d_pooled_state + block.ls2(F.linear(d_hidden, block.fc2.weight))
    return _jvp_per_tangent(readout, block_output, d_block_output)[1]


def _jvp_per_tangent(fn: Callable[[Tensor], Tensor], primal: Tensor, tangents: Tensor) -> tuple[Tensor, Tensor]:
    """``fn(primal)`` ``(P, ...)`` and its derivative along each of ``tangents`` ``(P, S, ...)``."""

    def directional(tangent: Tensor) -> Tensor:
        return jvp(fn, (primal,), (tangent,))[1]

    return fn(primal), vmap(directional, in_dims=1, out_dims=1)(tangents)


def interactions(text_contributions: Tensor, image_contributions: Tensor) -> Tensor:
    """Interaction matrix ``A = C_text C_image^T``: ``(S_t, E), (S_i, E) -> (S_t, S_i)``; batched over leading dims."""
    return text_contributions @ image_contributions.transpose(-1, -2)


def four_terms(text_embedding: Tensor, text_reference: Tensor, image_embedding: Tensor, image_reference: Tensor) -> Tensor:
    """``[cos(a, b), cos(r_a, b), cos(a, r_b), cos(r_a, r_b)]`` from normalised embeddings ``(..., E)``."""
    return torch.stack(
        [
            (text_embedding * image_embedding).sum(-1),
            (text_reference * image_embedding).sum(-1),
            (text_embedding * image_reference).sum(-1),
            (text_reference * image_reference).sum(-1),
        ],
        dim=-1,
    )


def four_term_value(terms: Tensor) -> Tensor:
    """``cos(a,b) - cos(r_a,b) - cos(a,r_b) + cos(r_a,r_b)``: what an exact interaction matrix sums to."""
    return terms[..., 0] - terms[..., 1] - terms[..., 2] + terms[..., 3]
