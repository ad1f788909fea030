"""W4A{2,4,8,16} GEMM on the CPU with torch built-ins: the ``cpu`` and ``cpu_int4`` backends.

``cpu`` (``w4a_gemm_cpu``) runs on the portable layout (``int4.pack_int4`` + fp16 scales)
with the reference's integer semantics, and keeps nothing beside the packed weight (the
unpacked copy lives for one call):

* bits < 16: the activations become the reference's Eq. 2 codes, shifted into int8;
  one ``torch._int_mm`` (oneDNN int8 GEMM, int32 accumulation) per weight group gives
  the exact int32 group accumulator the reference and the Triton kernel compute; then
  the same zero-point correction, group scale and per-token scale.
* bits = 16: the weight dequantized once to the activations' dtype (q * s in fp32,
  rounded once), then one ``torch.matmul``. In fp32 this is the reference's function
  summed in another order; in bf16 the weights and the product are rounded to bf16.

It and the reference unpack the whole weight on every call, which made them 10-50x
slower than a dense bf16 matmul (BENCHMARKS.md). ``cpu_int4`` (``w4a_gemm_int4pack``) runs on a *runtime*
layout instead: torch's CPU int4 GEMM ``_weight_int4pack_mm_for_cpu`` (AVX512 / AVX2
kernels) reads its own packed layout, so the weights are converted to it at load time
(``to_int4pack``; ``dyqvla_ros.quant.to_cpu_runtime``), in place of the portable tensors
(one copy), and converted back exactly for saving (``from_int4pack``): files stay
portable, only memory holds the machine's layout. The op's conventions (torch 2.14,
found by experiment and torch's ``int4mm_kernel.cpp``):

* weight: ``_convert_weight_to_int4pack_for_cpu(codes, innerKTiles)`` with ``codes``
  N x K int32 in [0, 15]; we store q + 8 and the kernel maps a nibble u to u - 8, so it
  sees our signed q exactly. N must be a multiple of 16 (we pad N to 64, one AVX512
  block), K a multiple of the group size. ``innerKTiles`` is ignored on the CPU
  (identical bytes for 1, 2, 4, 8). The result is N x K/2 uint8 in blocks of B columns
  (B = 64 with AVX512, 32 with AVX2): per block and k, B/2 bytes whose low nibbles are
  the block's first B/2 columns and high nibbles the last B/2 (``int4pack_block_n``
  checks this on the running machine).
* ``qScaleAndZeros``: (K/G, N, 2) pairs (scale, zero) in the activations' dtype;
  dequant = (u - 8) * scale + zero, so ours are (s, 0). Groups 32, 64, 128, 256.
* activations bf16, fp16 or fp32, but only bf16 has a vectorized kernel: fp16 / fp32
  ran 30-50x slower at M = 1 (4096 x 4096: 0.43 ms bf16, 13 ms fp32, 21 ms fp16). So
  this backend runs in bf16 whatever the model's dtype, and the pairs are bf16: the
  fp16 scale rounded to bf16 (relative error <= 2^-8). The rounding is undone exactly
  by an int8 ``residual`` per scale (bf16 -> fp32 bits + residual * 2^13 = the fp16
  scale in fp32), which is what keeps the conversion lossless; it costs 1 / G B/param
  (runtime: 0.5 + 5 / G = 0.539 B/param at G = 128, vs 0.516 portable).

The kernel re-dequantizes the weight for every 4 rows of x, so its time grows with M
(4096 x 4096 on a 2-core machine with AMX: 0.5 ms at M = 1, 13 ms at M = 64, ~50 ms at
M = 280, where a dense bf16 matmul (AMX) takes ~6 ms). Where the CPU has AMX tiles, from
``DEQUANT_MIN_ROWS`` rows on (where ``bench/kernels.py --routes`` measured it faster
there: 0.85-0.9x the GEMM's time at M = 128, 1.6-1.7x at M = 64), the weight is instead
dequantized to bf16 ``DEQUANT_CHUNK_COLUMNS`` columns at a time (a transient chunk,
never the whole layer) and multiplied by torch's bf16 matmul: ~25 ms at M = 280, still
~4x a dense bf16 matmul, as the dequantization (several elementwise passes) dominates.
Without AMX the bf16 matmul has no such edge: on a 2-core AVX512-bf16 machine without
AMX that route took 1.3-1.8x the GEMM's time at M = 128 and 280 (4096 x 4096, M = 280:
106 ms vs 79 ms, dense bf16 64 ms), while torch's fp32 matmul (MKL) ran 1.5-1.9x faster
than its bf16 one. So without AMX the dequantizing path multiplies in fp32
(``dequantize_dtype``): tiles of ``FP32_TILE_ROWS`` x ``FP32_TILE_COLUMNS`` weights
(4 MiB of fp32 each) dequantized by one fused loop that inductor compiles from
``_dequantize_tile_fp32`` (eager, ~2x slower, where compiling fails: no C++ compiler),
each multiplied as it is made. Measured there (``bench/kernels.py --routes``, the 7B's
shapes, side by side): 1.04-1.24x faster than dense bf16 at M = 280 where the int4 GEMM
reaches 0.79-0.92x; from ~100 rows faster than the int4 GEMM (M = 128: 34 vs 36 ms at
4096 x 4096, 83 vs 100 ms at 11008 x 4096; M = 64: 22 vs 19 ms), so the same
``DEQUANT_MIN_ROWS`` applies. The compilation happens in the first large-M call of a
process (the 7B's shapes: ~28 s with an empty inductor cache, ~7 s with a warm one).

Precision: float math on the same quantized values, not the integer semantics of the
reference and the Triton kernel. bits < 16: x's Eq. 2 codes minus the zero point
(integers |Q - z| <= 255, exact in bf16) go through the GEMM and the per-token scale
is applied to its fp32 result, so no activation value is rounded; bits = 16: x is
rounded to bf16 (when it is not bf16 already). In both, the weight scales are bf16 and
the GEMM's output is rounded to bf16; the bf16 dequantizing path also rounds q * s to
bf16 (the fp32 one, without AMX, keeps q * s and the GEMM in fp32).
Max relative error against ``w4a_gemm_reference`` (max |out - ref| / max |ref|),
measured on this machine (torch 2.14.1, AVX512) over both paths, fp32 and bf16 inputs,
OpenVLA-7B shapes (4096 -> 4096, 4096 -> 11008, 11008 -> 4096; G = 128; M = 1, 280)
and ragged small ones (G = 32, 64, 128), activations with x25 outlier channels:

    bits   2: 5.5e-3    4: 5.3e-3    8: 5.7e-3    16: 6.9e-3

the same at every bit-width because the bf16 roundings dominate, not the activation
codes (which are exact). With per-group activation scales ([H]) the activations enter
as s * (Q - z) rounded to bf16 (a per-group scale cannot be factored out of the GEMM);
same shapes and data, Hadamard-rotated or not, both paths:

    bits   2: 6.5e-3    4: 8.3e-3    8: 6.3e-3

``INT4PACK_TOLERANCE`` (1.5e-2) is the tests' bound for both, ~2x the worst.
"""

