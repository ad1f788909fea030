"""Block-diagonal Walsh-Hadamard rotation of the input features ([H], QuaRot-style).

A linear layer y = x W^T is unchanged by an orthogonal R: y = (x R)(W R)^T. With R
block-diagonal, each block the Sylvester Hadamard matrix H_B / sqrt(B) (symmetric and
its own inverse), a few outlier channels of x are spread over the B features of their
block, so that a per-token or per-group activation range is no longer set by them
alone. The weight side W R is applied once, offline, before INT4 quantization
(``dyqvla_ros.quant.quantize_weight``); the activation side x R at every forward, here.

The block is the weight group size (32, 64 or 128), so that K = 4096 and 11008 (and any K
padded to a whole number of groups) rotate with no leftover, and a rotated group is still
one group of the GEMM's integer accumulator. Every backend receives the same rotated
activations (this pre-pass is shared), so their integer semantics stay identical.

How: one batched fp32 matmul of the (M * K / B) x B blocks with the B x B matrix, O(K B)
per token, rather than the O(K log B) butterfly of a fast Walsh-Hadamard transform: on
this 2-core CPU (one thread, bf16 input, B = 128, nothing else running) the butterfly's
log2 B elementwise passes took 0.11 / 0.16 ms (M = 1; K = 4096 / 11008) and 16 / 43 ms
(M = 280) against the matmul's 0.03 / 0.03 and 4.5 / 12 ms, and on a GPU it is one GEMM
launch instead of ~20 small kernels per layer (``bench/kernels.py --schemes`` times it
within the layers).
"""

from __future__ import annotations

import functools
import math

import torch


@functools.cache
def hadamard_matrix(block: int, device: torch.device) -> torch.Tensor:
    """H_B / sqrt(B) in fp32 on ``device``, Sylvester's ordering (H_1 = [1],
    H_2n = [[H_n, H_n], [H_n, -H_n]]); made once per block and device."""
    if block < 1 or block & (block - 1):
        raise ValueError(f"the Hadamard block must be a power of two, got {block}")
    h = torch.ones(1, 1)
    while h.shape[0] < block:
        h = torch.kron(torch.tensor([[1.0, 1.0], [1.0, -1.0]]), h)
    return (h / math.sqrt(block)).to(device)


def hadamard_transform(x: torch.Tensor, block: int) -> torch.Tensor:
    """x (..., K) -> x R, R = diag(H_B, ..., H_B) / sqrt(B), computed in fp32, returned
    in x's dtype. K must be a multiple of ``block``, a power of two. R is symmetric and
    orthogonal, so the same call also applies R^T = R^-1."""
    h = hadamard_matrix(block, x.device)
    k = x.shape[-1]
    if k % block:
        raise ValueError(f"K={k} is not a multiple of the Hadamard block {block}")
    return (x.float().reshape(-1, k // block, block) @ h).reshape(x.shape).to(x.dtype)
