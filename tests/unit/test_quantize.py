"""Unit tests for margin.compression.quantize on the model zoo's small MLP and CNN (no MiniLM here)."""
from __future__ import annotations

import io

import pytest
import torch
from margin.common.errors import InvalidArgument
from margin.compression.quantize import (
    SCHEMES,
    Int8WeightOnlyLinear,
    PerTokenInt8Linear,
    quantize,
    serialized_size,
)
from margin.modelzoo.architectures import build_model
from torch import nn

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")

MLP_SPEC = {"family": "mlp", "input_dim": 64, "hidden": [128], "num_classes": 10}
CNN_SPEC = {"family": "cnn", "image_size": 8, "channels": [16, 32], "num_classes": 10}


def _model(spec: dict) -> nn.Module:
    torch.manual_seed(0)
    model = build_model(spec).eval()
    if spec["family"] == "cnn":  # give BatchNorm non-trivial statistics, as after training
        model.train()
        with torch.no_grad():
            for _ in range(5):
                model(torch.rand(64, 64))
        model.eval()
    return model


@pytest.fixture(scope="module")
def mlp() -> nn.Module:
    return _model(MLP_SPEC)


@pytest.fixture(scope="module")
def cnn() -> nn.Module:
    return _model(CNN_SPEC)


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.rand(32, 64)


def _close(ref: torch.Tensor, out: torch.Tensor, tol: float) -> None:
    out = out.float()
    assert out.shape == ref.shape
    rel = (out - ref).norm() / ref.norm()
    assert rel < tol, f"relative error {rel:.4f} >= {tol}"


CPU_SCHEMES = [("dynamic_int8", {}), ("dynamic_int8", {"per_channel": False}),
               ("dynamic_int8", {"reduce_range": True}), ("dynamic_int8", {"reduce_range": False}),
               ("dynamic_int8_per_token", {}), ("weight_only_int8", {}), ("weight_only_int8", {"group_size": 32}),
               ("bf16", {}), ("fp16", {})]


@pytest.mark.parametrize(("scheme", "kwargs"), CPU_SCHEMES)
def test_mlp_schemes_stay_close_and_leave_the_input_alone(mlp, x, scheme, kwargs):
    before = {k: v.clone() for k, v in mlp.state_dict().items()}
    ref = mlp(x).detach()
    q = quantize(mlp, scheme, **kwargs)
    with torch.no_grad():
        _close(ref, q(x), 0.05)
    assert all(torch.equal(before[k], v) for k, v in mlp.state_dict().items())
    assert all(type(m) is not Int8WeightOnlyLinear for m in mlp.modules())


def test_static_int8_mlp_and_cnn(mlp, cnn, x):
    calib = [(torch.rand(32, 64),) for _ in range(4)]
    for model in (mlp, cnn):
        q = quantize(model, "static_int8", calibration=calib)
        with torch.no_grad():
            _close(model(x), q(x), 0.1)
    q = quantize(mlp, "static_int8", calibration=[torch.rand(8, 64)], per_channel=False)  # bare tensors too
    with torch.no_grad():
        _close(mlp(x), q(x), 0.1)


def test_cnn_dynamic_and_weight_only(cnn, x):
    ref = cnn(x).detach()
    with torch.no_grad():
        _close(ref, quantize(cnn, "dynamic_int8")(x), 0.05)
        _close(ref, quantize(cnn, "weight_only_int8")(x), 0.05)


def test_per_token_with_smoothquant_calibration(mlp, x):
    ref = mlp(x).detach()
    q = quantize(mlp, "dynamic_int8_per_token", calibration=[(torch.rand(16, 64),) for _ in range(3)])
    assert isinstance(q[0], PerTokenInt8Linear) and bool((q[0].inv_s != 1).any())
    with torch.no_grad():
        _close(ref, q(x), 0.05)
        _close(ref.reshape(4, 8, 10), q(x.reshape(4, 8, 64)), 0.05)  # (batch, tokens, features) inputs
        scripted = torch.jit.script(q)
        assert torch.allclose(scripted(x), q(x))


def test_sizes_shrink(mlp, cnn, x):
    fp32 = serialized_size(mlp, x)
    for scheme in ("dynamic_int8", "dynamic_int8_per_token", "weight_only_int8"):
        assert serialized_size(quantize(mlp, scheme), x) < 0.5 * fp32, scheme
    assert serialized_size(quantize(mlp, "bf16"), x) < 0.7 * fp32
    calib = [(torch.rand(16, 64),)]
    assert serialized_size(quantize(cnn, "static_int8", calibration=calib), x) < serialized_size(cnn, x)


def test_weight_only_serializes_int8_and_reloads(mlp, x):
    q = quantize(mlp, "weight_only_int8")
    assert q[0].qweight.dtype == torch.int8
    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(q), buf)
    buf.seek(0)
    reloaded = torch.jit.load(buf)
    with torch.no_grad():
        assert torch.allclose(reloaded(x), q(x))


def test_embedding_int8_and_combining_schemes(x):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(1000, 64), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)).eval()
    ids = torch.randint(0, 1000, (4, 12))
    ref = model(ids).detach()
    both = quantize(quantize(model, "embedding_int8"), "dynamic_int8")
    assert type(both[0]).__name__ == "Embedding" and type(both[0]) is not nn.Embedding
    assert type(both[1]) is not nn.Linear
    with torch.no_grad():
        _close(ref, both(ids), 0.05)
    assert serialized_size(both, ids) < 0.4 * serialized_size(model, ids)


def test_skip_layers_keeps_those_in_fp32(mlp):
    q = quantize(mlp, "dynamic_int8", skip_layers=["2"])
    assert type(q[2]) is nn.Linear and type(q[0]) is not nn.Linear
    w = quantize(mlp, "weight_only_int8", skip_layers=["0"])
    assert type(w[0]) is nn.Linear and isinstance(w[2], Int8WeightOnlyLinear)
    h = quantize(mlp, "bf16", skip_layers=["2"])
    assert h.inner[2].inner.weight.dtype == torch.float32 and h.inner[0].weight.dtype == torch.bfloat16


def test_unknown_scheme_names_the_known_ones(mlp):
    with pytest.raises(InvalidArgument, match="dynamic_int8"):
        quantize(mlp, "int3")
    assert "static_int8" in SCHEMES and "torchao_int4" in SCHEMES


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
@pytest.mark.parametrize("scheme", ["torchao_int8", "torchao_int4"])
def test_torchao_needs_cuda(mlp, scheme):
    with pytest.raises(InvalidArgument, match="CUDA"):
        quantize(mlp, scheme)


def test_static_int8_needs_calibration(mlp):
    with pytest.raises(InvalidArgument, match="calibration"):
        quantize(mlp, "static_int8")
    with pytest.raises(InvalidArgument, match="calibration"):
        quantize(mlp, "static_int8", calibration=[])


def test_static_int8_rejects_untraceable_models():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: FX cannot trace it
                return self.fc(x)
            return -self.fc(x)

    with pytest.raises(InvalidArgument, match="cannot be statically quantized"):
        quantize(Branchy().eval(), "static_int8", calibration=[(torch.rand(2, 4),)])
