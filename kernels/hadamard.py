"""Block-diagonal Walsh-Hadamard rotation of the input features ([H], QuaRot-style).

A linear layer y = x W^T is unchanged by an orthogonal R: y = (x R)(W R)^T. With R
block-diagonal, each block the Sylvester Hadamard matrix H_B / sqrt(B) (symmetric and
its own inverse), a few outlier channels of x are spread over the B features of their
block, so that a per-token or per-group activation range is no longer set by them
alone. The weight side W R is applied once, offline, before INT4 quantization
(``dyqvla_ros.quant.quantize_weight``); the activation side x R at every forward, here,
as a fast Walsh-Hadamard transform: log2(B) butterfly passes, O(K log B) per token.

The block is the weight group size (32, 64 or 128), so that K = 4096 and 11008 (and any K
padded to a whole number of groups) rotate with no leftover, and a rotated group is still
one group of the GEMM's integer accumulator. Every backend receives the same rotated
activations (this pre-pass is shared), so their integer semantics stay identical.
"""

from __future__ import annotations

import math

import torch


def hadamard_transform(x: torch.Tensor, block: int) -> torch.Tensor:
    """x (..., K) -> x R, R = diag(H_B, ..., H_B) / sqrt(B), computed in fp32, returned
    in x's dtype. K must be a multiple of ``block``, a power of two.

    H_B is Sylvester's ordering (H_1 = [1], H_2n = [[H_n, H_n], [H_n, -H_n]]); since
    R is symmetric and orthogonal, the same call also applies R^T = R^-1.
    """
    if block < 1 or block & (block - 1):
        raise ValueError(f"the Hadamard block must be a power of two, got {block}")
    k = x.shape[-1]
    if k % block:
        raise ValueError(f"K={k} is not a multiple of the Hadamard block {block}")
    y = x.float().reshape(-1, k // block, block)
    half = 1
    while half < block:  # pairs (i, i + half) within runs of 2 * half: H_2n from H_n
        pairs = y.view(y.shape[0], y.shape[1], block // (2 * half), 2, half)
        y = torch.stack((pairs[..., 0, :] + pairs[..., 1, :], pairs[..., 0, :] - pairs[..., 1, :]), dim=3)
        half *= 2
    return (y.reshape(x.shape) * (1.0 / math.sqrt(block))).to(x.dtype)
