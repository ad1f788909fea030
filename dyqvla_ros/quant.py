"""W4 weights, A2/A4/A8/A16 activations switched per step (paper §IV-A1, §V-A).

Weights are quantized once (symmetric round-to-nearest INT4, one fp16 scale per group of
``group_size`` input features and output feature) and stay packed; the activation
bit-width is a property of the *model*, read by every ``QuantLinear`` at each forward,
so switching it re-quantizes, re-allocates and copies nothing::

    model = quantize_model(model, group_size=128)     # in place: nn.Linear -> QuantLinear
    with activation_bits(model, 4):
        y = model(x)

Portable weight layout (see ``dyqvla_ros.kernels.int4.pack_int4``): ``qweight`` is
``(K_pad // 2) x N`` uint8, two INT4 values per byte along K (K = in_features, padded
with zero rows to a multiple of the group size); ``scales`` is ``(K_pad // G) x N``
fp16. Memory: 0.5 + 2 / G bytes per weight (0.516 at G = 128).

Backends: ``triton`` (CUDA, or the CPU under TRITON_INTERPRET=1), ``cpu`` (torch
built-ins: per-group ``torch._int_mm`` for the integer paths, dequantize + ``matmul``
at 16 bits; ``dyqvla_ros.kernels.w4a_cpu``), ``cpu_int4`` (torch's CPU int4 GEMM,
``_weight_int4pack_mm_for_cpu``, in bf16) and ``reference`` (plain PyTorch, the integer
semantics every backend but ``cpu_int4`` reproduces; ``cpu_int4`` is float math on the
same quantized values, within ``w4a_cpu.INT4PACK_TOLERANCE`` of it).

``cpu_int4`` reads its own, machine-dependent weight layout, made at load time on CPU
devices by ``to_cpu_runtime(model)``: each layer's portable tensors are replaced by the
runtime ones (one layer's transient peak, never a second copy of the model), losslessly
(``save_quantized`` converts them back bit for bit, so files stay portable). ``auto``
picks ``triton`` on CUDA and ``cpu_int4`` on a converted layer, for every M and dtype:
on OpenVLA-7B shapes it measured 2.2-2.6x faster than a dense bf16 ``nn.Linear`` at M = 1
(A16; 1.8-2.6x at A2-A8) and 2.5-8x faster than ``cpu`` / ``reference`` at M = 280
(though still ~4x slower than dense bf16 there), with fp32 and bf16 activations alike
(``bench/kernels.py``), and 1.6-2.6x faster than the reference at the tiny model's layer
shapes (64 -> 64, 64 -> 128, 128 -> 64; M = 1 and 100). On an
unconverted CPU layer it picks ``cpu`` for more than 16 rows through a layer of at least
2^20 weights (OpenVLA-7B shapes, M = 280: 2.1-3.4x faster than the reference) and the
reference otherwise (at M <= 16 both unpack the whole weight per call and the reference
was 1.3-2.3x faster; at the tiny model's shapes they tie).
"""

from __future__ import annotations

import dataclasses
import enum
import fnmatch
import functools
import json
import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from dyqvla_ros.kernels.hadamard import hadamard_transform
from dyqvla_ros.kernels.int4 import INT4_MAX, INT4_MIN, check_activation_scales, pack_int4
from dyqvla_ros.kernels.w4a_cpu import (
    from_int4pack,
    int4pack_block_n,
    to_int4pack,
    w4a_gemm_cpu,
    w4a_gemm_int4pack,
)
from dyqvla_ros.kernels.w4a_gemm import (
    SUPPORTED_BITS,
    dequantize_int4_reference,
    w4a_gemm,
    w4a_gemm_reference,
)
from dyqvla_ros.tensor_files import assign_tensor, read_each, tensor_names, write_tensors

log = logging.getLogger(__name__)

GROUP_SIZES = (32, 64, 128)
FORMAT_NAME = "dyqvla-w4"
FORMAT_VERSION = 2  # 2: the rotation and the activation scales in the metadata ([H])
READABLE_VERSIONS = ("1", "2")  # a version-1 file is rotation "none", activation scales "token"
ROTATIONS = ("none", "hadamard")


