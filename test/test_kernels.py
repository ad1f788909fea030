"""Triton kernels vs their PyTorch references, under TRITON_INTERPRET=1 on the CPU; the
cpu_int4 runtime layout and GEMM (``w4a_cpu``) vs the portable format and the reference."""

from __future__ import annotations

import pytest
import torch

from dyqvla_ros.kernels import w4a_cpu
from dyqvla_ros.kernels.int4 import pack_int4, quantize_activations, unpack_int4
from dyqvla_ros.kernels.w4a_cpu import (
    INT4PACK_TOLERANCE,
    from_int4pack,
    to_int4pack,
    w4a_gemm_int4pack,
)
from dyqvla_ros.kernels.w4a_gemm import (
    LaunchConfig,
    dequantize_int4,
    dequantize_int4_reference,
    w4a_gemm,
    w4a_gemm_reference,
)

BITS = (2, 4, 8, 16)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float) -> None:
    """torch.testing.assert_close, printing the first mismatching positions."""
    bad = ~torch.isclose(actual, expected, rtol=rtol, atol=atol)
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        detail = ", ".join(
            f"{tuple(i)}: {actual[tuple(i)].item()} vs {expected[tuple(i)].item()}" for i in idx
        )
        pytest.fail(f"{int(bad.sum())} of {bad.numel()} elements differ; first: {detail}")


