"""The demo's data: movie-review sentences labelled positive/negative, kept in vera_ext/demo/data/ (see its
README.md for source, license and selection)."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["DATASET_NAME", "DATASET_LICENSE", "DATA_FILE", "LABELS", "Split", "load_split", "batches"]

DATA_FILE = Path(__file__).resolve().parent / "data" / "rt_sentiment.tsv"
DATASET_NAME = "movie-review sentence sentiment (Pang & Lee snippets rated in VADER, Hutto & Gilbert 2014)"
DATASET_LICENSE = "MIT (vaderSentiment 3.3.2 sdist); see vera_ext/demo/data/README.md"
LABELS = ("negative", "positive")


@dataclass
class Split:
    """Texts and their integer labels (index into LABELS)."""

    texts: list[str]
    labels: torch.Tensor  # (N,) int64

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, count: int) -> "Split":
        """The first ``count`` examples of each label, interleaved (keeps the subset balanced)."""
        picked = [torch.nonzero(self.labels == c).flatten()[:count] for c in range(len(LABELS))]
        order = torch.stack(picked, 1).flatten() if len({len(p) for p in picked}) == 1 else torch.cat(picked)
        return Split([self.texts[i] for i in order.tolist()], self.labels[order])


def load_split(split: str, path: Path = DATA_FILE) -> Split:
    """``split`` is ``"train"`` or ``"test"``."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if not path.is_file():
        raise FileNotFoundError(f"demo data file not found: {path} (it ships in vera_ext/demo/data/)")
    texts, labels = [], []
    with open(path, encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
            if row["split"] == split:
                texts.append(row["text"])
                labels.append(LABELS.index(row["label"]))
    return Split(texts, torch.tensor(labels, dtype=torch.int64))


def batches(data: Split, tokenizer, batch_size: int, max_length: int, order: torch.Tensor | None = None):
    """Yield (input_ids, attention_mask, labels) CPU tensors, padded per batch, in ``order`` (default: as stored)."""
    order = torch.arange(len(data)) if order is None else order
    for start in range(0, len(data), batch_size):
        rows = order[start : start + batch_size].tolist()
        enc = tokenizer(
            [data.texts[i] for i in rows], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        yield enc["input_ids"], enc["attention_mask"], data.labels[rows]