class Backend(enum.StrEnum):
    AUTO = "auto"
    TRITON = "triton"
    CPU = "cpu"
    CPU_INT4 = "cpu_int4"
    REFERENCE = "reference"


_GEMMS = {Backend.TRITON: w4a_gemm, Backend.CPU: w4a_gemm_cpu, Backend.REFERENCE: w4a_gemm_reference}
# The runtime layout's buffers (not saved: save_quantized writes the portable ones back).
_RUNTIME_BUFFERS = ("int4pack", "scale_zeros", "scale_residual")
CPU_FAST_MIN_ROWS = 17  # rows (tokens) from which auto uses the cpu backend ...
CPU_FAST_MIN_WEIGHTS = 1 << 20  # ... for layers of at least this many weights


def _check_bits(bits: int) -> int:
    if isinstance(bits, bool) or bits not in SUPPORTED_BITS:
        raise ValueError(f"activation bits must be one of {SUPPORTED_BITS}, got {bits!r}")
    return int(bits)


def _check_rotation(rotation: str) -> str:
    if rotation not in ROTATIONS:
        raise ValueError(f"rotation must be one of {ROTATIONS}, got {rotation!r}")
    return rotation


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


def quantize_weight(
    weight: torch.Tensor, group_size: int = 128, rotation: str = "none"
) -> tuple[torch.Tensor, torch.Tensor]:
    """nn.Linear weight (N x K) -> (qweight (K_pad/2 x N) uint8, scales (K_pad/G x N) fp16).

    Symmetric RTN per group: s = max|w| / 7 rounded to fp16 (an all-zero group gets
    s = 1), q = clamp(round(w / s), -8, 7) with the fp16 scale that is stored.
    ``rotation="hadamard"``: the zero-padded weight is rotated first, W R with R the
    block Hadamard of blocks of ``group_size`` (``kernels.hadamard``), so that the layer
    computes (x R)(W R)^T = x W^T when its input is rotated the same way.
    """
    _check_group_size(group_size)
    _check_rotation(rotation)
    n, k = weight.shape
    k_pad = -(-k // group_size) * group_size
    w = torch.nn.functional.pad(weight.detach().float(), (0, k_pad - k))  # N x K_pad
    if rotation == "hadamard":
        w = hadamard_transform(w, group_size)
    w = w.t()  # K_pad x N
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
        rotation: str = "none",
        activation_scales: str = "token",
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.group_size = _check_group_size(group_size)
        # The weights were rotated (quantize_weight): the input must be, at every forward.
        self.rotation = _check_rotation(rotation)
        self.activation_scales = check_activation_scales(activation_scales)
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
        rotation: str = "none",
        activation_scales: str = "token",
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
            rotation=rotation,
            activation_scales=activation_scales,
        )

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        group_size: int = 128,
        precision: ActivationPrecision | None = None,
        backend: Backend | str = Backend.AUTO,
        rotation: str = "none",
        activation_scales: str = "token",
    ) -> QuantLinear:
        """Quantize an nn.Linear's weight (its bias stays in its own dtype)."""
        layer = cls.shaped_like(
            linear, group_size, precision, backend, rotation=rotation, activation_scales=activation_scales
        )
        qweight, scales = quantize_weight(linear.weight, group_size, rotation)
        layer.qweight.copy_(qweight)
        layer.scales.copy_(scales)
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.detach())
        return layer

    @property
    def cpu_runtime(self) -> bool:
        """Whether the weights are in the ``cpu_int4`` runtime layout (``to_cpu_runtime``)."""
        return "int4pack" in self._buffers

    def to_cpu_runtime_(self) -> None:
        """Replace the portable weight tensors by the ``cpu_int4`` runtime layout, in place.

        The portable ones are dropped (freed unless referenced elsewhere); the runtime
        ones are non-persistent buffers, so no state dict carries the machine's layout.
        """
        if self.cpu_runtime:
            return
        if self.qweight.device.type != "cpu":
            raise ValueError(f"the cpu_int4 layout is for CPU layers, this one is on {self.qweight.device}")
        runtime = to_int4pack(self.qweight, self.scales)
        del self.qweight, self.scales
        for name, tensor in zip(_RUNTIME_BUFFERS, runtime, strict=True):
            self.register_buffer(name, tensor, persistent=False)

    @property
    def scheme(self) -> Scheme:
        return Scheme(self.group_size, self.rotation, self.activation_scales)

    def portable_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(qweight, scales) in the portable layout, whichever layout the layer holds
        (converted back bit for bit from the runtime layout: a new copy then)."""
        if self.cpu_runtime:
            return from_int4pack(self.int4pack, self.scale_zeros, self.scale_residual, self.out_features)
        return self.qweight, self.scales

    def backend_for(self, flat: torch.Tensor) -> Backend:
        """The backend that runs ``flat`` (rows x in_features): the chosen one, or auto's pick."""
        if self.cpu_runtime:
            if self.backend not in (Backend.AUTO, Backend.CPU_INT4) or flat.device.type != "cpu":
                raise ValueError(
                    f"layer in the cpu_int4 runtime layout: it runs cpu_int4 on the CPU only, "
                    f"not {self.backend.value} on {flat.device}"
                )
            return Backend.CPU_INT4
        if self.backend is Backend.CPU_INT4:
            raise ValueError("backend cpu_int4 needs the runtime layout: call to_cpu_runtime(model) first")
        if self.backend is not Backend.AUTO:
            return self.backend
        if flat.is_cuda:
            return Backend.TRITON
        big = self.in_features * self.out_features >= CPU_FAST_MIN_WEIGHTS
        return Backend.CPU if big and flat.shape[0] >= CPU_FAST_MIN_ROWS else Backend.REFERENCE

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bits = self.precision.bits
        flat = x.reshape(-1, self.in_features)
        backend = self.backend_for(flat)
        if self.rotation == "hadamard":  # x R, zero-padded to whole groups as the weight was
            k_pad = -(-self.in_features // self.group_size) * self.group_size
            flat = hadamard_transform(nn.functional.pad(flat, (0, k_pad - self.in_features)), self.group_size)
        scheme = {"activation_scales": self.activation_scales}
        if backend is Backend.CPU_INT4:
            out = w4a_gemm_int4pack(flat, self.int4pack, self.scale_zeros, bits, self.group_size, **scheme)
            out = out[:, : self.out_features]  # the layout pads N
        else:
            out = _GEMMS[backend](flat, self.qweight, self.scales, bits, self.group_size, **scheme)
        if self.bias is not None:
            out = out + self.bias
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, group_size={self.group_size}, backend={self.backend.value}, "
            f"rotation={self.rotation}, activation_scales={self.activation_scales}"
            + (", layout=cpu_int4" if self.cpu_runtime else "")
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
    rotation: str = "none",
    activation_scales: str = "token",
) -> nn.Module:
    """Replace nn.Linear layers by QuantLinear in place and return the model.

    Args:
        model: any module; by default its ``language_model`` (or itself) is quantized.
        group_size: weight group size along the input features (32, 64 or 128).
        skip: fnmatch patterns of module names left in full precision (lm_head by default).
        include: fnmatch patterns of module names to quantize instead of the default
            "every linear of the language model" (e.g. ``["vision_backbone.*"]``).
        backend: ``auto``, ``triton``, ``cpu``, ``cpu_int4`` (after ``to_cpu_runtime``)
            or ``reference``.
        rotation: ``none`` or ``hadamard`` (block Hadamard of the input features, blocks
            of ``group_size``: weights rotated here, activations at every forward).
        activation_scales: ``token`` (Eq. 2 per token) or ``group`` (per token and
            weight group). The two defaults are the paper's scheme; the measured
            alternatives are in BENCHMARKS.md [H].
    """
    scheme = Scheme(group_size, rotation, activation_scales)
    replaced = _install_quant_linears(model, scheme, include, skip, QuantLinear.from_linear, backend)
    log.info("quantized %d linear layers to INT4 (%s)", len(replaced), scheme)
    return model


