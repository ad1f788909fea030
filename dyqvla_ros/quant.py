"""W4 weights, A2/A4/A8/A16 activations switched per step (paper §IV-A1, §V-A).

Weights are quantized once (symmetric round-to-nearest INT4, one fp16 scale per group of
``group_size`` input features and output feature) and stay packed; the activation
bit-width is a property of the *model*, read by every ``QuantLinear`` at each forward,
so switching it re-quantizes, re-allocates and copies nothing::

    model = quantize_model(model, group_size=128)     # in place: nn.Linear -> QuantLinear
    with activation_bits(model, 4):
        y = model(x)

Weight layout (see ``dyqvla_ros.kernels.int4.pack_int4``): ``qweight`` is
``(K_pad // 2) x N`` uint8, two INT4 values per byte along K (K = in_features, padded
with zero rows to a multiple of the group size); ``scales`` is ``(K_pad // G) x N``
fp16. Memory: 0.5 + 2 / G bytes per weight (0.516 at G = 128).

Backends: ``triton`` (CUDA, or the CPU under TRITON_INTERPRET=1), ``cpu`` (torch
built-ins: per-group ``torch._int_mm`` for the integer paths, dequantize + ``matmul``
at 16 bits; ``dyqvla_ros.kernels.w4a_cpu``) and ``reference`` (plain PyTorch, the
integer semantics every backend reproduces). ``auto`` picks triton on CUDA; on the CPU
it picks ``cpu`` where it was measured to help -- more than 16 rows through a layer of
at least 2^20 weights (OpenVLA-7B shapes, M = 280: 2.1-3.4x faster; BENCHMARKS.md) --
and the reference otherwise (at M <= 16 both unpack the whole weight per call and the
reference was 1.3-2.3x faster; at the tiny model's shapes they tie).
"""

from __future__ import annotations

import enum
import fnmatch
import json
import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from dyqvla_ros.kernels.int4 import INT4_MAX, INT4_MIN, pack_int4
from dyqvla_ros.kernels.w4a_cpu import w4a_gemm_cpu
from dyqvla_ros.kernels.w4a_gemm import (
    SUPPORTED_BITS,
    dequantize_int4_reference,
    w4a_gemm,
    w4a_gemm_reference,
)

log = logging.getLogger(__name__)

GROUP_SIZES = (32, 64, 128)
FORMAT_NAME = "dyqvla-w4"
FORMAT_VERSION = 1


class Backend(enum.StrEnum):
    AUTO = "auto"
    TRITON = "triton"
    CPU = "cpu"
    REFERENCE = "reference"


_GEMMS = {Backend.TRITON: w4a_gemm, Backend.CPU: w4a_gemm_cpu, Backend.REFERENCE: w4a_gemm_reference}
CPU_FAST_MIN_ROWS = 17  # rows (tokens) from which auto uses the cpu backend ...
CPU_FAST_MIN_WEIGHTS = 1 << 20  # ... for layers of at least this many weights


def _check_bits(bits: int) -> int:
    if isinstance(bits, bool) or bits not in SUPPORTED_BITS:
        raise ValueError(f"activation bits must be one of {SUPPORTED_BITS}, got {bits!r}")
    return int(bits)


def _check_group_size(group_size: int) -> int:
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group_size must be one of {GROUP_SIZES}, got {group_size!r}")
    return group_size


@dataclass
class ActivationPrecision:
    """The activation bit-width of one model, shared by all of its QuantLinear layers."""

    bits: int = 16

    def set(self, bits: int) -> None:
        self.bits = _check_bits(bits)


