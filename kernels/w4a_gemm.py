"""W4A{2,4,8,16} GEMM: INT4 group-quantized weights, activations at a per-step bit-width.

out[M, N] = x[M, K] @ W[K, N], with W = q_w * s_w (q_w signed INT4, one fp16 scale per
group of G rows of K and column n) and, for bits < 16, x replaced by its per-token
quantization (``int4.quantize_activations``) *inside* the kernel:

    out[m, n] = s_a[m] * sum_g s_w[g, n] * acc_g[m, n]
    acc_g[m, n] = sum_{k in g} (Q[m, k] - z[m]) * q_w[k, n]                      (int32)
                = dot(Q - 2^(b-1), q_w)  +  (2^(b-1) - z[m]) * sum_{k in g} q_w[k, n]

With ``activation_scales="group"`` each token has one Eq. 2 range per weight group
(s_a[m, g], z[m, g], from the x tile the K step loads anyway: no pre-pass over the row):

    out[m, n] = sum_g s_a[m, g] * s_w[g, n] * acc_g[m, n]      (z[m, g] in acc_g)

The shifted activations Q - 2^(b-1) lie in [-128, 127] for every b <= 8, so one int8
``tl.dot`` serves A2, A4 and A8 (A2/A4 ride in int8: Hopper has no INT4 MMA); INT4
weights are unpacked to int8 in registers. The zero-point term uses the column sums of
the unpacked weight tile. Each K step is one weight group (BLOCK_K = G), so the group
scale is applied once per step to the exact int32 group accumulator.

For 16-bit activations the same loop dots x with the INT4 values (exact in bf16) and
scales the fp32 partial sum by s_w.

Launch shapes (``launch_config`` picks one):

* one token (M = 1): ``_w4a_gemv_kernel``, no tensor cores, split-K with fp32 atomics;
* decode (M <= 16): BLOCK_M = 16 and split-K across programs, partial sums combined with
  fp32 atomics, so that a GEMV still fills the GPU;
* prefill (M > 16, ~280 tokens): BLOCK_M = 64, no split, each program owns its tile;
  at 16 bits the weight is instead dequantized once (``dequantize_int4``, a transient
  copy in x's dtype; the stored weight stays packed) and the GEMM is cuBLAS's.

Integer semantics are identical to ``w4a_gemm_reference``: every int32 group
accumulator is bit-exact; only the fp32 sum over groups may differ in rounding order.
Rounding is half-to-even via the 1.5 * 2^23 trick (valid for |v| < 2^22, here
|v| <= 255) because libdevice is unavailable under TRITON_INTERPRET; divisions are
``div_rn`` so the GPU matches IEEE division like the reference.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from dyqvla_ros.kernels.int4 import (
    ACTIVATION_BITS,
    check_activation_scales,
    quantize_activations,
    unpack_int4,
)

SUPPORTED_BITS = (*ACTIVATION_BITS, 16)
DECODE_MAX_M = 16
_RNE_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2**23


@triton.jit
def _rne(v):
    """Round fp32 to the nearest integer, ties to even (|v| < 2^22)."""
    return (v + _RNE_MAGIC) - _RNE_MAGIC


@triton.jit
def _split_groups(num_groups, pid_k, SPLIT_K: tl.constexpr):
    """The weight groups [start, end) that split ``pid_k`` of SPLIT_K sums up."""
    per_split = tl.cdiv(num_groups, SPLIT_K)
    start = pid_k * per_split
    return start, tl.minimum(start + per_split, num_groups)


@triton.jit
def _group_range(low, high, levels):
    """Eq. 2 scale and zero point of [min(0, low), max(0, high)] (``levels`` = 2^b - 1):
    of a row (per-token scales) or of a row's group (per-group scales)."""
    low = tl.minimum(low, 0.0)
    scale = tl.math.div_rn(tl.maximum(high, 0.0) - low, levels)
    scale = tl.where(scale == 0.0, 1.0, scale)
    return scale, _rne(tl.math.div_rn(-low, scale))