@dataclass(frozen=True)
class Scheme:
    """How a model's layers are quantized: weight group size, input rotation, activation
    scales; validated at construction, recorded in ``save_quantized``'s metadata."""

    group_size: int = 128
    rotation: str = "none"
    activation_scales: str = "token"

    def __post_init__(self) -> None:
        _check_group_size(self.group_size)
        _check_rotation(self.rotation)
        check_activation_scales(self.activation_scales)

    def __str__(self) -> str:
        scales = f"activation scales per {self.activation_scales}"
        return f"group {self.group_size}, rotation {self.rotation}, {scales}"

    def as_dict(self) -> dict[str, int | str]:
        """The fields by name, as calibration files record them (``calibration.SCHEME_KEYS``)."""
        return dataclasses.asdict(self)


def _install_quant_linears(
    model: nn.Module,
    scheme: Scheme,
    include: Iterable[str] | None,
    skip: Iterable[str],
    make: Callable[..., QuantLinear],
    backend: Backend | str,
) -> list[str]:
    """Replace the selected linears by ``make(linear, group_size, precision, backend, ...)``
    of ``scheme``, all sharing the model's activation precision; the names replaced."""
    backend = Backend(backend)
    precision = getattr(model, "dyqvla_precision", None) or ActivationPrecision()

    def build(_name: str, linear: nn.Linear) -> QuantLinear:
        return make(
            linear,
            scheme.group_size,
            precision,
            backend,
            rotation=scheme.rotation,
            activation_scales=scheme.activation_scales,
        )

    replaced = _replace_linears(model, build, include, skip)
    if not replaced:
        raise ValueError("quantize_model found no nn.Linear layer to quantize")
    model.dyqvla_precision = precision
    return replaced


