"""Pruning: global magnitude (unstructured) and neuron / channel removal (structured).

Unstructured pruning zeroes the smallest weights but leaves every tensor its full size: a dense safetensors or
TorchScript file of the pruned model is exactly as large as before, and dense kernels run no faster. The zeros only
pay off when stored sparsely: :func:`packed_state_dict` keeps each sufficiently sparse weight as its non-zero
values plus their positions, which a safetensors file does store smaller; :func:`unpack_state_dict` restores the
dense tensors exactly.

Structured pruning physically removes the weakest hidden neurons (mlp) or conv channels (cnn) and returns a freshly
built, smaller model of the same family, so the file, the parameter count and the latency all shrink.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from margin.common.errors import InvalidArgument
from margin.compression.measure import sparsity as weight_sparsity
from margin.modelzoo.architectures import SmallCNN, build_model
from margin.modelzoo.datasets import Split
from margin.modelzoo.training import TrainResult, train_classifier

PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def prunable_layers(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, PRUNABLE)]


def _check_skip(skip_layers: Iterable[str], known: list[str]) -> set[str]:
    skip = set(skip_layers)
    unknown = sorted(skip - set(known))
    if unknown:
        raise InvalidArgument(f"skip_layers names unknown layers {unknown}; prunable layers: {known}")
    return skip


def _check_amount(amount: float) -> None:
    if not isinstance(amount, (int, float)) or not 0.0 < amount < 1.0:
        raise InvalidArgument(f"prune amount must be in (0, 1), got {amount!r}")


# ---------------------------------------------------------------------------------------------------- unstructured


def unstructured(model: nn.Module, amount: float, skip_layers: Iterable[str] = ()) -> tuple[nn.Module, float]:
    """Zero the ``amount`` fraction of smallest-magnitude weights across all Linear / Conv layers not skipped
    (one global threshold), in place. Returns the model, whose weights are plain tensors again, and the achieved
    sparsity over all Linear / Conv weights (skipped layers included, so it is below ``amount`` when some are
    skipped). The model's dense file does not shrink: see :func:`packed_state_dict`."""
    _check_amount(amount)
    known = prunable_layers(model)
    skip = _check_skip(skip_layers, known)
    targets = [(m, "weight") for name, m in model.named_modules() if isinstance(m, PRUNABLE) and name not in skip]
    if not targets:
        raise InvalidArgument(f"nothing to prune: every prunable layer is skipped ({known})")
    torch_prune.global_unstructured(targets, pruning_method=torch_prune.L1Unstructured, amount=float(amount))
    for module, name in targets:
        torch_prune.remove(module, name)
    return model, weight_sparsity(model)


