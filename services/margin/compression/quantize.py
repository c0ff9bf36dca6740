"""Post-training quantization of eager PyTorch models, and the serialized (TorchScript) size of the result.

:func:`quantize` returns a new module and never changes its input. Schemes:

- ``dynamic_int8``: ``nn.Linear`` weights int8 (per output channel, or per tensor), activations quantized on
  the fly per batch (per tensor); runs the int8 GEMM of the x86/fbgemm backend on CPU. Activations use the
  full 8 bits on CPUs with VNNI, 7 bits (torch's default) elsewhere; see ``reduce_range``.
- ``dynamic_int8_per_token``: ``nn.Linear`` weights int8 per output channel, activations quantized on the fly
  to int8 per token (per row), int8 × int8 → int32 with ``torch._int_mm``. With ``calibration`` batches it also
  applies SmoothQuant (α = 0.5): per input channel, activation outliers are moved into the weights
  (x / s, W · s), which keeps the error low in transformers whose activations have outlier channels.
- ``static_int8``: weights and activations int8 with activation ranges from ``calibration`` batches (FX graph
  mode). CPU only.
- ``embedding_int8``: ``nn.Embedding`` tables int8 per row (``float_qparams_weight_only_qconfig``).
- ``weight_only_int8``: ``nn.Linear`` weights stored int8 per output channel (or per group of ``group_size``
  input columns), dequantized to float at run time; activations stay float. Smaller, not faster.
- ``fp16`` / ``bf16``: the floating weights cast; inputs are cast on the way in and outputs back to fp32.
  Only fast on a GPU.
- ``torchao_int8`` / ``torchao_int4``: torchao weight-only kernels; need a CUDA device and torchao.

Schemes compose by calling :func:`quantize` again on the result: ``embedding_int8`` only touches embeddings
and ``dynamic_int8`` / ``dynamic_int8_per_token`` / ``weight_only_int8`` only touch float ``nn.Linear``
layers. ``skip_layers`` names module prefixes (as in ``named_modules()``) kept as they are.
"""
from __future__ import annotations

import copy
import importlib.util
import io
import warnings
from collections.abc import Iterable, Sequence

import torch
import torch.ao.nn.quantized.dynamic as nnqd
from torch import nn

from margin.common.errors import InvalidArgument

SCHEMES: tuple[str, ...] = (
    "dynamic_int8",
    "dynamic_int8_per_token",
    "static_int8",
    "embedding_int8",
    "weight_only_int8",
    "fp16",
    "bf16",
    "torchao_int8",
    "torchao_int4",
)

_CAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def _skipped(name: str, skip_layers: Sequence[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in skip_layers if p)


def _targets(model: nn.Module, types: tuple[type, ...], skip_layers: Sequence[str]) -> list[str]:
    """Names of the modules whose exact type is in ``types`` (so already-quantized subclasses are left)."""
    return [name for name, mod in model.named_modules()
            if type(mod) in types and name and not _skipped(name, skip_layers)]


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


class Int8WeightOnlyLinear(nn.Module):
    """A Linear whose weight is stored int8 with a float32 scale per output row (or per row and group).

    The weight is dequantized on each call, so TorchScript stores int8 and the math stays in float.
    """

    def __init__(self, in_features: int, out_features: int, group_size: int = 0, bias: bool = True):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.group_size = group_size if 0 < group_size < in_features else in_features
        if in_features % self.group_size:
            raise InvalidArgument(f"group_size {group_size} does not divide in_features {in_features}")
        groups = in_features // self.group_size
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(out_features, groups, 1))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_float(cls, linear: nn.Linear, group_size: int = 0) -> Int8WeightOnlyLinear:
        q = cls(linear.in_features, linear.out_features, group_size, bias=linear.bias is not None)
        w = linear.weight.detach().float().reshape(q.out_features, -1, q.group_size)
        scale = (w.abs().amax(dim=2, keepdim=True) / 127.0).clamp(min=1e-12)
        q.qweight.copy_(torch.round(w / scale).clamp(-127, 127).to(torch.int8).reshape(q.out_features, -1))
        q.scale.copy_(scale)
        if linear.bias is not None:
            q.bias = linear.bias.detach().float().clone()
        return q

    def dequantized_weight(self) -> torch.Tensor:
        w = self.qweight.reshape(self.out_features, -1, self.group_size).to(self.scale.dtype) * self.scale
        return w.reshape(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dequantized_weight().to(x.dtype)
        b = self.bias
        return nn.functional.linear(x, w, None if b is None else b.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"


class PerTokenInt8Linear(nn.Module):
    """Linear with int8 weights (one scale per output row) and activations quantized to int8 per token.

    ``y = (round(x·inv_s / a) @ Wqᵀ) · a · w_scale + b`` where ``a`` is each row's absmax / 127. ``inv_s`` is
    the SmoothQuant factor (ones when not smoothed): the stored weight is ``W · s``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer("qweight_t", torch.zeros(in_features, out_features, dtype=torch.int8))
        self.register_buffer("w_scale", torch.ones(out_features))
        self.register_buffer("inv_s", torch.ones(in_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_float(cls, linear: nn.Linear, act_absmax: torch.Tensor | None = None,
                   alpha: float = 0.5) -> PerTokenInt8Linear:
        q = cls(linear.in_features, linear.out_features, bias=linear.bias is not None)
        w = linear.weight.detach().float()
        if act_absmax is not None:
            w_absmax = w.abs().amax(dim=0).clamp(min=1e-5)
            # A channel (nearly) silent in calibration would get a tiny s, i.e. a huge 1/s that blows up the
            # token's scale when it does fire later: floor its range at 1 % of the largest channel's.
            act = act_absmax.float()
            act = act.clamp(min=max(1e-5, 0.01 * float(act.max())))
            s = (act ** alpha / w_absmax ** (1 - alpha)).clamp(min=1e-5)
            w = w * s
            q.inv_s.copy_(1.0 / s)
        scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
        q.qweight_t.copy_(torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8).t())
        q.w_scale.copy_(scale)
        if linear.bias is not None:
            q.bias = linear.bias.detach().float().clone()
        return q

    def dequantized_weight(self) -> torch.Tensor:
        """The float weight this layer stands for, (out, in): the stored ``W · s`` dequantized, times ``1 / s``."""
        return self.qweight_t.t().float() * self.w_scale[:, None] * self.inv_s[None, :]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = (x.reshape(-1, self.in_features) * self.inv_s).float()
        a = x2.abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / 127.0
        xq = torch.round(x2 / a).to(torch.int8)
        y = torch._int_mm(xq, self.qweight_t).float() * (a * self.w_scale)
        b = self.bias
        if b is not None:
            y = y + b
        out_shape = list(x.shape[:-1])
        out_shape.append(self.out_features)
        return y.to(x.dtype).reshape(out_shape)

    def extra_repr(self) -> str:
        smoothed = bool((self.inv_s != 1).any())
        return f"in_features={self.in_features}, out_features={self.out_features}, smoothed={smoothed}"


class CastIO(nn.Module):
    """Runs ``inner`` in ``dtype``: floating inputs are cast to it, the floating output is cast to ``out_dtype``."""

    def __init__(self, inner: nn.Module, dtype: torch.dtype, out_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.inner = inner
        self.dtype = dtype
        self.out_dtype = out_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_floating_point():
            x = x.to(self.dtype)
        y = self.inner(x)
        return y.to(self.out_dtype) if y.is_floating_point() else y


def cpu_has_vnni() -> bool:
    """Whether this x86 CPU has VNNI (AVX512-VNNI, AVX-VNNI or AMX), whose int8 dot products do not saturate."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return any(flag in flags for flag in ("avx512_vnni", "avx_vnni", "amx_int8"))


class FullRangeDynamicLinear(nnqd.Linear):
    """Dynamic int8 Linear that quantizes activations to the full 8 bits (torch's own uses 7).

    torch keeps one bit free so that AVX2's 16-bit intermediate sums (vpmaddubsw) cannot saturate; VNNI CPUs
    sum in 32 bits, and the extra bit halves the activation rounding error. Only use it where VNNI is present.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.quantized.linear_dynamic(x, self._packed_params._packed_params, reduce_range=False)
        return y.to(x.dtype)

    def _get_name(self):
        return "FullRangeDynamicQuantizedLinear"


def _dynamic_int8(model: nn.Module, per_channel: bool, skip_layers: Sequence[str],
                  reduce_range: bool | None) -> nn.Module:
    from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig, quantize_dynamic

    qconfig = per_channel_dynamic_qconfig if per_channel else default_dynamic_qconfig
    spec = {name: qconfig for name in _targets(model, (nn.Linear,), skip_layers)}
    if not spec:
        return model
    if reduce_range is None:
        reduce_range = not cpu_has_vnni()
    mapping = None
    if not reduce_range:
        from torch.ao.quantization.quantization_mappings import get_default_dynamic_quant_module_mappings

        mapping = {**get_default_dynamic_quant_module_mappings(), nn.Linear: FullRangeDynamicLinear}
    return quantize_dynamic(model, qconfig_spec=spec, dtype=torch.qint8, mapping=mapping, inplace=True)


def _embedding_int8(model: nn.Module, skip_layers: Sequence[str]) -> nn.Module:
    from torch.ao.quantization import float_qparams_weight_only_qconfig, quantize_dynamic

    spec = {name: float_qparams_weight_only_qconfig
            for name in _targets(model, (nn.Embedding, nn.EmbeddingBag), skip_layers)}
    if not spec:
        return model
    return quantize_dynamic(model, qconfig_spec=spec, inplace=True)


def _weight_only_int8(model: nn.Module, skip_layers: Sequence[str], group_size: int) -> nn.Module:
    for name in _targets(model, (nn.Linear,), skip_layers):
        linear = model.get_submodule(name)
        gs = group_size if group_size and linear.in_features % group_size == 0 else 0
        _set_submodule(model, name, Int8WeightOnlyLinear.from_float(linear, gs))
    return model


def _batches(calibration: Iterable | None, scheme: str = "static_int8") -> list[tuple]:
    if calibration is None:
        raise InvalidArgument(f"{scheme} needs calibration batches (an iterable of input tuples); none were given")
    batches = [b if isinstance(b, (tuple, list)) else (b,) for b in calibration]
    if not batches:
        raise InvalidArgument(f"{scheme} needs at least one calibration batch; the iterable was empty")
    return [tuple(b) for b in batches]


def linear_input_absmax(model: nn.Module, names: Sequence[str], batches: list[tuple]) -> dict[str, torch.Tensor]:
    """Per input channel, the largest |activation| entering each named Linear over ``model(*batch)`` calls."""
    absmax: dict[str, torch.Tensor] = {}

    def hook_for(name: str):
        def hook(_mod, inputs, _out):
            x = inputs[0].detach()
            a = x.reshape(-1, x.shape[-1]).abs().amax(dim=0).float()
            absmax[name] = torch.maximum(absmax[name], a) if name in absmax else a
        return hook

    handles = [model.get_submodule(n).register_forward_hook(hook_for(n)) for n in names]
    try:
        with torch.no_grad():
            for batch in batches:
                model(*batch)
    finally:
        for h in handles:
            h.remove()
    return absmax


def _dynamic_int8_per_token(model: nn.Module, skip_layers: Sequence[str], calibration: Iterable | None,
                            alpha: float = 0.5) -> nn.Module:
    names = _targets(model, (nn.Linear,), skip_layers)
    absmax = {}
    if calibration is not None:
        absmax = linear_input_absmax(model, names, _batches(calibration, "dynamic_int8_per_token (SmoothQuant)"))
    for name in names:
        _set_submodule(model, name, PerTokenInt8Linear.from_float(model.get_submodule(name), absmax.get(name), alpha))
    return model


def _static_int8(model: nn.Module, per_channel: bool, skip_layers: Sequence[str],
                 calibration: Iterable | None) -> nn.Module:
    from torch.ao.quantization import QConfig, QConfigMapping, get_default_qconfig_mapping
    from torch.ao.quantization.observer import HistogramObserver, default_weight_observer
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    batches = _batches(calibration)
    if torch.backends.quantized.engine not in ("x86", "fbgemm", "onednn", "qnnpack"):
        raise InvalidArgument(f"static_int8 needs a quantized CPU engine, got {torch.backends.quantized.engine!r}")
    if per_channel:
        mapping = get_default_qconfig_mapping("x86")
    else:
        mapping = QConfigMapping().set_global(
            QConfig(activation=HistogramObserver.with_args(reduce_range=True), weight=default_weight_observer))
    for prefix in skip_layers:
        mapping = mapping.set_module_name(prefix, None)
    try:
        prepared = prepare_fx(model, mapping, example_inputs=batches[0])
    except Exception as err:  # symbolic tracing fails on data-dependent control flow and the like
        raise InvalidArgument(f"this model cannot be statically quantized (FX tracing failed: {err})") from err
    with torch.no_grad():
        for batch in batches:
            prepared(*batch)
    try:
        return convert_fx(prepared)
    except Exception as err:
        raise InvalidArgument(f"this model cannot be statically quantized (convert failed: {err})") from err


def _cast(model: nn.Module, dtype: torch.dtype, skip_layers: Sequence[str]) -> nn.Module:
    keep = [name for name, _ in model.named_modules() if name and _skipped(name, skip_layers)]
    keep = [n for n in keep if not any(n != k and n.startswith(k + ".") for k in keep)]  # outermost only
    model = model.to(dtype)
    for name in keep:
        inner = model.get_submodule(name).float()
        _set_submodule(model, name, CastIO(inner, torch.float32, out_dtype=dtype))
    return CastIO(model, dtype)


def _torchao(model: nn.Module, scheme: str, skip_layers: Sequence[str], group_size: int) -> nn.Module:
    if not torch.cuda.is_available():
        raise InvalidArgument(f"{scheme} needs a CUDA device; none is available here (use dynamic_int8 on CPU)")
    if importlib.util.find_spec("torchao") is None:
        raise InvalidArgument(f"{scheme} needs the torchao package, which is not installed")
    from torchao import quantization as tq

    if scheme == "torchao_int8":
        config = tq.Int8WeightOnlyConfig()
        dtype = torch.float32
    else:
        config = tq.Int4WeightOnlyConfig(group_size=group_size or 128)
        dtype = torch.bfloat16  # the int4 tinygemm kernel takes bf16 activations
    model = model.to(device="cuda", dtype=dtype)
    skipped = set(_skipped_names(model, skip_layers))

    def wanted(mod: nn.Module, fqn: str) -> bool:
        return isinstance(mod, nn.Linear) and fqn not in skipped

    tq.quantize_(model, config, filter_fn=wanted)
    return model if dtype == torch.float32 else CastIO(model, dtype)


def _skipped_names(model: nn.Module, skip_layers: Sequence[str]) -> list[str]:
    return [name for name, _ in model.named_modules() if name and _skipped(name, skip_layers)]


def quantize(
    model: nn.Module,
    scheme: str,
    *,
    per_channel: bool = True,
    skip_layers: Sequence[str] = (),
    calibration: Iterable[tuple] | None = None,
    group_size: int = 0,
    reduce_range: bool | None = None,
) -> nn.Module:
    """A quantized copy of ``model`` (in eval mode) under ``scheme``; ``model`` itself is not changed.

    ``per_channel`` applies to ``dynamic_int8`` and ``static_int8``; ``calibration`` (batches of positional
    inputs, each called as ``model(*batch)``) to ``static_int8`` (required) and ``dynamic_int8_per_token``
    (optional: enables SmoothQuant); ``group_size`` to ``weight_only_int8`` (0 = one scale per output row) and
    ``torchao_int4`` (default 128). ``reduce_range`` (``dynamic_int8`` only): quantize activations to 7 bits as
    torch does by default (True), or to the full 8 bits (False: about half the error, but only safe on CPUs
    with VNNI); None picks False when this CPU has VNNI. Raises :class:`InvalidArgument` for an unknown scheme,
    a scheme that cannot run here, or a model the scheme cannot handle.
    """
    if scheme not in SCHEMES:
        raise InvalidArgument(f"unknown quantization scheme {scheme!r}; known: {', '.join(SCHEMES)}")
    if group_size < 0:
        raise InvalidArgument(f"group_size must be >= 0, got {group_size}")
    skip_layers = tuple(skip_layers)
    if scheme.startswith("torchao_") and not torch.cuda.is_available():  # fail before copying a big model
        raise InvalidArgument(f"{scheme} needs a CUDA device; none is available here (use dynamic_int8 on CPU)")
    model = copy.deepcopy(model).eval()
    with warnings.catch_warnings():
        # torch.ao.quantization warns on every call that it is deprecated in favour of torchao.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.ao\..*")
        warnings.filterwarnings("ignore", message=r".*torch\.ao\.quantization.*")
        if scheme == "dynamic_int8":
            return _dynamic_int8(model, per_channel, skip_layers, reduce_range)
        if scheme == "dynamic_int8_per_token":
            return _dynamic_int8_per_token(model, skip_layers, calibration)
        if scheme == "static_int8":
            return _static_int8(model, per_channel, skip_layers, calibration)
        if scheme == "embedding_int8":
            return _embedding_int8(model, skip_layers)
        if scheme == "weight_only_int8":
            return _weight_only_int8(model, skip_layers, group_size)
        if scheme in _CAST_DTYPES:
            return _cast(model, _CAST_DTYPES[scheme], skip_layers)
        return _torchao(model, scheme, skip_layers, group_size)


def _as_tuple(example_inputs) -> tuple:
    return tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)


def to_torchscript(module: nn.Module, example_inputs) -> torch.jit.ScriptModule:
    """``torch.jit.script`` the module, or trace it with ``example_inputs`` when scripting fails."""
    module = module.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return torch.jit.script(module)
        except Exception:
            with torch.no_grad():
                return torch.jit.trace(module, _as_tuple(example_inputs), check_trace=False)


def saved_bytes(scripted: torch.jit.ScriptModule) -> bytes:
    """``torch.jit.save`` of ``scripted`` into memory (its deprecation warning silenced): the file's bytes."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(scripted, buf)
    return buf.getvalue()


def serialized_bytes(module: nn.Module, example_inputs) -> bytes:
    """The TorchScript file of ``module`` (as :func:`to_torchscript` makes it), as bytes."""
    return saved_bytes(to_torchscript(module, example_inputs))


def serialized_size(module: nn.Module, example_inputs) -> int:
    """Bytes of ``module`` saved as TorchScript (scripted, or traced with ``example_inputs`` as a fallback)."""
    return len(serialized_bytes(module, example_inputs))
