"""W4A{2,4,8,16} GEMM on the CPU with torch built-ins (the ``cpu`` backend).

The reference (``w4a_gemm_reference``) unpacks the weight to fp32 and runs one einsum
per call; this path does the same arithmetic with the CPU's fast kernels, and keeps
nothing beside the packed weight (the unpacked copy lives for one call):

* bits < 16: the activations become the reference's Eq. 2 codes, shifted into int8;
  one ``torch._int_mm`` (oneDNN int8 GEMM, int32 accumulation) per weight group gives
  the exact int32 group accumulator the reference and the Triton kernel compute; then
  the same zero-point correction, group scale and per-token scale.
* bits = 16: the weight dequantized once to the activations' dtype (q * s in fp32,
  rounded once), then one ``torch.matmul``. In fp32 this is the reference's function
  summed in another order; in bf16 the weights and the product are rounded to bf16.

Not used: ``torch._weight_int4pack_mm_for_cpu`` (measured fastest at M = 1 with bf16
activations) needs its own machine-dependent packed layout; keeping it beside ours
would double the weight memory (limit 0.52 B/param) and using it instead would make
saved files machine-dependent and leave the integer paths without their layout.
"""

from __future__ import annotations

import torch

from dyqvla_ros.kernels.int4 import quantize_activations, unpack_int4
from dyqvla_ros.kernels.w4a_gemm import SUPPORTED_BITS, dequantize_int4_reference


def w4a_gemm_cpu(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int
) -> torch.Tensor:
    """x (M x K) @ INT4 weight -> fp32 (M x N), activations at ``bits`` (see module doc)."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    m, k = x.shape
    if bits == 16:
        dtype = x.dtype if x.dtype in (torch.float32, torch.bfloat16) else torch.float32
        dense = dequantize_int4_reference(qweight, scales, group_size, dtype)
        return torch.matmul(x.to(dtype), dense[:k]).float()
    w = unpack_int4(qweight)  # K_pad x N int8, this call only
    k_pad, n = w.shape
    groups = k_pad // group_size
    q, scale, zero = quantize_activations(torch.nn.functional.pad(x.float(), (0, k_pad - k)), bits)
    half = 1 << (bits - 1)
    codes = (q - half).to(torch.int8)  # in [-128, 127] for every b <= 8
    offset = (half - zero).to(torch.int32)[:, None]
    w_t = w.t().contiguous()  # N x K_pad: _int_mm's fast operand is a transposed row-major matrix
    colsum = w.view(groups, group_size, n).sum(dim=1, dtype=torch.int32)
    group_scales = scales.float()
    out = torch.zeros(m, n)
    for g in range(groups):
        part = slice(g * group_size, (g + 1) * group_size)
        acc = torch._int_mm(codes[:, part], w_t[:, part].t()) + offset * colsum[g]
        out.add_(acc.float() * group_scales[g])
    return out * scale[:, None]