_VALUES, _INDICES, _BITMASK, _SHAPE = ".__values", ".__indices", ".__bitmask", ".__shape"
_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def packed_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A safetensors-ready state dict in which each floating tensor with enough zeros is stored sparsely.

    A packed tensor ``k`` becomes ``k.__values`` (its non-zero values, same dtype), ``k.__shape`` (int64) and either
    ``k.__indices`` (int32 flat positions) or, when cheaper, ``k.__bitmask`` (uint8, one bit per element,
    most-significant bit first). Positions cost 4 bytes per non-zero, the bitmask 1/8 byte per element, so for fp32
    the file shrinks at any sparsity above about 3% and the position form wins above about 97%. Tensors that would
    not shrink are kept dense under their own key. Reverse with :func:`unpack_state_dict`.
    """
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        if any(key.endswith(s) for s in (_VALUES, _INDICES, _BITMASK, _SHAPE)):
            raise InvalidArgument(f"state dict key {key!r} ends with a reserved packing suffix")
        tensor = tensor.detach().cpu()
        if not tensor.is_floating_point() or tensor.dim() == 0:
            out[key] = tensor.contiguous()
            continue
        flat = tensor.reshape(-1)
        nonzero = flat != 0
        nnz = int(nonzero.sum())
        elem = flat.element_size()
        dense_bytes = flat.numel() * elem
        index_bytes = nnz * (elem + 4)
        bitmask_bytes = nnz * elem + math.ceil(flat.numel() / 8)
        if min(index_bytes, bitmask_bytes) + 8 * tensor.dim() >= dense_bytes:
            out[key] = tensor.contiguous()
            continue
        out[key + _VALUES] = flat[nonzero].clone()
        out[key + _SHAPE] = torch.tensor(list(tensor.shape), dtype=torch.int64)
        if index_bytes <= bitmask_bytes:
            out[key + _INDICES] = nonzero.nonzero().reshape(-1).to(torch.int32)
        else:
            bits = torch.zeros(math.ceil(flat.numel() / 8) * 8, dtype=torch.uint8)
            bits[:flat.numel()] = nonzero.to(torch.uint8)
            out[key + _BITMASK] = (bits.reshape(-1, 8) * _BIT_WEIGHTS).sum(1).to(torch.uint8)
    return out


def unpack_state_dict(packed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The dense state dict :func:`packed_state_dict` packed (bit-identical values)."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in packed.items():
        if key.endswith((_INDICES, _BITMASK, _SHAPE)):
            continue
        if not key.endswith(_VALUES):
            out[key] = tensor
            continue
        base = key[:-len(_VALUES)]
        if base + _SHAPE not in packed:
            raise InvalidArgument(f"packed state dict has {key!r} but no {base + _SHAPE!r}")
        shape = [int(d) for d in packed[base + _SHAPE].tolist()]
        flat = torch.zeros(math.prod(shape), dtype=tensor.dtype)
        if base + _INDICES in packed:
            flat[packed[base + _INDICES].long()] = tensor
        elif base + _BITMASK in packed:
            bytes_ = packed[base + _BITMASK].to(torch.int32)
            bits = (bytes_.unsqueeze(1) >> torch.arange(7, -1, -1, dtype=torch.int32)) & 1
            mask = bits.reshape(-1)[:flat.numel()].bool()
            flat[mask] = tensor
        else:
            raise InvalidArgument(f"packed state dict has {key!r} but neither indices nor a bitmask")
        out[base] = flat.reshape(shape)
    return out


# ---------------------------------------------------------------------------------------------------- structured


def _keep_count(units: int, amount: float) -> int:
    return max(1, min(units, round(units * (1.0 - amount))))


def _top(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the ``keep`` highest scores, in their original order."""
    return torch.sort(torch.topk(scores, keep).indices).values


def structured(model: nn.Module, arch: dict, amount: float, skip_layers: Iterable[str] = ()) -> tuple[nn.Module, dict]:
    """Remove the ``amount`` fraction of units with the smallest L1 norm from every hidden layer not skipped.

    - mlp: hidden neurons (rows of hidden ``Linear`` i and bias entries, and the matching columns of the next
      ``Linear``); the output layer and the inputs are never touched.
    - cnn: output channels of each ``Conv2d`` (scored by the L1 norm of the filter times the magnitude of its
      BatchNorm gain), the matching BatchNorm2d entries and the next conv's input channels; for the last conv, the
      ``head``'s 4 input features per channel (2x2 pooled map).

    Returns a fresh model of the smaller architecture (``build_model(new_arch)``) holding the kept weights; its
    outputs equal the original's with the removed units' outputs zeroed. The input model is left unchanged.
    """
    keeps = structured_plan(model, arch, amount, skip_layers)
    if arch["family"] == "mlp":
        return _shrink_mlp(model, arch, list(keeps.values()))
    return _shrink_cnn(model, arch, list(keeps.values()))