def quantize_weight(weight: torch.Tensor, group_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """nn.Linear weight (N x K) -> (qweight (K_pad/2 x N) uint8, scales (K_pad/G x N) fp16).

    Symmetric RTN per group: s = max|w| / 7 rounded to fp16 (an all-zero group gets
    s = 1), q = clamp(round(w / s), -8, 7) with the fp16 scale that is stored.
    """
    _check_group_size(group_size)
    n, k = weight.shape
    k_pad = -(-k // group_size) * group_size
    w = torch.nn.functional.pad(weight.detach().float().t(), (0, 0, 0, k_pad - k))  # K_pad x N
    groups = w.view(k_pad // group_size, group_size, n)
    scales = (groups.abs().amax(dim=1) / INT4_MAX).to(torch.float16)
    scales = torch.where(scales == 0, torch.ones_like(scales), scales)
    q = torch.round(groups / scales.float()[:, None, :]).clamp(INT4_MIN, INT4_MAX)
    return pack_int4(q.view(k_pad, n).to(torch.int8)), scales


def dequantize_weight(qweight: torch.Tensor, scales: torch.Tensor, in_features: int) -> torch.Tensor:
    """Inverse of ``quantize_weight`` up to rounding: N x K fp32."""
    group_size = 2 * qweight.shape[0] // scales.shape[0]
    return dequantize_int4_reference(qweight, scales, group_size)[:in_features].t()


class QuantLinear(nn.Module):
    """A linear layer with packed INT4 weights and a switchable activation bit-width."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        group_size: int = 128,
        precision: ActivationPrecision | None = None,
        backend: Backend | str = Backend.AUTO,
        bias_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.group_size = _check_group_size(group_size)
        self.precision = precision if precision is not None else ActivationPrecision()
        self.backend = Backend(backend)
        k_pad = -(-in_features // group_size) * group_size
        self.register_buffer(
            "qweight", torch.zeros(k_pad // 2, out_features, dtype=torch.uint8, device=device)
        )
        self.register_buffer(
            "scales", torch.ones(k_pad // group_size, out_features, dtype=torch.float16, device=device)
        )
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=bias_dtype, device=device)) if bias else None

    @classmethod
    def shaped_like(
        cls,
        linear: nn.Linear,
        group_size: int = 128,
        precision: ActivationPrecision | None = None,
        backend: Backend | str = Backend.AUTO,
        device: torch.device | str | None = None,
    ) -> QuantLinear:
        """An unfilled QuantLinear with ``linear``'s shape, bias and bias dtype."""
        return cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            group_size,
            precision,
            backend,
            bias_dtype=linear.weight.dtype,
            device=device or linear.weight.device,
        )

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        group_size: int = 128,
        precision: ActivationPrecision | None = None,
        backend: Backend | str = Backend.AUTO,
    ) -> QuantLinear:
        """Quantize an nn.Linear's weight (its bias stays in its own dtype)."""
        layer = cls.shaped_like(linear, group_size, precision, backend)
        qweight, scales = quantize_weight(linear.weight, group_size)
        layer.qweight.copy_(qweight)
        layer.scales.copy_(scales)
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.detach())
        return layer

    def backend_for(self, flat: torch.Tensor) -> Backend:
        """The backend that runs ``flat`` (rows x in_features): the chosen one, or auto's pick."""
        if self.backend is not Backend.AUTO:
            return self.backend
        if flat.is_cuda:
            return Backend.TRITON
        big = self.in_features * self.out_features >= CPU_FAST_MIN_WEIGHTS
        return Backend.CPU if big and flat.shape[0] >= CPU_FAST_MIN_ROWS else Backend.REFERENCE

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bits = self.precision.bits
        flat = x.reshape(-1, self.in_features)
        out = _GEMMS[self.backend_for(flat)](flat, self.qweight, self.scales, bits, self.group_size)
        if self.bias is not None:
            out = out + self.bias
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, group_size={self.group_size}, backend={self.backend.value}"
        )


def _precision_of(model: nn.Module) -> ActivationPrecision:
    precision = getattr(model, "dyqvla_precision", None)
    if not isinstance(precision, ActivationPrecision):
        raise ValueError("model has no quantized layers: call quantize_model(model) first")
    return precision


def _default_root(model: nn.Module) -> tuple[str, nn.Module]:
    """The language model when the model has one (OpenVLA: ``language_model``)."""
    language_model = getattr(model, "language_model", None)
    if isinstance(language_model, nn.Module):
        return "language_model.", language_model
    return "", model


def _replace_linears(
    model: nn.Module,
    make: Callable[[str, nn.Linear], nn.Module],
    include: Iterable[str] | None,
    skip: Iterable[str],
) -> list[str]:
    """Replace selected nn.Linear modules in place with ``make(name, linear)``."""
    if include is None:
        prefix, root = _default_root(model)
        candidates = [(prefix + name, module) for name, module in root.named_modules()]
        patterns = ["*"]
    else:
        candidates = list(model.named_modules())
        patterns = list(include)
    skip = list(skip)
    replaced = []
    for name, module in candidates:
        if not isinstance(module, nn.Linear) or not any(fnmatch.fnmatchcase(name, p) for p in patterns):
            continue
        if any(fnmatch.fnmatchcase(name, p) for p in skip):
            log.info("not quantizing %s (skipped by pattern)", name)
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, make(name, module))
        replaced.append(name)
    return replaced


def quantize_model(
    model: nn.Module,
    group_size: int = 128,
    skip: Iterable[str] = ("*lm_head",),
    include: Iterable[str] | None = None,
    backend: Backend | str = Backend.AUTO,
) -> nn.Module:
    """Replace nn.Linear layers by QuantLinear in place and return the model.

    Args:
        model: any module; by default its ``language_model`` (or itself) is quantized.
        group_size: weight group size along the input features (32, 64 or 128).
        skip: fnmatch patterns of module names left in full precision (lm_head by default).
        include: fnmatch patterns of module names to quantize instead of the default
            "every linear of the language model" (e.g. ``["vision_backbone.*"]``).
        backend: ``auto``, ``triton``, ``cpu`` or ``reference``.
    """
    _check_group_size(group_size)
    backend = Backend(backend)
    precision = getattr(model, "dyqvla_precision", None) or ActivationPrecision()
    replaced = _replace_linears(
        model,
        lambda _name, linear: QuantLinear.from_linear(linear, group_size, precision, backend),
        include,
        skip,
    )
    if not replaced:
        raise ValueError("quantize_model found no nn.Linear layer to quantize")
    model.dyqvla_precision = precision
    log.info("quantized %d linear layers to INT4 (group %d)", len(replaced), group_size)
    return model


