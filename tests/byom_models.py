"""Two small "bring your own" PyTorch models, trained in seconds on data made here, for tests of what Margin does
with an ONNX model a team uploads (signature derivation, compression with ONNX Runtime's quantization tools).

Unlike :mod:`tests.onnx_models` (graphs written node by node), these come out of the PyTorch exporter, with the
operators real uploads have: a transformer text classifier (``Gather``, ``MatMul``, ``LayerNormalization``,
``Softmax``) and a residual CNN (``Conv`` with folded BatchNorm, ``GlobalAveragePool``, ``Gemm``). They are trained,
so that a compressed variant can be judged by whether its argmax agrees with the fp32 model's on held-out rows.
Nothing is downloaded: the text task is synthetic and the images are scikit-learn's bundled ``load_digits``.
"""
from __future__ import annotations

import importlib.util
import io
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

# Warnings torch.onnx.export(dynamo=False) raises on every export (the TorchScript-based exporter, which needs no
# onnxscript): test modules that export put these in their pytestmark.
ONNX_EXPORT_WARNINGS = [
    pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript-based ONNX export:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:The feature will be removed:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:DeprecationWarning"),
]
VOCAB = 1000
SEQ_LEN = 32
TEXT_CLASSES = 4
IMAGE_SIZE = 32
IMAGE_CLASSES = 10
_KEYWORDS_PER_CLASS = 8
_KEYWORDS_PER_ROW = 4
_THREADS = 1  # the CI machine has 2 shared cores: a second thread spin-waits on a loaded machine and is slower
TEXT_TRAIN_ROWS = 1000
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "resnet-package"
IMAGE_TRAIN_ROWS = 1497  # image_data()'s first rows; the last 300 are held out


class TextClassifier(nn.Module):
    """``input_ids: INT64[batch, 32]`` -> ``logits: FP32[batch, 4]``: token and learned position embeddings, a
    2-layer transformer encoder (d_model 64, 4 heads, no dropout), mean pooling over the sequence, a linear head."""

    def __init__(self, vocab: int = VOCAB, seq_len: int = SEQ_LEN, classes: int = TEXT_CLASSES,
                 d_model: int = 64) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, d_model)
        self.positions = nn.Parameter(torch.randn(1, seq_len, d_model) * 0.02)
        layer = nn.TransformerEncoderLayer(d_model, nhead=4, dim_feedforward=128, dropout=0.0, batch_first=True)
        # enable_nested_tensor=False: the nested-tensor fast path is for padded batches, which these are not
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, classes)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(self.tokens(input_ids) + self.positions)
        return self.head(hidden.mean(dim=1))


