"""INT4 weight layout and the per-token activation quantizer (PyTorch references).

These functions define the integer semantics that every backend (the Triton kernel in
``w4a_gemm.py``, the CPU paths in ``dyqvla_ros.quant``) reproduces exactly.
"""

from __future__ import annotations

import torch

ACTIVATION_BITS = (2, 4, 8)
ACTIVATION_SCALES = ("token", "group")  # one Eq. 2 range per token, or per token and weight group
INT4_MIN, INT4_MAX = -8, 7


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack signed INT4 values, two per byte along K.

    Args:
        q: ``K x N`` integer tensor with values in [-8, 7]; K even.

    Returns:
        ``(K // 2) x N`` uint8 tensor. Byte ``[i, n]`` holds rows ``2i`` and ``2i + 1``::

            bit   7 6 5 4 | 3 2 1 0
                  q[2i+1] |  q[2i]      (two's complement nibbles)
    """
    if q.shape[0] % 2:
        raise ValueError(f"K must be even to pack two INT4 values per byte, got {q.shape[0]}")
    if q.numel() and (int(q.min()) < INT4_MIN or int(q.max()) > INT4_MAX):
        raise ValueError("INT4 values must lie in [-8, 7]")
    nibbles = q.to(torch.uint8) & 0xF  # two's complement low nibble
    return nibbles[0::2] | (nibbles[1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: ``(K // 2) x N`` uint8 -> ``K x N`` int8 in [-8, 7]."""
    as_int8 = packed.view(torch.int8)
    low = (as_int8 << 4) >> 4  # arithmetic shift sign-extends the low nibble
    high = as_int8 >> 4
    return torch.stack((low, high), dim=1).reshape(2 * packed.shape[0], packed.shape[1])


def quantize_activations(
    x: torch.Tensor, bits: int, group_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token (row) dynamic asymmetric quantization, paper Eq. 2, in fp32; with
    ``group_size``, per token *and* group of ``group_size`` consecutive features
    (``ACTIVATION_SCALES`` "group", [H]): each row of every group is its own Eq. 2 range.

    Q = clamp(round(x / s) + z, 0, 2^b - 1) with round-half-to-even, per row:
    the range [min, max] is widened to contain 0 (so 0 is exact and |x / s| <= 2^b - 1),
    s = (max - min) / (2^b - 1) (1 for an all-zero row) and z = round(-min / s).

    Asymmetric because it measured better than symmetric at 2 bits (relative output
    error 0.47 vs 0.63 on outlier activations, ../shared/notes/environment.md) and
    no worse at 4 and 8 bits; the zero point costs one integer correction per group in
    the GEMM (see ``w4a_gemm``).

    Per-group scales exist for activations with outlier channels: one per token lets
    the few large channels set the range of every other one (BENCHMARKS.md [H]). The
    weight groups are the natural groups: the GEMM's integer accumulator is already per
    weight group, so ``s_a[m, g]`` is applied next to ``s_w[g, n]`` at no extra integer
    work.

    Returns:
        (q, scale, zero): q as float32 integers in [0, 2^b - 1] (M x K), scale and zero
        (M,) per token, or (M, K / group_size) per token and group (K must then be a
        multiple of ``group_size``: pad with zeros, which every range contains anyway).
    """
    if bits not in ACTIVATION_BITS:
        raise ValueError(f"activation bits must be one of {ACTIVATION_BITS}, got {bits}")
    if group_size is not None:
        m, k = x.shape
        if group_size <= 0 or k % group_size:
            raise ValueError(f"K={k} is not a multiple of the activation group size {group_size}")
        q, scale, zero = quantize_activations(x.reshape(m * (k // group_size), group_size), bits)
        return q.view(m, k), scale.view(m, -1), zero.view(m, -1)
    levels = float((1 << bits) - 1)
    x = x.float()
    low = x.amin(dim=1).clamp(max=0.0)
    high = x.amax(dim=1).clamp(min=0.0)
    # A tensor divisor, not the Python float: for a CPU-scalar divisor PyTorch's CUDA
    # division multiplies by its reciprocal (one bit less exact), which made this
    # reference disagree with the kernel's IEEE division on a GPU (measured on an H200).
    scale = (high - low) / torch.full_like(high, levels)
    scale = torch.where(scale == 0.0, torch.ones_like(scale), scale)
    zero = torch.round(-low / scale)
    q = (torch.round(x / scale[:, None]) + zero[:, None]).clamp(0.0, levels)
    return q, scale, zero


def check_activation_scales(activation_scales: str) -> str:
    if activation_scales not in ACTIVATION_SCALES:
        raise ValueError(f"activation_scales must be one of {ACTIVATION_SCALES}, got {activation_scales!r}")
    return activation_scales


def fake_quantize_activations(x: torch.Tensor, bits: int, group_size: int | None = None) -> torch.Tensor:
    """x -> s * (Q(x) - z), the values an integer GEMM effectively multiplies (fp32)."""
    q, scale, zero = quantize_activations(x, bits, group_size)
    m, k = q.shape
    per_range = q.view(m, -1, group_size or k)  # (M, ranges, features of one range)
    return ((per_range - zero.view(m, -1, 1)) * scale.view(m, -1, 1)).view(m, k)