def structured_plan(model: nn.Module, arch: dict, amount: float,
                    skip_layers: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """The units :func:`structured` keeps: hidden Linear / Conv2d layer name -> sorted indices of kept units."""
    _check_amount(amount)
    family = arch.get("family") if isinstance(arch, dict) else None
    if family == "mlp" and isinstance(model, nn.Sequential):
        linears = [(name, m) for name, m in model.named_children() if isinstance(m, nn.Linear)]
        skip = _check_skip(skip_layers, [name for name, _ in linears])
        hidden = linears[:-1]
        if len(hidden) != len(arch.get("hidden", [])):
            raise InvalidArgument(f"architecture hidden {arch.get('hidden')} does not match the model's "
                                  f"{len(hidden)} hidden layers")
        return {name: torch.arange(layer.out_features) if name in skip
                else _top(layer.weight.detach().abs().sum(1), _keep_count(layer.out_features, amount))
                for name, layer in hidden}
    if family == "cnn" and isinstance(model, SmallCNN):
        children = list(model.features.children())
        convs = [(i, f"features.{i}", m) for i, m in enumerate(children) if isinstance(m, nn.Conv2d)]
        skip = _check_skip(skip_layers, [name for _, name, _ in convs] + ["head"])
        keeps = {}
        for i, name, conv in convs:
            if name in skip:
                keeps[name] = torch.arange(conv.out_channels)
                continue
            score = conv.weight.detach().abs().sum((1, 2, 3))
            bn = children[i + 1] if i + 1 < len(children) else None
            if isinstance(bn, nn.BatchNorm2d) and bn.affine:
                gain = bn.weight.detach().abs()
                if bn.track_running_stats and bn.running_var is not None:
                    gain = gain / torch.sqrt(bn.running_var + bn.eps)
                score = score * gain
            keeps[name] = _top(score, _keep_count(conv.out_channels, amount))
        return keeps
    raise InvalidArgument(f"structured pruning supports the mlp and cnn families; got family {family!r} with a "
                          f"{type(model).__name__}")


def _shrink_mlp(model: nn.Sequential, arch: dict, keeps: list[torch.Tensor]):
    linears = [m for m in model.children() if isinstance(m, nn.Linear)]
    new_arch = {**arch, "hidden": [len(k) for k in keeps]}
    new_model = build_model(new_arch)
    new_linears = [m for m in new_model.children() if isinstance(m, nn.Linear)]
    previous = None  # kept inputs of the current layer
    with torch.no_grad():
        for i, (old, new) in enumerate(zip(linears, new_linears, strict=True)):
            rows = keeps[i] if i < len(keeps) else torch.arange(old.out_features)
            weight = old.weight[rows]
            if previous is not None:
                weight = weight[:, previous]
            new.weight.copy_(weight)
            if old.bias is not None:
                new.bias.copy_(old.bias[rows])
            previous = rows
    new_model.train(model.training)
    return new_model, new_arch


def _shrink_cnn(model: SmallCNN, arch: dict, keeps: list[torch.Tensor]):
    children = list(model.features.children())
    convs = [(i, m) for i, m in enumerate(children) if isinstance(m, nn.Conv2d)]
    new_arch = {**arch, "channels": [len(k) for k in keeps]}
    new_model = build_model(new_arch)
    new_children = list(new_model.features.children())
    with torch.no_grad():
        previous = torch.arange(1)  # the single input channel
        for (i, old_conv), rows in zip(convs, keeps, strict=True):
            new_conv = new_children[i]
            new_conv.weight.copy_(old_conv.weight[rows][:, previous])
            if old_conv.bias is not None:
                new_conv.bias.copy_(old_conv.bias[rows])
            old_bn, new_bn = children[i + 1], new_children[i + 1]
            if isinstance(old_bn, nn.BatchNorm2d):
                if old_bn.affine:
                    new_bn.weight.copy_(old_bn.weight[rows])
                    new_bn.bias.copy_(old_bn.bias[rows])
                if old_bn.track_running_stats:
                    new_bn.running_mean.copy_(old_bn.running_mean[rows])
                    new_bn.running_var.copy_(old_bn.running_var[rows])
                    new_bn.num_batches_tracked.copy_(old_bn.num_batches_tracked)
            previous = rows
        features = (previous.unsqueeze(1) * 4 + torch.arange(4)).reshape(-1)  # channel c -> features 4c .. 4c+3
        new_model.head.weight.copy_(model.head.weight[:, features])
        new_model.head.bias.copy_(model.head.bias)
    new_model.train(model.training)
    return new_model, new_arch


# ---------------------------------------------------------------------------------------------------- fine-tuning


def finetune(model: nn.Module, data: Split, epochs: int, lr: float = 1e-3, seed: int = 0, *,
             keep_zeros: bool = True, batch_size: int = 64,
             after_epoch: Callable[[int], None] | None = None) -> TrainResult:
    """Train ``model`` in place for ``epochs`` with :func:`train_classifier`.

    With ``keep_zeros`` (the default) every Linear / Conv weight that is zero now stays zero: a mask is attached for
    the duration of training and removed afterwards, so fine-tuning after unstructured pruning keeps the sparsity.
    """
    if not isinstance(epochs, int) or epochs < 0:
        raise InvalidArgument(f"finetune epochs must be a non-negative integer, got {epochs!r}")
    masked = []
    if keep_zeros:
        for module in model.modules():
            if isinstance(module, PRUNABLE) and bool((module.weight == 0).any()):
                torch_prune.custom_from_mask(module, "weight", (module.weight != 0).to(module.weight.dtype))
                masked.append(module)
    try:
        return train_classifier(model, data, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                                after_epoch=after_epoch)
    finally:
        for module in masked:
            torch_prune.remove(module, "weight")
        model.eval()