from __future__ import annotations

import functools
import logging

import torch

from dyqvla_ros.kernels.int4 import (
    check_activation_scales,
    fake_quantize_activations,
    pack_int4,
    quantize_activations,
    unpack_int4,
)
from dyqvla_ros.kernels.w4a_gemm import SUPPORTED_BITS, dequantize_int4_reference

N_ALIGN = 64  # runtime layout columns padded to this (a whole AVX512 or AVX2 block)
DEQUANT_MIN_ROWS = 128  # from here on, dequantize + dense matmul (bench/kernels.py)
DEQUANT_CHUNK_COLUMNS = 512  # columns dequantized at once on the bf16 path
FP32_TILE_ROWS = 1024  # K rows of a tile on the fp32 path (a multiple of every group size)
FP32_TILE_COLUMNS = 1024  # its columns (measured best of 256-1024 x 1024-2048 tiles)
_RESIDUAL_SHIFT = 13  # fp32 mantissa bits below fp16's: the residual's unit
INT4PACK_TOLERANCE = 1.5e-2  # max |out - ref| / max |ref| vs the reference (module doc)

log = logging.getLogger(__name__)


def _has_amx() -> bool:
    """Whether torch can run AMX tiles here (a private probe: a torch without it counts as
    no AMX, which only costs the faster large-M route on such a CPU)."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe and probe())


@functools.cache
def dequantize_dtype() -> torch.dtype:
    """The dtype the dequantizing path multiplies in on this machine: bf16 where torch can
    use AMX tiles (its bf16 matmul is then several times the int4 GEMM's speed), fp32
    elsewhere (faster than bf16 there; module doc)."""
    return torch.bfloat16 if _has_amx() else torch.float32


def cpu_features() -> str:
    """The CPU as the cpu_int4 routes see it, for benchmark headers: "AVX512, AMX"."""
    return f"{torch.backends.cpu.get_cpu_capability()}, {'AMX' if _has_amx() else 'no AMX'}"


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")


def w4a_gemm_cpu(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    bits: int,
    group_size: int,
    activation_scales: str = "token",
) -> torch.Tensor:
    """x (M x K) @ INT4 weight -> fp32 (M x N), activations at ``bits`` with one scale per
    token or per token and weight group (see module doc and ``w4a_gemm_reference``)."""
    _check_bits(bits)
    per_group = check_activation_scales(activation_scales) == "group"
    m, k = x.shape
    if bits == 16:
        dtype = x.dtype if x.dtype in (torch.float32, torch.bfloat16) else torch.float32
        dense = dequantize_int4_reference(qweight, scales, group_size, dtype)
        return torch.matmul(x.to(dtype), dense[:k]).float()
    w = unpack_int4(qweight)  # K_pad x N int8, this call only
    k_pad, n = w.shape
    groups = k_pad // group_size
    x = torch.nn.functional.pad(x.float(), (0, k_pad - k))
    q, scale, zero = quantize_activations(x, bits, group_size if per_group else None)
    half = 1 << (bits - 1)
    codes = (q - half).to(torch.int8)  # in [-128, 127] for every b <= 8
    offset = (half - zero).to(torch.int32).view(m, -1)  # M x 1 per token, M x groups per group
    scale = scale.view(m, -1)
    w_t = w.t().contiguous()  # N x K_pad: _int_mm's fast operand is a transposed row-major matrix
    colsum = w.view(groups, group_size, n).sum(dim=1, dtype=torch.int32)
    group_scales = scales.float()
    out = torch.zeros(m, n)
    for g in range(groups):
        part = slice(g * group_size, (g + 1) * group_size)
        column = slice(g, g + 1) if per_group else slice(0, 1)
        acc = torch._int_mm(codes[:, part], w_t[:, part].t()) + offset[:, column] * colsum[g]
        term = acc.float() * group_scales[g]
        out.add_(term * scale[:, column] if per_group else term)
    return out if per_group else out * scale


def _signed_nibbles(packed_blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., B/2) int4pack bytes -> the signed q of their low and high nibbles (int8).

    XOR 0x88 turns each stored u = q + 8 into q's two's-complement nibble; the shifts
    sign-extend it, as in ``int4.unpack_int4``.
    """
    signed = (packed_blocks ^ 0x88).view(torch.int8)
    return (signed << 4) >> 4, signed >> 4


def _blocks(packed: torch.Tensor, block_n: int) -> torch.Tensor:
    """N_pad x K_pad/2 int4pack bytes as (N_pad / B, K_pad, B / 2): per block, per k."""
    n_pad, half_k = packed.shape
    return packed.view(n_pad // block_n, 2 * half_k, block_n // 2)


def _block_codes(packed_blocks: torch.Tensor, dtype: torch.dtype = torch.int8) -> torch.Tensor:
    """(blocks, K, B/2) int4pack bytes -> (blocks, K, B) q in ``dtype``, each block's
    columns in order (low nibbles are its first B/2 columns, high nibbles the last B/2).
    Converted before they are joined: inductor's fused fp32 tile loop runs ~13 % faster so."""
    low, high = _signed_nibbles(packed_blocks)
    return torch.cat((low.to(dtype), high.to(dtype)), dim=2)


def _int4pack_codes(packed: torch.Tensor, block_n: int) -> torch.Tensor:
    """N_pad x K_pad int8 q in [-8, 7] held by an int4pack weight (block layout B)."""
    n_pad = packed.shape[0]
    return _block_codes(_blocks(packed, block_n)).transpose(1, 2).reshape(n_pad, -1)


def _pack_codes(q: torch.Tensor) -> torch.Tensor:
    """K x N signed INT4 (any integer dtype) -> this machine's int4pack bytes, N padded."""
    k, n = q.shape
    codes = torch.full((-(-n // N_ALIGN) * N_ALIGN, k), 8, dtype=torch.int32)
    codes[:n] = q.t() + 8
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)  # innerKTiles: unused on CPU


@functools.cache
def int4pack_block_n() -> int | None:
    """The column block B of this machine's int4pack layout (64: AVX512, 32: AVX2), or None
    where torch has no such op or packs in a layout this module does not know.

    Packs a known random matrix and reads it back with each layout we know; the
    dequantizing path and ``from_int4pack`` rely on it, so an unknown layout is refused
    (``to_cpu_runtime`` then keeps the portable layout), never silently wrong weights.
    """
    g = torch.Generator().manual_seed(0)
    q = torch.randint(-8, 8, (64, 2 * N_ALIGN), generator=g, dtype=torch.int8)
    try:
        packed = _pack_codes(q)
    except (AttributeError, RuntimeError):  # no such op in this torch / not on this CPU
        return None
    return next((b for b in (64, 32) if torch.equal(_int4pack_codes(packed, b).t(), q)), None)


def _known_block_n() -> int:
    block_n = int4pack_block_n()
    if block_n is None:
        raise RuntimeError(
            "torch's int4pack CPU layout on this machine is none this module knows "
            "(AVX512 or AVX2 blocks): keep the portable backends (cpu, reference)"
        )
    return block_n


def to_int4pack(
    qweight: torch.Tensor, scales: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Portable (qweight K_pad/2 x N uint8, scales K_pad/G x N fp16) -> the runtime layout.

    Returns ``(packed, scale_zeros, residual)``: packed N_pad x K_pad/2 uint8 (N padded
    to ``N_ALIGN`` with q = 0), scale_zeros K_pad/G x N_pad x 2 bf16 pairs (bf16(s), 0)
    and residual K_pad/G x N_pad int8 with which ``from_int4pack`` restores s exactly.
    Transient memory: the unpacked codes (int32, 4 B/param) of this one layer.
    """
    _known_block_n()  # refuse before converting on a machine whose layout we cannot read
    n = qweight.shape[1]
    packed = _pack_codes(unpack_int4(qweight))
    exact = torch.nn.functional.pad(scales.float(), (0, packed.shape[0] - n), value=1.0)
    high = exact.bfloat16()
    residual = (exact.view(torch.int32) - high.float().view(torch.int32)) >> _RESIDUAL_SHIFT
    scale_zeros = torch.stack((high, torch.zeros_like(high)), dim=-1)
    return packed, scale_zeros, residual.to(torch.int8)  # |residual| <= 4: half a bf16 ulp


def from_int4pack(
    packed: torch.Tensor, scale_zeros: torch.Tensor, residual: torch.Tensor, out_features: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of ``to_int4pack``: the portable (qweight, scales), bit for bit."""
    q = _int4pack_codes(packed, _known_block_n())[:out_features]
    high = scale_zeros[..., 0].float().view(torch.int32)
    exact = (high + (residual.to(torch.int32) << _RESIDUAL_SHIFT)).view(torch.float32)
    return pack_int4(q.t().contiguous()), exact[:, :out_features].half().contiguous()


def _dequantized_matmul(
    a: torch.Tensor, packed: torch.Tensor, scale_zeros: torch.Tensor, group_size: int
) -> torch.Tensor:
    """a (M x K_pad, bf16) @ the int4pack weight, dequantized to bf16 a chunk of columns
    at a time: W^T[k, n] = bf16(q * bf16(s)), then torch's bf16 matmul (AMX where the
    CPU has it). -> M x N_pad bf16."""
    block_n = _known_block_n()
    blocks = _blocks(packed, block_n)
    k_pad = blocks.shape[1]
    scales = scale_zeros[..., 0]  # K_pad/G x N_pad, a strided view
    step = max(1, DEQUANT_CHUNK_COLUMNS // block_n)
    parts = []
    for first in range(0, blocks.shape[0], step):
        chunk = blocks[first : first + step]
        low, high = _signed_nibbles(chunk)
        columns = chunk.shape[0] * block_n
        w = torch.empty(k_pad, chunk.shape[0], 2, block_n // 2, dtype=torch.bfloat16)
        w[:, :, 0] = low.transpose(0, 1)
        w[:, :, 1] = high.transpose(0, 1)
        w = w.view(-1, group_size, columns)
        w.mul_(scales[:, None, first * block_n : first * block_n + columns])
        parts.append(a @ w.view(k_pad, columns))
    return torch.cat(parts, dim=1)


def _dequantize_tile_fp32(blocks: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """(blocks, K_t, B/2) int4pack bytes and their (K_t / G, blocks * B) fp32 scales ->
    W^T tile K_t x blocks * B in fp32, q * s exactly."""
    rows = blocks.shape[1]
    codes = _block_codes(blocks, torch.float32).permute(1, 0, 2).reshape(rows, -1)
    return (codes.view(-1, group_size, codes.shape[1]) * scales[:, None, :]).view(rows, -1)


class _TileDequantizer:
    """``_dequantize_tile_fp32`` compiled by inductor into one fused loop, or eager where
    compiling fails (no C++ compiler, an unsupported torch): the same values either way."""

    def __init__(self) -> None:
        self._compiled = torch.compile(_dequantize_tile_fp32)
        self.fallback_reason: str | None = None

    def __call__(self, blocks: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
        if self.fallback_reason is None:
            try:
                return self._compiled(blocks, scales, group_size)
            except Exception as err:  # inductor's failures share no narrower type
                self.fallback_reason = f"{type(err).__name__}: {err}".splitlines()[0]
                log.warning(
                    "cpu_int4: compiling the fp32 dequantization failed (%s); it runs eagerly, "
                    "about 2x slower",
                    self.fallback_reason,
                )
        return _dequantize_tile_fp32(blocks, scales, group_size)


@functools.cache
def tile_dequantizer() -> _TileDequantizer:
    """The process's one fp32 tile dequantizer (compiled once per tile shape, on first use)."""
    return _TileDequantizer()


def _dequantized_matmul_fp32(
    a: torch.Tensor, packed: torch.Tensor, scale_zeros: torch.Tensor, group_size: int
) -> torch.Tensor:
    """a (M x K_pad) @ the int4pack weight in fp32, ``FP32_TILE_ROWS`` x
    ``FP32_TILE_COLUMNS`` weights at a time (module doc). -> M x N_pad fp32."""
    block_n = _known_block_n()
    blocks = _blocks(packed, block_n)
    k_pad = blocks.shape[1]
    scales = scale_zeros[..., 0].float()  # K_pad/G x N_pad: bf16(s), as the int4 GEMM uses
    a = a.float()
    dequantize = tile_dequantizer()
    step = max(1, FP32_TILE_COLUMNS // block_n)
    parts = []
    for first in range(0, blocks.shape[0], step):
        columns = slice(first * block_n, (first + step) * block_n)
        part = None
        for row in range(0, k_pad, FP32_TILE_ROWS):
            end = min(k_pad, row + FP32_TILE_ROWS)
            tile = dequantize(
                blocks[first : first + step, row:end],
                scales[row // group_size : end // group_size, columns],
                group_size,
            )
            part = a[:, row:end] @ tile if part is None else part.addmm_(a[:, row:end], tile)
        parts.append(part)
    return torch.cat(parts, dim=1)


def w4a_gemm_int4pack(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale_zeros: torch.Tensor,
    bits: int,
    group_size: int,
    dequantize: bool | None = None,
    activation_scales: str = "token",
) -> torch.Tensor:
    """x (M x K) @ a runtime-layout INT4 weight -> fp32 (M x N_pad), activations at ``bits``.

    Args:
        x: activations (any float dtype; computed in bf16, see the module doc).
        packed, scale_zeros: from ``to_int4pack`` (the residual is not needed here).
        dequantize: force (True) or forbid (False) the dequantize + matmul path (in
            ``dequantize_dtype()``: bf16 with AMX, fp32 without); None: from
            ``DEQUANT_MIN_ROWS`` rows on (``bench/kernels.py --routes`` times both).
        activation_scales: "token" or "group" (one Eq. 2 range per token and weight
            group). A per-group scale cannot be factored out of the GEMM, so below 16
            bits the activations are quantized and dequantized, s * (Q - z), and that
            rounded to bf16 enters the GEMM (module doc: same tolerance).
    """
    _check_bits(bits)
    per_group = check_activation_scales(activation_scales) == "group"
    m, k = x.shape
    k_pad = 2 * packed.shape[1]
    if k_pad % group_size or not (k_pad - group_size < k <= k_pad):
        raise ValueError(f"x has K={k}, the weight holds {k_pad} rows (group {group_size})")
    if scale_zeros.dtype != torch.bfloat16:  # e.g. model.to(dtype) after the conversion
        raise ValueError(f"scale_zeros must stay bf16 (the kernel's dtype), got {scale_zeros.dtype}")
    x = torch.nn.functional.pad(x, (0, k_pad - k))
    if bits < 16 and per_group:
        a = fake_quantize_activations(x, bits, group_size).bfloat16()
    elif bits < 16:
        q, scale, zero = quantize_activations(x, bits)
        a = (q - zero[:, None]).bfloat16()  # integers in [-255, 255]: exact in bf16
    else:
        a = x.bfloat16()
    if dequantize is None:
        dequantize = m >= DEQUANT_MIN_ROWS
    if dequantize and dequantize_dtype() == torch.float32:
        out = _dequantized_matmul_fp32(a, packed, scale_zeros, group_size)
    elif dequantize:
        out = _dequantized_matmul(a, packed, scale_zeros, group_size).float()
    else:
        gemm = torch.ops.aten._weight_int4pack_mm_for_cpu
        out = gemm(a.contiguous(), packed, group_size, scale_zeros).float()
    return out * scale[:, None] if bits < 16 and not per_group else out