def quantized_layers(model: nn.Module) -> dict[str, QuantLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}


def to_cpu_runtime(model: nn.Module) -> nn.Module:
    """Move every QuantLinear of ``model`` (or ``model`` itself) that may run ``cpu_int4``
    -- backend ``auto`` or ``cpu_int4`` -- to its runtime layout, in place; return ``model``.

    Call it once after loading on a CPU device (``auto`` then runs ``cpu_int4`` there);
    one layer at a time, so the peak is one layer's transient codes (int32, 4 B/param).
    Layers pinned to another backend keep the portable layout, and so does every layer
    where torch's int4 CPU kernel or its layout is unavailable (a warning; ``auto`` then
    runs the portable backends). The layout is torch's and this machine's: it is never
    saved (``save_quantized`` writes the portable tensors).
    """
    if int4pack_block_n() is None:
        log.warning("torch's int4 CPU GEMM is unavailable here: the quantized layers stay portable")
        return model
    layers = [m for m in quantized_layers(model).values() if m.backend in (Backend.AUTO, Backend.CPU_INT4)]
    for layer in layers:
        layer.to_cpu_runtime_()
    log.info("%d quantized layers in the cpu_int4 runtime layout", len(layers))
    return model


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
    """Write the quantized model's state dict to a safetensors file (no pickle), one tensor
    at a time (``tensor_files.write_tensors``: no second copy of the model, even on CUDA).

    The header metadata records the format name and version, the scheme (group size,
    rotation, activation scales), and every quantized layer with its in/out features, so
    that ``load_quantized`` can rebuild the layers without re-quantizing. Layers in the
    ``cpu_int4`` runtime layout are written in the portable one, converted back bit for
    bit, one layer at a time (the same file as before ``to_cpu_runtime``).
    """
    layers = quantized_layers(model)
    if not layers:
        raise ValueError("model has no quantized layers: call quantize_model(model) first")
    schemes = {m.scheme for m in layers.values()}
    if len(schemes) != 1:
        raise ValueError(f"save_quantized needs one scheme for all layers, found {sorted(map(str, schemes))}")
    scheme = schemes.pop()
    metadata = {
        "format": FORMAT_NAME,
        "version": str(FORMAT_VERSION),
        "group_size": str(scheme.group_size),
        "rotation": scheme.rotation,
        "activation_scales": scheme.activation_scales,
        "layers": json.dumps(
            {name: [m.in_features, m.out_features, m.bias is not None] for name, m in layers.items()}
        ),
    }
    state = model.state_dict()
    specs = {name: (t.dtype, tuple(t.shape)) for name, t in state.items()}
    runtime = {name: layer for name, layer in layers.items() if layer.cpu_runtime}
    for name, layer in runtime.items():
        k_pad = -(-layer.in_features // layer.group_size) * layer.group_size
        specs[f"{name}.qweight"] = (torch.uint8, (k_pad // 2, layer.out_features))
        specs[f"{name}.scales"] = (torch.float16, (k_pad // layer.group_size, layer.out_features))

    @functools.lru_cache(maxsize=1)  # qweight then scales of a layer: converted back once
    def portable(layer_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return runtime[layer_name].portable_tensors()

    def fetch(name: str) -> torch.Tensor:
        layer_name, _, buffer = name.rpartition(".")
        if layer_name in runtime and buffer in ("qweight", "scales"):  # not its bias
            return portable(layer_name)[("qweight", "scales").index(buffer)]
        return state[name]

    write_tensors(Path(path), specs, fetch, metadata)


def _read_metadata(path: Path) -> dict[str, str]:
    if not path.is_file():
        raise FileNotFoundError(f"quantized checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path} is not a readable safetensors file: {err}") from err
    if metadata.get("format") != FORMAT_NAME:
        raise ValueError(f"{path} is not a {FORMAT_NAME} checkpoint (format={metadata.get('format')!r})")
    if metadata.get("version") not in READABLE_VERSIONS:
        raise ValueError(
            f"{path} has format version {metadata.get('version')!r}; this code reads versions "
            f"{', '.join(READABLE_VERSIONS)}"
        )
    return metadata


def load_quantized(
    model: nn.Module, path: str | Path, backend: Backend | str = Backend.AUTO, device: str | None = None
) -> nn.Module:
    """Load ``save_quantized`` output into an unquantized model of the same architecture.

    The listed layers are replaced by empty QuantLinear modules and filled from the file
    (no re-quantization), one tensor at a time (``tensor_files.read_each``: the peak is
    the model plus one tensor); every tensor's name, shape and dtype must match. Tensors
    go to ``device``, else to where the model's are (the CPU for a model on meta).
    """
    path = Path(path)
    metadata = _read_metadata(path)
    try:
        scheme = Scheme(
            int(metadata["group_size"]),
            metadata.get("rotation", "none"),
            metadata.get("activation_scales", "token"),
        )
        layers = json.loads(metadata["layers"])
    except (KeyError, ValueError) as err:
        raise ValueError(f"{path}: malformed metadata ({err})") from err
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
    _install_quant_linears(model, scheme, list(layers), (), QuantLinear.shaped_like, backend)
    expected = model.state_dict()
    names = tensor_names(path)
    missing = sorted(set(expected) - set(names))
    unexpected = sorted(set(names) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path}: tensors missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, tensor, _file in read_each([path]):
        want = expected[name]
        if tensor.shape != want.shape or tensor.dtype != want.dtype:
            raise ValueError(
                f"{path}: tensor {name!r} is {tuple(tensor.shape)} {tensor.dtype} in the file, "
                f"{tuple(want.shape)} {want.dtype} in the model"
            )
        target = device or ("cpu" if want.is_meta else want.device)
        assign_tensor(model, name, tensor.to(target))
    return model


def empty_quantized_layers(
    model: nn.Module,
    group_size: int = 128,
    include: Iterable[str] | None = None,
    skip: Iterable[str] = ("*lm_head",),
    backend: Backend | str = Backend.AUTO,
    rotation: str = "none",
    activation_scales: str = "token",
) -> None:
    """Replace the linears ``quantize_model`` would quantize by unfilled QuantLinear layers
    on their device (meta, for a loader that fills them as it reads the checkpoint)."""
    scheme = Scheme(group_size, rotation, activation_scales)
    _install_quant_linears(model, scheme, include, skip, QuantLinear.shaped_like, backend)
