"""W4A{2,4,8,16} GEMM: INT4 group-quantized weights, activations at a per-step bit-width.

out[M, N] = x[M, K] @ W[K, N], with W = q_w * s_w (q_w signed INT4, one fp16 scale per
group of G rows of K and column n) and, for bits < 16, x replaced by its per-token
quantization (``int4.quantize_activations``) *inside* the kernel:

    out[m, n] = s_a[m] * sum_g s_w[g, n] * acc_g[m, n]
    acc_g[m, n] = sum_{k in g} (Q[m, k] - z[m]) * q_w[k, n]                      (int32)
                = dot(Q - 2^(b-1), q_w)  +  (2^(b-1) - z[m]) * sum_{k in g} q_w[k, n]

The shifted activations Q - 2^(b-1) lie in [-128, 127] for every b <= 8, so one int8
``tl.dot`` serves A2, A4 and A8 (A2/A4 ride in int8: Hopper has no INT4 MMA); INT4
weights are unpacked to int8 in registers. The zero-point term uses the column sums of
the unpacked weight tile. Each K step is one weight group (BLOCK_K = G), so the group
scale is applied once per step to the exact int32 group accumulator.

For 16-bit activations the same loop dots x with the INT4 values (exact in bf16) and
scales the fp32 partial sum by s_w.

Two launch shapes (``w4a_gemm`` picks one):

* decode (M <= 16): BLOCK_M = 16 and split-K across programs, partial sums combined with
  fp32 atomics, so that a GEMV still fills the GPU;
* prefill (M > 16, ~280 tokens): BLOCK_M = 64, no split, each program owns its tile.

Integer semantics are identical to ``w4a_gemm_reference``: every int32 group
accumulator is bit-exact; only the fp32 sum over groups may differ in rounding order.
Rounding is half-to-even via the 1.5 * 2^23 trick (valid for |v| < 2^22, here
|v| <= 255) because libdevice is unavailable under TRITON_INTERPRET; divisions are
``div_rn`` so the GPU matches IEEE division like the reference.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from dyqvla_ros.kernels.int4 import ACTIVATION_BITS, quantize_activations, unpack_int4

SUPPORTED_BITS = (*ACTIVATION_BITS, 16)
DECODE_MAX_M = 16
_RNE_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2**23


@triton.jit
def _rne(v):
    """Round fp32 to the nearest integer, ties to even (|v| < 2^22)."""
    return (v + _RNE_MAGIC) - _RNE_MAGIC


@triton.jit
def _w4a_gemm_kernel(
    # pointers
    x_ptr,
    w_ptr,
    s_ptr,
    out_ptr,
    # sizes
    M,
    N,
    K,
    # strides
    stride_xm,
    stride_xk,
    stride_wk,
    stride_wn,
    stride_sg,
    stride_sn,
    stride_om,
    stride_on,
    # meta-parameters
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLIT_K: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_g = tl.arange(0, GROUP)
    offs_h = tl.arange(0, GROUP // 2)
    mask_m = offs_m < M
    mask_n = offs_n < N
    x_rows = x_ptr + offs_m[:, None] * stride_xm

    num_groups = tl.cdiv(K, GROUP)
    groups_per_split = tl.cdiv(num_groups, SPLIT_K)
    g_start = pid_k * groups_per_split
    g_end = tl.minimum(g_start + groups_per_split, num_groups)

    if BITS < 16:
        # Per-token range over the whole row (every split needs the same s and z).
        levels = (1 << BITS) - 1
        half = 1 << (BITS - 1)
        row_min = tl.zeros([BLOCK_M], dtype=tl.float32)  # starts at 0: range contains 0
        row_max = tl.zeros([BLOCK_M], dtype=tl.float32)
        for g in range(0, num_groups):
            offs_k = g * GROUP + offs_g
            x = tl.load(
                x_rows + offs_k[None, :] * stride_xk,
                mask=mask_m[:, None] & (offs_k[None, :] < K),
                other=0.0,
            ).to(tl.float32)
            row_min = tl.minimum(row_min, tl.min(x, axis=1))
            row_max = tl.maximum(row_max, tl.max(x, axis=1))
        scale = tl.math.div_rn(row_max - row_min, tl.full([BLOCK_M], levels, tl.float32))
        scale = tl.where(scale == 0.0, 1.0, scale)
        zero = _rne(tl.math.div_rn(-row_min, scale))
        offset = (half - zero).to(tl.int32)

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for g in range(g_start, g_end):
        offs_k = g * GROUP + offs_g
        x = tl.load(
            x_rows + offs_k[None, :] * stride_xk,
            mask=mask_m[:, None] & (offs_k[None, :] < K),
            other=0.0,
        )
        packed = tl.load(
            w_ptr + (g * (GROUP // 2) + offs_h)[:, None] * stride_wk + offs_n[None, :] * stride_wn,
            mask=mask_n[None, :],
            other=0,
        )
        as_int8 = packed.to(tl.int8, bitcast=True)
        low = (as_int8 << 4) >> 4  # sign-extend the low nibble (row 2i)
        high = as_int8 >> 4  # row 2i + 1
        w = tl.join(low, high).permute(0, 2, 1).reshape(GROUP, BLOCK_N)  # int8 in [-8, 7]
        w_scale = tl.load(s_ptr + g * stride_sg + offs_n * stride_sn, mask=mask_n, other=0.0).to(tl.float32)
        if BITS == 16:
            if DOT_FP32:
                part = tl.dot(x.to(tl.float32), w.to(tl.float32), input_precision="ieee")
            else:
                part = tl.dot(x, w.to(x.dtype))
            acc += part * w_scale[None, :]
        else:
            q = _rne(tl.math.div_rn(x.to(tl.float32), scale[:, None])) + zero[:, None]
            q = tl.minimum(tl.maximum(q, 0.0), levels)
            shifted = (q - half).to(tl.int8)
            part = tl.dot(shifted, w, out_dtype=tl.int32)
            part += offset[:, None] * tl.sum(w.to(tl.int32), axis=0)[None, :]
            acc += part.to(tl.float32) * w_scale[None, :]

    if BITS < 16:
        acc = acc * scale[:, None]
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    out_mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        tl.store(out_ptrs, acc, mask=out_mask)
    else:
        tl.atomic_add(out_ptrs, acc, mask=out_mask)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass(frozen=True)
class LaunchConfig:
    """How one ``w4a_gemm`` launch tiles the work: any values valid for ``tl.dot`` run.

    ``split_k > 1`` spreads the K groups over programs that combine partial sums with
    fp32 atomics (output zero-initialised), for small M where M x N tiles are too few.
    """

    block_m: int
    block_n: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3


def launch_config(m: int, n: int, num_groups: int, device: torch.device) -> LaunchConfig:
    """The default launch for the decode (M <= 16) or the prefill shape.

    NOTE: untuned starting points (no GPU was available when this was written): decode
    aims at >= 2 programs per SM of an H100/H200 (132 SMs); ``bench/kernels.py --sweep``
    measures alternatives on the GPU.
    """
    if m <= DECODE_MAX_M:
        block_n = 64
        n_tiles = triton.cdiv(n, block_n)
        sms = 4 if device.type != "cuda" else torch.cuda.get_device_properties(device).multi_processor_count
        return LaunchConfig(16, block_n, max(1, min(num_groups, triton.cdiv(2 * sms, n_tiles))))
    return LaunchConfig(64, 64)


def w4a_gemm(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    bits: int,
    group_size: int,
    config: LaunchConfig | None = None,
) -> torch.Tensor:
    """x (M x K) @ INT4 weight -> fp32 (M x N), activations at ``bits``.

    Args:
        x: ``M x K`` activations (fp32, bf16 or fp16).
        qweight: ``(K_pad // 2) x N`` uint8 from ``int4.pack_int4``; K_pad = K rounded
            up to a multiple of ``group_size`` (rows past K are zero).
        scales: ``(K_pad // group_size) x N`` weight scales.
        bits: activation bit-width, one of 2, 4, 8, 16.
        group_size: weight group size G along K (32, 64 or 128; BLOCK_K = G).
        config: override ``launch_config``'s tiling (tests, ``bench/kernels.py --sweep``).
    """
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    if x.dim() != 2 or qweight.dim() != 2 or scales.dim() != 2:
        raise ValueError("x, qweight and scales must be 2-D")
    m, k = x.shape
    k_pad = 2 * qweight.shape[0]
    n = qweight.shape[1]
    if qweight.dtype != torch.uint8:
        raise ValueError(f"qweight must be uint8, got {qweight.dtype}")
    if k_pad % group_size or not (k_pad - group_size < k <= k_pad):
        raise ValueError(f"x has K={k}, qweight holds {k_pad} rows (group {group_size})")
    if scales.shape != (k_pad // group_size, n):
        raise ValueError(f"scales must be {(k_pad // group_size, n)}, got {tuple(scales.shape)}")
    if not (x.device == qweight.device == scales.device):
        raise ValueError("x, qweight and scales must be on the same device")

    cfg = config or launch_config(m, n, k_pad // group_size, x.device)
    split = min(cfg.split_k, k_pad // group_size)
    out = (torch.zeros if split > 1 else torch.empty)((m, n), device=x.device, dtype=torch.float32)
    grid = (triton.cdiv(m, cfg.block_m), triton.cdiv(n, cfg.block_n), split)
    _w4a_gemm_kernel[grid](
        x,
        qweight,
        scales,
        out,
        m,
        n,
        k,
        x.stride(0),
        x.stride(1),
        qweight.stride(0),
        qweight.stride(1),
        scales.stride(0),
        scales.stride(1),
        out.stride(0),
        out.stride(1),
        BITS=bits,
        GROUP=group_size,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        SPLIT_K=split,
        DOT_FP32=_interpreting() or x.dtype == torch.float32,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return out


def w4a_gemm_reference(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int
) -> torch.Tensor:
    """PyTorch reference of ``w4a_gemm`` with the same integer semantics (fp32 out).

    The group accumulators are computed as fp32 matmuls of integer-valued tensors:
    every product is <= 128 * 8 and every partial sum <= 2^17 < 2^24, so they are exact
    integers in any summation order -- the same values as the kernel's int32 dot.
    """
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    m, k = x.shape
    w = unpack_int4(qweight).float()
    k_pad, n = w.shape
    groups = k_pad // group_size
    w = w.view(groups, group_size, n)
    x = torch.nn.functional.pad(x.float(), (0, k_pad - k))
    if bits == 16:
        part = torch.einsum("mgk,gkn->mgn", x.view(m, groups, group_size), w)
        return (part * scales.float()[None]).sum(dim=1)
    q, scale, zero = quantize_activations(x, bits)
    half = float(1 << (bits - 1))
    part = torch.einsum("mgk,gkn->mgn", (q - half).view(m, groups, group_size), w)
    part = part + (half - zero)[:, None, None] * w.sum(dim=1)[None]
    return (part * scales.float()[None]).sum(dim=1) * scale[:, None]
