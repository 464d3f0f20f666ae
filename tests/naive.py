"""A plainly written second-order attribution, the way the paper's public code computes it.

One backward pass per embedding dimension builds each encoder's integrated Jacobian; the full
(S_a * d_a) x (S_b * d_b) feature-pair matrix is formed and the hidden dimensions are summed out last.
Slow and memory-hungry on purpose: it is the yardstick the engine is checked (and benchmarked) against.
"""

from __future__ import annotations

import torch
from torch import Tensor

from xclip.core.transformer import Positions, UpperEncoder, embed_from_hidden


def integrated_jacobian(
    upper: UpperEncoder, hidden: Tensor, reference: Tensor, positions: Positions, alphas: Tensor, weights: Tensor
) -> Tensor:
    """``Jbar`` of one input, ``(E, S, d)``, by one backward pass per embedding dimension and node."""
    total = None
    for alpha, weight in zip(alphas.tolist(), weights.tolist()):
        point = (reference + alpha * (hidden - reference)).detach().requires_grad_(True)
        embedding = embed_from_hidden(upper, point, positions, normalize=True)[0]
        rows = []
        for k in range(embedding.shape[0]):
            (grad,) = torch.autograd.grad(embedding[k], point, retain_graph=True)
            rows.append(grad[0])
        jacobian = torch.stack(rows) * weight
        total = jacobian if total is None else total + jacobian
    assert total is not None
    return total


def naive_interactions(
    jacobian_a: Tensor, delta_a: Tensor, jacobian_b: Tensor, delta_b: Tensor
) -> Tensor:
    """``A[i, j] = sum_{d, d'} delta_a[i, d] (Jbar_a^T Jbar_b)[(i, d), (j, d')] delta_b[j, d']``."""
    n_dims, s_a, d_a = jacobian_a.shape
    _, s_b, d_b = jacobian_b.shape
    feature_pairs = jacobian_a.reshape(n_dims, s_a * d_a).T @ jacobian_b.reshape(n_dims, s_b * d_b)
    weighted = delta_a.reshape(-1, 1) * feature_pairs * delta_b.reshape(1, -1)
    return weighted.reshape(s_a, d_a, s_b, d_b).sum(dim=(1, 3))