def quantized_layers(model: nn.Module) -> dict[str, QuantLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}


def set_activation_bits(model: nn.Module, bits: int) -> None:
    """Set the activation bit-width every QuantLinear of ``model`` uses from now on."""
    _precision_of(model).set(bits)


def get_activation_bits(model: nn.Module) -> int:
    return _precision_of(model).bits


@contextmanager
def activation_bits(model: nn.Module, bits: int) -> Iterator[None]:
    """Run a block at ``bits`` activations, then restore the previous bit-width."""
    precision = _precision_of(model)
    previous = precision.bits
    precision.set(bits)
    try:
        yield
    finally:
        precision.bits = previous


def weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of parameters and buffers by dtype (shared storage counted once), plus total."""
    seen: set[int] = set()
    by_dtype: dict[str, int] = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        storage = tensor.untyped_storage()
        if storage.data_ptr() in seen and tensor.device.type != "meta":
            continue
        seen.add(storage.data_ptr())
        key = str(tensor.dtype).removeprefix("torch.")
        by_dtype[key] = by_dtype.get(key, 0) + tensor.numel() * tensor.element_size()
    by_dtype["total"] = sum(by_dtype.values())
    return by_dtype


def save_quantized(model: nn.Module, path: str | Path) -> None:
    """Write the quantized model's state dict to a safetensors file (no pickle).

    The header metadata records the format name and version, the group size, and
    every quantized layer with its in/out features, so that ``load_quantized`` can
    rebuild the layers without re-quantizing.
    """
    layers = quantized_layers(model)
    if not layers:
        raise ValueError("model has no quantized layers: call quantize_model(model) first")
    group_sizes = {m.group_size for m in layers.values()}
    if len(group_sizes) != 1:
        raise ValueError(f"save_quantized needs one group size, found {sorted(group_sizes)}")
    metadata = {
        "format": FORMAT_NAME,
        "version": str(FORMAT_VERSION),
        "group_size": str(group_sizes.pop()),
        "layers": json.dumps(
            {name: [m.in_features, m.out_features, m.bias is not None] for name, m in layers.items()}
        ),
    }
    tensors = {name: t.detach().contiguous() for name, t in model.state_dict().items()}
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(path)


def _read_quantized(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if not path.is_file():
        raise FileNotFoundError(f"quantized checkpoint not found: {path}")
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path} is not a readable safetensors file: {err}") from err
    if metadata.get("format") != FORMAT_NAME:
        raise ValueError(f"{path} is not a {FORMAT_NAME} checkpoint (format={metadata.get('format')!r})")
    if metadata.get("version") != str(FORMAT_VERSION):
        raise ValueError(
            f"{path} has format version {metadata.get('version')!r}; this code reads version {FORMAT_VERSION}"
        )
    return tensors, metadata


def load_quantized(
    model: nn.Module, path: str | Path, backend: Backend | str = Backend.AUTO, device: str | None = None
) -> nn.Module:
    """Load ``save_quantized`` output into an unquantized model of the same architecture.

    The listed layers are replaced by empty QuantLinear modules and filled from the file
    (no re-quantization); every tensor's name and shape must match.
    """
    path = Path(path)
    tensors, metadata = _read_quantized(path)
    try:
        group_size = int(metadata["group_size"])
        layers = json.loads(metadata["layers"])
    except (KeyError, ValueError) as err:
        raise ValueError(f"{path}: malformed metadata ({err})") from err
    precision = getattr(model, "dyqvla_precision", None) or ActivationPrecision()
    modules = dict(model.named_modules())
    for name, (in_features, out_features, _has_bias) in layers.items():
        module = modules.get(name)
        if not isinstance(module, (nn.Linear, QuantLinear)):
            raise ValueError(f"{path}: quantized layer {name!r} is not a linear layer of this model")
        if (module.in_features, module.out_features) != (in_features, out_features):
            raise ValueError(
                f"{path}: layer {name!r} is {in_features}->{out_features} in the file, "
                f"{module.in_features}->{module.out_features} in the model"
            )
    _replace_linears(
        model,
        lambda _name, linear: QuantLinear.shaped_like(linear, group_size, precision, backend, device),
        include=list(layers),
        skip=(),
    )
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path}: tensors missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, tensor in tensors.items():
        if tensor.shape != expected[name].shape or tensor.dtype != expected[name].dtype:
            raise ValueError(
                f"{path}: tensor {name!r} is {tuple(tensor.shape)} {tensor.dtype} in the file, "
                f"{tuple(expected[name].shape)} {expected[name].dtype} in the model"
            )
    model.load_state_dict(tensors, strict=True, assign=device is None and _on_meta(model))
    model.dyqvla_precision = precision
    return model


def _on_meta(model: nn.Module) -> bool:
    return any(t.device.type == "meta" for t in model.state_dict().values())