def random_weights(k: int, n: int, group: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    k_pad = -(-k // group) * group
    q = torch.randint(-8, 8, (k_pad, n), generator=g, dtype=torch.int8)
    q[k:] = 0
    scales = (torch.rand(k_pad // group, n, generator=g) * 0.05 + 0.001).half()
    return pack_int4(q), scales


def activations(m: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    x[:, :: max(1, k // 5)] *= 25.0  # outlier channels, as in LLM activations
    return x


def test_pack_unpack_round_trip_and_layout():
    q = torch.arange(-8, 8, dtype=torch.int8).repeat(2).view(16, 2)
    packed = pack_int4(q)
    assert packed.shape == (8, 2) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed), q)
    # byte [i, n] = q[2i] in the low nibble, q[2i+1] in the high nibble
    assert packed[0, 0].item() == ((q[0, 0].item() & 0xF) | ((q[1, 0].item() & 0xF) << 4)) == 0xA8
    with pytest.raises(ValueError, match="K must be even"):
        pack_int4(q[:3])
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        pack_int4(q * 2)


def test_activation_quantizer_semantics():
    x = torch.tensor([[-1.0, 0.0, 0.5, 2.0], [0.0, 0.0, 0.0, 0.0], [1.0, 2.0, 3.0, 4.0]])
    q, scale, zero = quantize_activations(x, 2)
    assert torch.equal(scale, torch.tensor([1.0, 1.0, 4.0 / 3.0]))  # (max - min) / 3, 0 in range
    assert torch.equal(zero, torch.tensor([1.0, 0.0, 0.0]))
    # row 0: x / s = -1, 0, 0.5 -> 0 (half to even), 2 ; + z = 1, clamp to [0, 3]
    assert q[0].tolist() == [0.0, 1.0, 1.0, 3.0]
    assert q[1].tolist() == [0.0, 0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="activation bits"):
        quantize_activations(x, 3)


SHAPES = [
    # (M, N, K, group) including ragged M, N and K (K padded to the group size)
    (1, 64, 128, 128),
    (3, 45, 100, 32),
    (6, 42, 123, 64),
    (17, 70, 256, 64),
    (33, 20, 96, 32),
]


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("m, n, k, group", SHAPES)
def test_w4a_gemm_matches_reference(m, n, k, group, bits):
    qweight, scales = random_weights(k, n, group, seed=m * 1000 + n)
    x = activations(m, k, seed=k)
    out = w4a_gemm(x, qweight, scales, bits, group)
    ref = w4a_gemm_reference(x, qweight, scales, bits, group)
    # Group accumulators are exact integers; only the fp32 sum over groups is reordered.
    assert_close(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize(
    "config",
    [LaunchConfig(16, 64, unpack=u) for u in (0, 1, 2)] + [LaunchConfig(1, 64, gemv=True)],
    ids=["interleave", "even-odd", "load-twice", "gemv"],
)
@pytest.mark.parametrize("bits", BITS[:3])
def test_integer_accumulators_are_bit_exact(bits, config):
    """One group, no split: no fp32 reordering left, so any integer difference shows.

    Every way of unpacking the nibbles (``LaunchConfig.unpack``) and the tensor-core-free
    GEMV give the same integers.
    """
    qweight, scales = random_weights(128, 96, 128, seed=1)
    x = activations(5, 128, seed=2)
    out = w4a_gemm(x, qweight, scales, bits, 128, config=config)
    assert torch.equal(out, w4a_gemm_reference(x, qweight, scales, bits, 128))


@pytest.mark.parametrize("split_k", [1, 2, 3])
def test_split_k_decode_variant(split_k):
    qweight, scales = random_weights(192, 64, 32, seed=3)
    x = activations(2, 192, seed=4)
    ref = w4a_gemm_reference(x, qweight, scales, 8, 32)
    out = w4a_gemm(x, qweight, scales, 8, 32, config=LaunchConfig(16, 64, split_k=split_k))
    assert_close(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize(
    "config", [LaunchConfig(32, 32, split_k=2, num_warps=2), LaunchConfig(16, 128, 1, 8, 2)]
)
def test_any_launch_config_computes_the_same_function(config):
    """bench/kernels.py --sweep times other tilings: each must stay the same GEMM."""
    qweight, scales = random_weights(200, 150, 64, seed=5)
    x = activations(37, 200, seed=6)
    for bits in (16, 4):
        ref = w4a_gemm_reference(x, qweight, scales, bits, 64)
        out = w4a_gemm(x, qweight, scales, bits, 64, config=config)
        assert_close(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_bf16_activations_16_bit_path():
    qweight, scales = random_weights(128, 64, 64, seed=5)
    x = activations(4, 128, seed=6).bfloat16()
    ref = w4a_gemm_reference(x, qweight, scales, 16, 64)
    assert_close(w4a_gemm(x, qweight, scales, 16, 64), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_wrapper_rejects_bad_shapes():
    qweight, scales = random_weights(128, 64, 64, seed=7)
    with pytest.raises(ValueError, match="bits"):
        w4a_gemm(torch.randn(2, 128), qweight, scales, 3, 64)
    with pytest.raises(ValueError, match="K=64"):
        w4a_gemm(torch.randn(2, 64), qweight, scales, 8, 64)
    with pytest.raises(ValueError, match="scales must be"):
        w4a_gemm(torch.randn(2, 128), qweight, scales[:1], 8, 64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dequantize_kernel_is_bit_identical_to_the_reference(dtype):
    qweight, scales = random_weights(256, 200, 64, seed=7)
    ours = dequantize_int4(qweight, scales, 64, dtype)
    assert ours.dtype == dtype and ours.shape == (256, 200)
    assert torch.equal(ours, dequantize_int4_reference(qweight, scales, 64, dtype))


def test_dequant_matmul_variant_serves_16_bits_only():
    """The prefill's 16-bit variant: dequantize once, torch matmul; same function."""
    qweight, scales = random_weights(200, 150, 64, seed=8)
    x = activations(40, 200, seed=9)
    variant = LaunchConfig(64, 64, dequant_matmul=True)
    ref = w4a_gemm_reference(x, qweight, scales, 16, 64)
    assert_close(
        w4a_gemm(x, qweight, scales, 16, 64, config=variant),
        ref,
        rtol=1e-5,
        atol=1e-5 * ref.abs().max().item(),
    )
    out = w4a_gemm(x.bfloat16(), qweight, scales, 16, 64, config=variant)
    assert ((out - ref).abs().max() / ref.abs().max()).item() < 1e-2  # bf16 weights and operands
    with pytest.raises(ValueError, match="16-bit activations only"):
        w4a_gemm(x, qweight, scales, 8, 64, config=variant)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none here)")
@pytest.mark.parametrize("bits", BITS[:3])
def test_activation_quantizer_is_the_same_on_cuda_and_cpu(bits):
    """The reference's integers must not depend on the device (the kernel's are IEEE)."""
    x = activations(300, 4096, seed=10).bfloat16().float()
    for cpu, gpu in zip(quantize_activations(x, bits), quantize_activations(x.cuda(), bits), strict=True):
        assert torch.equal(cpu, gpu.cpu())


# cpu_int4: N not a multiple of 16 / 64 and K not of the group exercise the padding.
INT4PACK_SHAPES = [*SHAPES, (130, 200, 300, 128)]


@pytest.mark.parametrize("k, n, group", [(128, 64, 128), (100, 45, 32), (300, 200, 64), (256, 4304, 128)])
def test_int4pack_conversion_is_lossless(k, n, group):
    """Portable -> runtime -> portable gives back both tensors bit for bit (so does their
    dequantization); and every scale the kernel reads is bf16(s), within 2^-8 of s (half a bf16 ulp)."""
    qweight, scales = random_weights(k, n, group, seed=k + n)
    scales[0, :3] = torch.tensor([6.1e-5, 1.0, 0.0999])  # subnormal-edge, exact, 3 low bits set
    packed, scale_zeros, residual = to_int4pack(qweight, scales)
    n_pad = -(-n // 64) * 64
    assert packed.shape == (n_pad, qweight.shape[0]) and packed.dtype == torch.uint8
    assert scale_zeros.shape == (*scales.shape[:1], n_pad, 2) and scale_zeros.dtype == torch.bfloat16
    assert residual.dtype == torch.int8 and residual.abs().max() <= 4
    back_q, back_s = from_int4pack(packed, scale_zeros, residual, n)
    assert back_q.dtype == torch.uint8 and back_s.dtype == torch.float16
    assert torch.equal(back_q, qweight) and torch.equal(back_s, scales)
    assert back_q.is_contiguous() and back_s.is_contiguous()  # as saved files need them
    assert torch.equal(
        dequantize_int4_reference(back_q, back_s, group), dequantize_int4_reference(qweight, scales, group)
    )
    assert not scale_zeros[..., 1].any()  # symmetric: every zero point is 0
    bf16_error = (scale_zeros[:, :n, 0].float() - scales.float()).abs() / scales.float()
    assert bf16_error.max() <= 2**-8


@pytest.fixture
def fresh_route_probe():
    """``dequantize_dtype`` caches its CPU probe: clear it around a test that fakes one."""
    w4a_cpu.dequantize_dtype.cache_clear()
    yield
    w4a_cpu.dequantize_dtype.cache_clear()


INT4PACK_ROUTES = ["int4-mm", "dequantize-bf16", "dequantize-fp32"]


def use_route(monkeypatch: pytest.MonkeyPatch, route: str) -> bool:
    """Make ``w4a_gemm_int4pack`` take ``route`` on any CPU (the dequantizing dtype is the
    AMX probe's); returns its ``dequantize`` argument."""
    amx = route == "dequantize-bf16"
    monkeypatch.setattr(w4a_cpu, "dequantize_dtype", lambda: torch.bfloat16 if amx else torch.float32)
    return route != "int4-mm"


@pytest.mark.parametrize("route", INT4PACK_ROUTES)
@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4pack_gemm_reads_the_portable_codes(monkeypatch, group, route):
    """x = I reads the weight each path multiplies: exactly q * bf16(s) of the portable codes,
    rounded to bf16 except on the fp32 path (the kernel's u - 8 convention, the layout, the
    tiles and the zero points are all right)."""
    k, n = 2 * group, 80
    qweight, scales = random_weights(k, n, group, seed=group)
    packed, scale_zeros, _ = to_int4pack(qweight, scales)
    dequantize = use_route(monkeypatch, route)
    seen = w4a_gemm_int4pack(torch.eye(k), packed, scale_zeros, 16, group, dequantize)[:, :n]
    dtype = torch.float32 if route == "dequantize-fp32" else torch.bfloat16
    expected = dequantize_int4_reference(qweight, scales.bfloat16().float(), group, dtype)
    assert torch.equal(seen, expected.float())


def test_fp32_path_tiles_a_large_weight(monkeypatch):
    """More rows and columns than one tile, ragged in both: every tile lands in place."""
    monkeypatch.setattr(w4a_cpu, "FP32_TILE_ROWS", 128)
    monkeypatch.setattr(w4a_cpu, "FP32_TILE_COLUMNS", 128)
    k, n, group = 320, 300, 64
    qweight, scales = random_weights(k, n, group, seed=11)
    packed, scale_zeros, _ = to_int4pack(qweight, scales)
    dequantize = use_route(monkeypatch, "dequantize-fp32")
    seen = w4a_gemm_int4pack(torch.eye(k), packed, scale_zeros, 16, group, dequantize)[:, :n]
    assert torch.equal(seen, dequantize_int4_reference(qweight, scales.bfloat16().float(), group))


def test_compiled_tile_dequantization_equals_eager(caplog):
    """Inductor's fused loop gives the eager function's values bit for bit; where compiling
    fails, the eager function runs, with a warning saying why."""
    qweight, scales = random_weights(256, 128, 64, seed=5)
    packed, scale_zeros, _ = to_int4pack(qweight, scales)
    blocks = w4a_cpu._blocks(packed, w4a_cpu._known_block_n())
    tile_scales = scale_zeros[..., 0].float()
    eager = w4a_cpu._dequantize_tile_fp32(blocks, tile_scales, 64)
    assert torch.equal(w4a_cpu.tile_dequantizer()(blocks, tile_scales, 64), eager)
    assert w4a_cpu.tile_dequantizer().fallback_reason is None
    broken = w4a_cpu._TileDequantizer()
    broken._compiled = lambda *_: (_ for _ in ()).throw(RuntimeError("no C++ compiler\nmore"))
    with caplog.at_level("WARNING"):
        assert torch.equal(broken(blocks, tile_scales, 64), eager)
    assert broken.fallback_reason == "RuntimeError: no C++ compiler"
    assert "compiling the fp32 dequantization failed" in caplog.text


@pytest.mark.parametrize("route", INT4PACK_ROUTES)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("m, n, k, group", INT4PACK_SHAPES)
def test_int4pack_gemm_within_tolerance_of_reference(monkeypatch, m, n, k, group, bits, route):
    """Float math on the same quantized values: within INT4PACK_TOLERANCE (measured <= 6.9e-3,
    kernels/w4a_cpu.py) of the reference, fp32 and bf16 activations, every path."""
    dequantize = use_route(monkeypatch, route)
    qweight, scales = random_weights(k, n, group, seed=m * 1000 + n)
    packed, scale_zeros, _ = to_int4pack(qweight, scales)
    for x in (activations(m, k, seed=k), activations(m, k, seed=k).bfloat16()):
        ref = w4a_gemm_reference(x, qweight, scales, bits, group)
        out = w4a_gemm_int4pack(x, packed, scale_zeros, bits, group, dequantize)
        assert out.shape == (m, packed.shape[0]) and out.dtype == torch.float32
        error = ((out[:, :n] - ref).abs().max() / ref.abs().max()).item()
        assert error < INT4PACK_TOLERANCE, f"{x.dtype}: relative error {error:.2e}"


@pytest.mark.parametrize("amx", [True, False], ids=["amx", "no-amx"])
def test_int4pack_gemm_dequantizes_from_the_threshold_in_the_cpus_fast_dtype(
    monkeypatch, fresh_route_probe, amx
):
    """From DEQUANT_MIN_ROWS rows on the weight is dequantized for a dense matmul: in bf16
    where torch's bf16 matmul runs on AMX, in fp32 elsewhere (bf16 measured 1.3-1.8x slower
    than the int4 GEMM there, fp32 faster: kernels/w4a_cpu.py)."""
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    routes = []
    for name in ("_dequantized_matmul", "_dequantized_matmul_fp32"):
        real = getattr(w4a_cpu, name)
        monkeypatch.setattr(
            w4a_cpu, name, lambda *a, n=name, f=real: routes.append((n, a[0].shape[0])) or f(*a)
        )
    qweight, scales = random_weights(128, 64, 64, seed=3)
    packed, scale_zeros, _ = to_int4pack(qweight, scales)
    rows = w4a_cpu.DEQUANT_MIN_ROWS
    for m in (1, rows - 1, rows, rows + 152):
        w4a_gemm_int4pack(torch.randn(m, 128), packed, scale_zeros, 16, 64)
    name = "_dequantized_matmul" if amx else "_dequantized_matmul_fp32"
    assert routes == [(name, rows), (name, rows + 152)]


def test_a_torch_without_the_amx_probe_counts_as_no_amx(monkeypatch, fresh_route_probe):
    """The probe is private torch API: where it is gone, the fp32 path serves large M."""
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    assert w4a_cpu.dequantize_dtype() == torch.float32
    assert w4a_cpu.cpu_features().endswith(", no AMX")


def test_int4pack_gemm_rejects_bad_operands():
    qweight, scales = random_weights(128, 64, 64, seed=7)
    packed, scale_zeros, _ = to_int4pack(qweight, scales)
    with pytest.raises(ValueError, match="bits"):
        w4a_gemm_int4pack(torch.randn(2, 128), packed, scale_zeros, 3, 64)
    with pytest.raises(ValueError, match="K=64"):
        w4a_gemm_int4pack(torch.randn(2, 64), packed, scale_zeros, 8, 64)
    with pytest.raises(ValueError, match="must stay bf16"):
        w4a_gemm_int4pack(torch.randn(2, 128), packed, scale_zeros.float(), 16, 64)


# activation_scales="group": one Eq. 2 range per token and weight group.
GROUP_SCALE_SHAPES = [
    # (M, N, K, group): GEMV (M = 1), decode with split-K (M <= 16), prefill (M > 16);
    # ragged M, N and K, K not a multiple of the group
    (1, 64, 250, 128),
    (1, 45, 100, 32),
    (3, 45, 100, 32),
    (6, 42, 123, 64),
    (17, 70, 256, 64),
    (33, 20, 300, 128),
]


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("m, n, k, group", GROUP_SCALE_SHAPES)
def test_w4a_gemm_group_scales_match_reference(m, n, k, group, bits):
    """Each launch shape's default configuration, per-group activation ranges."""
    qweight, scales = random_weights(k, n, group, seed=m * 1000 + n)
    x = activations(m, k, seed=k)
    out = w4a_gemm(x, qweight, scales, bits, group, activation_scales="group")
    ref = w4a_gemm_reference(x, qweight, scales, bits, group, activation_scales="group")
    assert_close(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize(
    "config",
    [LaunchConfig(16, 64, split_k=2, unpack=u) for u in (0, 1, 2)] + [LaunchConfig(1, 32, 3, gemv=True)],
    ids=["interleave", "even-odd", "load-twice", "gemv"],
)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("m, n, k, group", [(5, 70, 300, 64), (20, 40, 250, 128)])
def test_group_scales_every_unpack_variant(m, n, k, group, bits, config):
    """Every unpacking of the nibbles and the GEMV, split-K; outliers on odd channels too,
    so the even/odd variant's group range must cover both halves."""
    qweight, scales = random_weights(k, n, group, seed=k + n)
    x = activations(m, k, seed=m)
    x[:, 1::34] *= 30.0  # odd channels
    x[:, :group] = x[:, :group].abs() + 0.5  # a group above 0 and one below: their ranges
    x[:, group : 2 * group] = -x[:, group : 2 * group].abs() - 0.5  # must still contain 0
    out = w4a_gemm(x, qweight, scales, bits, group, config=config, activation_scales="group")
    ref = w4a_gemm_reference(x, qweight, scales, bits, group, activation_scales="group")
    assert_close(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize("m", [1, 4, 40], ids=["gemv", "decode", "prefill"])
@pytest.mark.parametrize("bits", BITS[:3])
def test_group_scales_differ_from_token_scales_on_outliers(bits, m):
    """Outlier channels set one token's range; per-group ranges keep the other groups
    fine: the result is another function, and closer to the unquantized product."""
    qweight, scales = random_weights(256, 64, 64, seed=11)
    x = torch.randn(m, 256, generator=torch.Generator().manual_seed(12))
    x[:, :64:8] *= 25.0  # outlier channels in group 0 only: they set the token's range
    exact = x @ dequantize_int4_reference(qweight, scales, 64)
    token = w4a_gemm(x, qweight, scales, bits, 64)
    group = w4a_gemm(x, qweight, scales, bits, 64, activation_scales="group")
    assert (group - token).abs().max().item() > 1e-3 * exact.abs().max().item()
    assert torch.linalg.norm(group - exact) < torch.linalg.norm(token - exact)


def test_wrapper_rejects_unknown_activation_scales():
    qweight, scales = random_weights(128, 64, 64, seed=7)
    with pytest.raises(ValueError, match="activation_scales"):
        w4a_gemm(torch.randn(2, 128), qweight, scales, 8, 64, activation_scales="channel")