@triton.jit
def _codes(x, scale, zero, BITS: tl.constexpr):
    """Eq. 2 codes Q = clamp(round(x / s) + z, 0, 2^b - 1) as fp32 (s, z broadcast to x)."""
    q = _rne(tl.math.div_rn(x.to(tl.float32), scale)) + zero
    return tl.minimum(tl.maximum(q, 0.0), (1 << BITS) - 1)


@triton.jit
def _shifted_codes(x, scale, zero, BITS: tl.constexpr):
    """Q - 2^(b-1) as int8, per row of x: the operand of the integer tensor-core dot."""
    return (_codes(x, scale[:, None], zero[:, None], BITS) - (1 << (BITS - 1))).to(tl.int8)


@triton.jit
def _group_part(x, w, scale, zero, offset, BITS: tl.constexpr, DOT_FP32: tl.constexpr):
    """One group's (or half-group's) x . w before the group scale.

    16 bits: fp32 dot of x with the INT4 values. Fewer: the exact int32 accumulator
    dot(Q - 2^(b-1), w) + (2^(b-1) - z) * colsum(w), as fp32 (exact: |acc| < 2^24).
    """
    if BITS == 16:
        if DOT_FP32:
            part = tl.dot(x.to(tl.float32), w.to(tl.float32), input_precision="ieee")
        else:
            part = tl.dot(x, w.to(x.dtype))
    else:
        acc = tl.dot(_shifted_codes(x, scale, zero, BITS), w, out_dtype=tl.int32)
        acc += offset[:, None] * tl.sum(w.to(tl.int32), axis=0)[None, :]
        part = acc.to(tl.float32)
    return part


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
    UNPACK: tl.constexpr,
    DOT_FP32: tl.constexpr,
    GROUP_SCALES: tl.constexpr,  # per-(token, group) activation ranges (bits < 16 only)
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
    w_cols = w_ptr + offs_n[None, :] * stride_wn

    num_groups = tl.cdiv(K, GROUP)
    g_start, g_end = _split_groups(num_groups, pid_k, SPLIT_K)

    if BITS < 16 and not GROUP_SCALES:
        # Per-token range over the whole row (every split needs the same s and z).
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
        scale, zero = _group_range(row_min, row_max, tl.full([BLOCK_M], (1 << BITS) - 1, tl.float32))
        offset = ((1 << (BITS - 1)) - zero).to(tl.int32)
    else:
        scale = tl.zeros([BLOCK_M], dtype=tl.float32)  # unused at 16 bits, per group below
        zero = scale
        offset = scale.to(tl.int32)

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for g in range(g_start, g_end):
        w_scale = tl.load(s_ptr + g * stride_sg + offs_n * stride_sn, mask=mask_n, other=0.0).to(tl.float32)
        if UNPACK == 1:
            # Even and odd rows of K as two half-group dots: the nibbles stay where
            # they were loaded (no interleave), x is read at stride 2 instead.
            packed = tl.load(
                w_cols + (g * (GROUP // 2) + offs_h)[:, None] * stride_wk, mask=mask_n[None, :], other=0
            )
            as_int8 = packed.to(tl.int8, bitcast=True)
            k_even = g * GROUP + 2 * offs_h
            x_even = tl.load(
                x_rows + k_even[None, :] * stride_xk, mask=mask_m[:, None] & (k_even[None, :] < K), other=0.0
            )
            x_odd = tl.load(
                x_rows + (k_even + 1)[None, :] * stride_xk,
                mask=mask_m[:, None] & (k_even[None, :] + 1 < K),
                other=0.0,
            )
            if GROUP_SCALES:  # the group's range covers both halves
                scale, zero = _group_range(
                    tl.minimum(tl.min(x_even.to(tl.float32), axis=1), tl.min(x_odd.to(tl.float32), axis=1)),
                    tl.maximum(tl.max(x_even.to(tl.float32), axis=1), tl.max(x_odd.to(tl.float32), axis=1)),
                    tl.full([BLOCK_M], (1 << BITS) - 1, tl.float32),
                )
                offset = ((1 << (BITS - 1)) - zero).to(tl.int32)
            part = _group_part(x_even, (as_int8 << 4) >> 4, scale, zero, offset, BITS, DOT_FP32)
            part += _group_part(x_odd, as_int8 >> 4, scale, zero, offset, BITS, DOT_FP32)
        else:
            offs_k = g * GROUP + offs_g
            x = tl.load(
                x_rows + offs_k[None, :] * stride_xk, mask=mask_m[:, None] & (offs_k[None, :] < K), other=0.0
            )
            if GROUP_SCALES:
                scale, zero = _group_range(
                    tl.min(x.to(tl.float32), axis=1),
                    tl.max(x.to(tl.float32), axis=1),
                    tl.full([BLOCK_M], (1 << BITS) - 1, tl.float32),
                )
                offset = ((1 << (BITS - 1)) - zero).to(tl.int32)
            if UNPACK == 0:
                # Interleave the nibbles of G/2 loaded rows into G rows in registers.
                packed = tl.load(
                    w_cols + (g * (GROUP // 2) + offs_h)[:, None] * stride_wk, mask=mask_n[None, :], other=0
                )
                as_int8 = packed.to(tl.int8, bitcast=True)
                low = (as_int8 << 4) >> 4  # sign-extend the low nibble (row 2i)
                high = as_int8 >> 4  # row 2i + 1
                w = tl.join(low, high).permute(0, 2, 1).reshape(GROUP, BLOCK_N)  # int8 in [-8, 7]
            else:
                # Each byte row loaded for both of its K rows (the second read hits the
                # cache), then the nibble of each row selected.
                packed = tl.load(
                    w_cols + (g * (GROUP // 2) + offs_g // 2)[:, None] * stride_wk,
                    mask=mask_n[None, :],
                    other=0,
                )
                as_int8 = packed.to(tl.int8, bitcast=True)
                w = tl.where((offs_g % 2 == 0)[:, None], (as_int8 << 4) >> 4, as_int8 >> 4)
            part = _group_part(x, w, scale, zero, offset, BITS, DOT_FP32)
        if GROUP_SCALES:
            acc += part * w_scale[None, :] * scale[:, None]
        else:
            acc += part * w_scale[None, :]

    if BITS < 16 and not GROUP_SCALES:
        acc = acc * scale[:, None]
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    out_mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        tl.store(out_ptrs, acc, mask=out_mask)
    else:
        tl.atomic_add(out_ptrs, acc, mask=out_mask)


@triton.jit
def _w4a_gemv_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    out_ptr,
    M,  # unused: one program row per x row; kept so both kernels take the same operands
    N,
    K,
    stride_xm,
    stride_xk,
    stride_wk,
    stride_wn,
    stride_sg,
    stride_sn,
    stride_om,
    stride_on,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLIT_K: tl.constexpr,
    GROUP_SCALES: tl.constexpr,  # per-(token, group) activation ranges (bits < 16 only)
):
    """One row of x against BLOCK_N columns, without tensor cores (decode, M = 1).

    A 16-row MMA tile wastes 15/16 of its work on one token; here each weight element
    meets its activation in one multiply-add and the K axis of a group is reduced once.
    The integer path keeps the exact int32 group accumulator sum_k (Q_k - z) q_w[k, n]
    (the same integer as the dot form); the fp32 sums differ from the MMA's only in order.
    With GROUP_SCALES each split computes the ranges of its own groups.
    """
    pid_n = tl.program_id(0).to(tl.int64)
    pid_k = tl.program_id(1)
    row = tl.program_id(2).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_h = tl.arange(0, GROUP // 2)
    mask_n = offs_n < N
    x_row = x_ptr + row * stride_xm
    w_cols = w_ptr + offs_n[None, :] * stride_wn

    num_groups = tl.cdiv(K, GROUP)
    g_start, g_end = _split_groups(num_groups, pid_k, SPLIT_K)

    if BITS < 16 and not GROUP_SCALES:
        offs_g = tl.arange(0, GROUP)
        low = tl.zeros([GROUP], dtype=tl.float32)  # elementwise running min / max
        high = tl.zeros([GROUP], dtype=tl.float32)
        for g in range(0, num_groups):
            offs_k = g * GROUP + offs_g
            x = tl.load(x_row + offs_k * stride_xk, mask=offs_k < K, other=0.0).to(tl.float32)
            low = tl.minimum(low, x)
            high = tl.maximum(high, x)
        row_min = tl.min(low, axis=0)
        row_max = tl.max(high, axis=0)
        scale, zero = _group_range(row_min, row_max, tl.full([1], (1 << BITS) - 1, tl.float32))

    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for g in range(g_start, g_end):
        packed = tl.load(
            w_cols + (g * (GROUP // 2) + offs_h)[:, None] * stride_wk, mask=mask_n[None, :], other=0
        )
        as_int8 = packed.to(tl.int8, bitcast=True)
        w_even = (as_int8 << 4) >> 4
        w_odd = as_int8 >> 4
        k_even = g * GROUP + 2 * offs_h
        x_even = tl.load(x_row + k_even * stride_xk, mask=k_even < K, other=0.0).to(tl.float32)
        x_odd = tl.load(x_row + (k_even + 1) * stride_xk, mask=k_even + 1 < K, other=0.0).to(tl.float32)
        w_scale = tl.load(s_ptr + g * stride_sg + offs_n * stride_sn, mask=mask_n, other=0.0).to(tl.float32)
        if BITS == 16:
            prod = x_even[:, None] * w_even.to(tl.float32) + x_odd[:, None] * w_odd.to(tl.float32)
            part = tl.sum(prod, axis=0)
        else:
            if GROUP_SCALES:  # the group's range covers both halves
                scale, zero = _group_range(
                    tl.minimum(tl.min(x_even, axis=0), tl.min(x_odd, axis=0)),
                    tl.maximum(tl.max(x_even, axis=0), tl.max(x_odd, axis=0)),
                    tl.full([1], (1 << BITS) - 1, tl.float32),
                )
            d_even = (_codes(x_even, scale, zero, BITS) - zero).to(tl.int32)
            d_odd = (_codes(x_odd, scale, zero, BITS) - zero).to(tl.int32)
            prod = d_even[:, None] * w_even.to(tl.int32) + d_odd[:, None] * w_odd.to(tl.int32)
            part = tl.sum(prod, axis=0).to(tl.float32)
        if GROUP_SCALES:
            acc += part * w_scale * scale
        else:
            acc += part * w_scale

    if BITS < 16 and not GROUP_SCALES:
        acc = acc * scale
    out_ptrs = out_ptr + row * stride_om + offs_n * stride_on
    if SPLIT_K == 1:
        tl.store(out_ptrs, acc, mask=mask_n)
    else:
        tl.atomic_add(out_ptrs, acc, mask=mask_n)


@triton.jit
def _bf16_bits(v):
    """fp32 -> bf16 bit pattern (int16), round-half-to-even, by integer operations.

    The interpreter truncates fp32 -> bf16 casts; this rounds the same way everywhere
    (finite inputs only, which products of INT4 values and fp16 scales are).
    """
    b = v.to(tl.uint32, bitcast=True)
    b = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
    return b.to(tl.uint16).to(tl.int16, bitcast=True)


@triton.jit
def _dequantize_kernel(
    w_ptr,
    s_ptr,
    out_ptr,
    N,
    stride_wk,
    stride_sg,
    stride_ok,
    GROUP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BF16_BITS: tl.constexpr,
):
    """One weight group of BLOCK_N columns: W[k, n] = q[k, n] * s[g, n] in fp32, rounded
    once to out's dtype (with BF16_BITS, out is int16 holding bf16 bit patterns)."""
    g = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_h = tl.arange(0, GROUP // 2)
    mask = (offs_n < N)[None, :]
    packed = tl.load(w_ptr + (g * (GROUP // 2) + offs_h)[:, None] * stride_wk + offs_n[None, :], mask=mask)
    as_int8 = packed.to(tl.int8, bitcast=True)
    w_scale = tl.load(s_ptr + g * stride_sg + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    even = ((as_int8 << 4) >> 4).to(tl.float32) * w_scale
    odd = (as_int8 >> 4).to(tl.float32) * w_scale
    rows = out_ptr + (g * GROUP + 2 * offs_h)[:, None] * stride_ok + offs_n[None, :]
    if BF16_BITS:
        even, odd = _bf16_bits(even), _bf16_bits(odd)
    else:
        even, odd = even.to(out_ptr.dtype.element_ty), odd.to(out_ptr.dtype.element_ty)
    tl.store(rows, even, mask=mask)
    tl.store(rows + stride_ok, odd, mask=mask)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass(frozen=True)
class LaunchConfig:
    """How one ``w4a_gemm`` call does its work: any values valid for ``tl.dot`` run.

    ``split_k > 1`` spreads the K groups over programs that combine partial sums with
    fp32 atomics (output zero-initialised), for small M where M x N tiles are too few.
    ``unpack``: how a program turns packed bytes into K rows (0: interleave the nibbles
    in registers; 1: two half-group dots on the even and odd rows, x read at stride 2;
    2: each byte row loaded twice, one nibble selected per row). ``dequant_matmul`` (16
    bits only): dequantize the weight to x's dtype in one pass and hand the GEMM to
    torch (cuBLAS), for the prefill's large M; the tiling fields are then unused.
    ``gemv``: one program per row and BLOCK_N columns, no tensor cores (decode, M = 1);
    ``block_m`` and ``unpack`` are unused.
    """

    block_m: int
    block_n: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    unpack: int = 0
    dequant_matmul: bool = False
    gemv: bool = False


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def launch_config(m: int, n: int, num_groups: int, device: torch.device, bits: int = 16) -> LaunchConfig:
    """The default for one token, the decode (M <= 16) or the prefill shape at ``bits``.

    Measured on an H200 (BENCHMARKS.md, ``bench/gpu_suite.py``'s sweep): at M = 1 a GEMV
    configuration is the fastest in 4 of 6 layer/bit cases and within 7 % in a fifth (the
    exception, down_proj (K = 11008) at 16 bits, ran 2x faster as a 16x64 dot with split
    16 and the even/odd unpack); at M = 280 and 16 bits, dequantize + cuBLAS ran 0.96-2.0x
    as fast as the best fused configuration. The sweep is noisy, so these stay as measured
    until a re-run confirms the candidates it lists.
    """
    if m == 1:
        # One token: the GEMV kernel, >= 4 programs per SM through split-K.
        n_tiles = triton.cdiv(n, 128)
        return LaunchConfig(
            1, 128, max(1, min(num_groups, triton.cdiv(4 * _sm_count(device), n_tiles))), gemv=True
        )
    if m <= DECODE_MAX_M:
        block_n = 64
        n_tiles = triton.cdiv(n, block_n)
        return LaunchConfig(16, block_n, max(1, min(num_groups, triton.cdiv(2 * _sm_count(device), n_tiles))))
    # Prefill at 16 bits: one dequantizing pass (2.5 B/param more traffic) lets cuBLAS
    # do the GEMM; below 16 bits the fused int8 kernel (17-31 TOP/s on an H200).
    return LaunchConfig(64, 64, dequant_matmul=bits == 16)


def dequantize_int4(
    qweight: torch.Tensor, scales: torch.Tensor, group_size: int, dtype: torch.dtype
) -> torch.Tensor:
    """``K_pad x N`` weight in ``dtype``: q * s computed in fp32 and rounded once.

    Bit-identical to ``dequantize_int4_reference``.
    """
    k_pad, n = 2 * qweight.shape[0], qweight.shape[1]
    if qweight.stride(1) != 1 or scales.stride(1) != 1:
        raise ValueError("qweight and scales must be contiguous along N")
    out = torch.empty((k_pad, n), device=qweight.device, dtype=dtype)
    bf16_bits = dtype == torch.bfloat16  # rounded by integer operations (see _bf16_bits)
    block_n = 128
    grid = (k_pad // group_size, triton.cdiv(n, block_n))
    _dequantize_kernel[grid](
        qweight,
        scales,
        out.view(torch.int16) if bf16_bits else out,
        n,
        qweight.stride(0),
        scales.stride(0),
        out.stride(0),
        GROUP=group_size,
        BLOCK_N=block_n,
        BF16_BITS=bf16_bits,
    )
    return out


def dequantize_int4_reference(
    qweight: torch.Tensor, scales: torch.Tensor, group_size: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """PyTorch reference of ``dequantize_int4``: ``K_pad x N``, q * s in fp32, then ``dtype``."""
    q = unpack_int4(qweight).float()
    groups = q.shape[0] // group_size
    return (q.view(groups, group_size, -1) * scales.float()[:, None, :]).view(q.shape).to(dtype)


def w4a_gemm(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    bits: int,
    group_size: int,
    config: LaunchConfig | None = None,
    activation_scales: str = "token",
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
        activation_scales: "token" (one Eq. 2 range per row) or "group" (per row and
            weight group); the same at 16 bits.
    """
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    check_activation_scales(activation_scales)
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

    cfg = config or launch_config(m, n, k_pad // group_size, x.device, bits)
    if cfg.dequant_matmul:
        if bits != 16:
            raise ValueError(f"dequant_matmul serves 16-bit activations only, not {bits}")
        return torch.matmul(x, dequantize_int4(qweight, scales, group_size, x.dtype)[:k]).float()
    if cfg.unpack == 1 and bits < 16 and group_size < 64:
        raise ValueError(
            "unpack=1 splits a group in two int8 dots: NVIDIA needs K >= 32, so group_size >= 64"
        )
    split = min(cfg.split_k, k_pad // group_size)
    out = (torch.zeros if split > 1 else torch.empty)((m, n), device=x.device, dtype=torch.float32)
    operands = (
        x,
        qweight,
        scales,
        out,
        m,
        n,
        k,
        *x.stride(),
        *qweight.stride(),
        *scales.stride(),
        *out.stride(),
    )
    shared = {
        "BITS": bits,
        "GROUP": group_size,
        "BLOCK_N": cfg.block_n,
        "SPLIT_K": split,
        "GROUP_SCALES": activation_scales == "group" and bits < 16,
        "num_warps": cfg.num_warps,
        "num_stages": cfg.num_stages,
    }
    if cfg.gemv:
        _w4a_gemv_kernel[(triton.cdiv(n, cfg.block_n), split, m)](*operands, **shared)
    else:
        grid = (triton.cdiv(m, cfg.block_m), triton.cdiv(n, cfg.block_n), split)
        _w4a_gemm_kernel[grid](
            *operands,
            BLOCK_M=cfg.block_m,
            UNPACK=cfg.unpack,
            DOT_FP32=_interpreting() or x.dtype == torch.float32,
            **shared,
        )
    return out


def w4a_gemm_reference(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    bits: int,
    group_size: int,
    activation_scales: str = "token",
) -> torch.Tensor:
    """PyTorch reference of ``w4a_gemm`` with the same integer semantics (fp32 out).

    The group accumulators are computed as fp32 matmuls of integer-valued tensors:
    every product is <= 128 * 8 and every partial sum <= 2^17 < 2^24, so they are exact
    integers in any summation order -- the same values as the kernel's int32 dot.
    ``activation_scales="group"``: one Eq. 2 range per token and weight group
    (``int4.quantize_activations`` with ``group_size``), so the zero point and the
    activation scale are per (m, g) and the latter multiplies each group's term:
    out[m, n] = sum_g s_a[m, g] * s_w[g, n] * acc_g[m, n].
    """
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    check_activation_scales(activation_scales)
    m, k = x.shape
    w = unpack_int4(qweight).float()
    k_pad, n = w.shape
    groups = k_pad // group_size
    w = w.view(groups, group_size, n)
    x = torch.nn.functional.pad(x.float(), (0, k_pad - k))
    if bits == 16:
        part = torch.einsum("mgk,gkn->mgn", x.view(m, groups, group_size), w)
        return (part * scales.float()[None]).sum(dim=1)
    per_group = activation_scales == "group"
    q, scale, zero = quantize_activations(x, bits, group_size if per_group else None)
    half = float(1 << (bits - 1))
    part = torch.einsum("mgk,gkn->mgn", (q - half).view(m, groups, group_size), w)
    offset = (half - zero).view(m, -1, 1)  # per token: (M, 1, 1); per group: (M, G, 1)
    part = part + offset * w.sum(dim=1)[None]
    if per_group:
        return (part * scales.float()[None] * scale[:, :, None]).sum(dim=1)
    return (part * scales.float()[None]).sum(dim=1) * scale[:, None]