def example_module(name: str) -> ModuleType:
    """A module of the README's example package, ``examples/resnet-package/<name>.py`` (loaded by path: the folder's
    name is not a Python package name)."""
    spec = importlib.util.spec_from_file_location(f"resnet_package_{name}", EXAMPLE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class ResNetCNN(example_module("model").ResNet):
    """``images: FP32[batch, 3, 32, 32]`` -> ``logits: FP32[batch, 10]``: the README's example package's ResNet at
    width 16 (a conv3x3(16)+BatchNorm+ReLU stem, a basic block at 16 channels, a stride-2 basic block to 32
    channels, global average pooling, a linear head). The stem has stride 2: at stride 1 the last layer sees only
    13x13 pixels (3x3 of the digit's own), too little of a digit's shape to learn it in a few epochs, and training
    takes 5 times as long."""

    def __init__(self, classes: int = IMAGE_CLASSES) -> None:
        super().__init__(16, classes)


def text_data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` rows of a learnable 4-class text task: ``(input_ids INT64[n, 32], y INT64[n])``. Each class owns 8
    keyword tokens; a row is uniform random tokens (outside every keyword set) with 4 of its class's keywords put at
    random positions, so the class is read off which keywords occur, wherever they are."""
    rng = np.random.default_rng(seed)
    keywords = np.arange(TEXT_CLASSES * _KEYWORDS_PER_CLASS).reshape(TEXT_CLASSES, _KEYWORDS_PER_CLASS)
    y = rng.integers(0, TEXT_CLASSES, n)
    ids = rng.integers(keywords.size, VOCAB, (n, SEQ_LEN))
    slots = np.argsort(rng.random((n, SEQ_LEN)), axis=1)[:, :_KEYWORDS_PER_ROW]
    picks = rng.integers(0, _KEYWORDS_PER_CLASS, (n, _KEYWORDS_PER_ROW))
    np.put_along_axis(ids, slots, keywords[y[:, None], picks], axis=1)
    return ids.astype(np.int64), y.astype(np.int64)


def image_data() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits (1797 rows of 8x8, values 0..16) as ``(images FP32[1797, 3, 32, 32] in [0, 1],
    labels INT64[1797])``: each pixel repeated 4x4, the grey level copied to 3 channels."""
    digits = load_digits()
    images = np.kron(digits.images / 16.0, np.ones((IMAGE_SIZE // 8, IMAGE_SIZE // 8)))
    images = np.repeat(images[:, None], 3, axis=1)
    return images.astype(np.float32), digits.target.astype(np.int64)


def train(model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int, seed: int,
          batch_size: int = 64, lr: float = 3e-3) -> nn.Module:
    """Train ``model`` on ``(x, y)`` with Adam and cross-entropy, in shuffled mini-batches on at most 2 threads, and
    return it in eval mode. Training mode during the epochs means BatchNorm learns its running statistics, so an
    exported model folds real (not identity) normalization into its convolutions. The seed orders the batches; the
    initial weights are the constructor's, so seed before constructing (as :func:`trained_text_classifier` does)."""
    torch.manual_seed(seed)
    torch.set_num_threads(_THREADS)
    inputs, targets = torch.from_numpy(x), torch.from_numpy(y)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        for rows in torch.randperm(len(inputs)).split(batch_size):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(inputs[rows]), targets[rows]).backward()
            optimizer.step()
    return model.eval()


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    """The fraction of rows whose argmax logit is the label."""
    with torch.no_grad():
        return float((model(torch.from_numpy(x)).argmax(dim=1).numpy() == y).mean())


def export_onnx(model: nn.Module, example: torch.Tensor, input_name: str) -> bytes:
    """``model`` as a serialized opset-17 ONNX model with one input ``input_name`` and one output ``logits``, the
    batch axis of both dynamic. Uses the TorchScript exporter (``dynamo=False``), which needs no ``onnxscript``; the
    BatchNorm layers of a model in eval mode are folded into the convolutions before them. PyTorch's fused
    transformer fast path (``aten::_transformer_encoder_layer_fwd``, taken in eval mode without gradients) has no
    ONNX export, so it is off while exporting and the encoder is traced as its plain operators."""
    buffer = io.BytesIO()
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad():
            torch.onnx.export(model.eval(), (example,), buffer, dynamo=False, opset_version=17,
                              input_names=[input_name], output_names=["logits"],
                              dynamic_axes={input_name: {0: "batch"}, "logits": {0: "batch"}})
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return buffer.getvalue()


def dataset_npz(arrays: dict[str, np.ndarray]) -> bytes:
    """``arrays`` as the bytes of an ``.npz`` file (``np.savez``), e.g. a calibration or evaluation set to upload."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def trained_text_classifier(seed: int = 0) -> TextClassifier:
    """A :class:`TextClassifier` built and trained (2 epochs, about 1 s) on ``text_data(TEXT_TRAIN_ROWS, seed)``,
    the same weights for the same seed; it gets about 99% of held-out rows right (chance: 25%)."""
    torch.manual_seed(seed)
    x, y = text_data(TEXT_TRAIN_ROWS, seed)
    return train(TextClassifier(), x, y, epochs=2, seed=seed)


def trained_resnet_cnn(seed: int = 0) -> ResNetCNN:
    """A :class:`ResNetCNN` built and trained (5 epochs, about 2 s) on ``image_data()``'s first ``IMAGE_TRAIN_ROWS``
    rows, the same weights for the same seed; it gets about 90-93% of the 300 held-out rows right (chance: 10%)."""
    torch.manual_seed(seed)
    images, labels = image_data()
    return train(ResNetCNN(), images[:IMAGE_TRAIN_ROWS], labels[:IMAGE_TRAIN_ROWS], epochs=5, seed=seed)
