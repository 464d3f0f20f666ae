"""A pre-LayerNorm transformer block and the part of an encoder above a cut, written without model families.

CLIP and SigLIP towers are stacks of the same block: ``x + Attn(LN1(x))`` then ``y + MLP(LN2(y))`` (open_clip's
may scale each branch by a learned LayerScale vector before adding it). The
adapters lend their modules to :class:`Block`; this module runs them with plain tensor ops so that forward-
and reverse-mode AD work through every piece (the fused attention kernels have no forward-AD formulas).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class Block:
    """One pre-LN transformer block, holding (not copying) a model's modules."""

    ln1: nn.LayerNorm
    q_proj: nn.Linear
    k_proj: nn.Linear
    v_proj: nn.Linear
    out_proj: nn.Linear
    n_heads: int
    ln2: nn.LayerNorm
    fc1: nn.Linear
    activation: Callable[[Tensor], Tensor]
    fc2: nn.Linear
    # LayerScale of the attention and MLP branches (identity where none). They must be linear (an elementwise
    # scale): the engine's hand-linearised last block applies them to tangents as they are
    ls1: Callable[[Tensor], Tensor] = nn.Identity()
    ls2: Callable[[Tensor], Tensor] = nn.Identity()

    def to(self, dtype: torch.dtype) -> Block:
        """A copy whose modules hold ``dtype`` weights (the model's own modules stay as they are)."""
        return Block(**{name: _cast(value, dtype) for name, value in vars(self).items()})

    def mlp_residual(self, y: Tensor) -> Tensor:
        """``y + MLP(LN2(y))``; acts on the last dimension only."""
        return y + self.ls2(self.fc2(self.activation(self.fc1(self.ln2(y)))))

    def split_heads(self, x: Tensor) -> Tensor:
        """``(..., S, d)`` -> ``(..., n_heads, S, d / n_heads)``."""
        *lead, n_positions, width = x.shape
        return x.reshape(*lead, n_positions, self.n_heads, width // self.n_heads).transpose(-3, -2)

    def queries_keys_values(self, normed: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The heads' queries, keys and values ``(..., n_heads, S, d / n_heads)`` of ``normed = LN1(x)``."""
        q, k, v = (self.split_heads(proj(normed)) for proj in (self.q_proj, self.k_proj, self.v_proj))
        return q, k, v

    def output_from_heads(self, x: Tensor, attended: Tensor) -> Tensor:
        """The block's output for input ``x`` ``(..., S, d)`` whose heads attended to ``attended``
        ``(..., n_heads, S, d / n_heads)``: ``y = x + Attn`` (the heads merged, projected and scaled), then
        ``y + MLP(LN2(y))``."""
        return self.mlp_residual(x + self.ls1(self.out_proj(attended.transpose(-3, -2).flatten(-2))))


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """Softmax attention per head; ``mask`` is boolean, True where a query may attend to a key.

    Written out rather than calling ``scaled_dot_product_attention`` so that forward-mode AD runs on every
    backend and float64 stays float64 (HF's eager path upcasts only to float32).
    """
    return attention_weights(q, k, mask) @ v


def attention_weights(q: Tensor, k: Tensor, mask: Tensor | None) -> Tensor:
    """The softmax weights of :func:`attention`, ``(..., queries, keys)``."""
    logits = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    return torch.softmax(logits, dim=-1)


def block_forward(block: Block, x: Tensor, mask: Tensor | None, *, fused: bool = False) -> Tensor:
    """Run one block on ``x`` of shape ``(B, S, d)``; ``mask`` broadcasts to ``(B, 1, S, S)``.

    ``fused=True`` uses ``scaled_dot_product_attention`` (fast, no forward AD): for the layers below the cut.
    """
    if not fused:
        return block_forward_with_attention(block, x, mask)[0]
    q, k, v = block.queries_keys_values(block.ln1(x))
    return block.output_from_heads(x, F.scaled_dot_product_attention(q, k, v, attn_mask=mask))


def block_forward_with_attention(block: Block, x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """:func:`block_forward` and the block's attention weights ``(B, n_heads, S, S)``, which stay in the graph (the
    attention-based baselines of :mod:`xclip.analysis.baselines` differentiate them)."""
    q, k, v = block.queries_keys_values(block.ln1(x))
    weights = attention_weights(q, k, mask)
    return block.output_from_heads(x, weights @ v), weights


@dataclass(frozen=True)
class UpperEncoder:
    """Everything of one encoder above the cut layer, ending in the (unnormalised) embedding.

    Either ``pooled_readout`` is set, and the embedding is ``pooled_readout(hidden[b, pooled_index[b]])``
    (CLIP towers, SigLIP text), or ``readout`` reads all positions (SigLIP's attention-pooling head).
    """

    blocks: tuple[Block, ...]
    pooled_readout: Callable[[Tensor], Tensor] | None = None
    readout: Callable[[Tensor], Tensor] | None = None

    def to(self, dtype: torch.dtype) -> UpperEncoder:
        """A copy in ``dtype``: a low-precision model can be differentiated above the cut in float32."""
        return UpperEncoder(
            blocks=tuple(block.to(dtype) for block in self.blocks),
            pooled_readout=_cast(self.pooled_readout, dtype),
            readout=_cast(self.readout, dtype),
        )


def _cast(value: object, dtype: torch.dtype) -> Any:
    """Modules are copied into ``dtype``; anything else (head counts, plain functions) is kept."""
    return copy.deepcopy(value).to(dtype) if isinstance(value, nn.Module) else value


@dataclass(frozen=True)
class Positions:
    """Per-input structure of a batch at the cut layer.

    Attributes:
        mask: boolean attention mask ``(B, 1, S, S)`` (True = may attend), or None for full attention.
        pooled_index: ``(B,)`` position that a pooled readout reads, or None.
    """

    mask: Tensor | None = None
    pooled_index: Tensor | None = None

    def select(self, index: Tensor) -> Positions:
        """The structure of the batch ``inputs[index]``."""
        return Positions(
            mask=None if self.mask is None else self.mask[index],
            pooled_index=None if self.pooled_index is None else self.pooled_index[index],
        )


def pooled_block_forward(block: Block, x: Tensor, mask: Tensor | None, pooled_index: Tensor) -> Tensor:
    """One block's output at one position per sequence, ``(B, d)``: :func:`block_forward` read at
    ``pooled_index``, without the other positions' queries and MLP, which nothing reads."""
    rows = torch.arange(x.shape[0], device=x.device)
    h = block.ln1(x)
    q = block.split_heads(block.q_proj(h[rows, pooled_index])[:, None])  # (B, H, 1, dh)
    k, v = block.split_heads(block.k_proj(h)), block.split_heads(block.v_proj(h))
    query_mask = None if mask is None else mask.expand(x.shape[0], -1, -1, -1)[rows, :, pooled_index][:, :, None]
    attended = attention(q, k, v, query_mask)  # (B, H, 1, dh)
    return block.output_from_heads(x[rows, pooled_index][:, None], attended)[:, 0]


def embed_from_hidden(upper: UpperEncoder, hidden: Tensor, positions: Positions, *, normalize: bool) -> Tensor:
    """The encoder's embedding ``(B, E)`` from hidden states ``(B, S, d)`` entering the cut layer."""
    if upper.pooled_readout is not None:
        assert positions.pooled_index is not None, "a pooled readout needs pooled_index"
        for block in upper.blocks[:-1]:
            hidden = block_forward(block, hidden, positions.mask)
        if upper.blocks:  # the last block is read at the pooled position only
            pooled = pooled_block_forward(upper.blocks[-1], hidden, positions.mask, positions.pooled_index)
        else:
            pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), positions.pooled_index]
        embedding = upper.pooled_readout(pooled)
    else:
        assert upper.readout is not None
        for block in upper.blocks:
            hidden = block_forward(block, hidden, positions.mask)
        embedding = upper.readout(hidden)
    return F.normalize(embedding, dim=-1) if normalize else embedding
