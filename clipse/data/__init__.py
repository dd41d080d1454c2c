"""Datasets: readers for the supported formats, the synthetic default, and tensor caches."""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from clipse.data.cache import cached_images, cached_tokens
from clipse.data.formats import DataRequest, format_names, read_dataset
from clipse.data.records import SPLITS, CaptionDataset, CaptionSplit
from clipse.data.synthetic import ShapesSpec
from clipse.data.truth import CaptionTruth


def load_caption_dataset(kind: str, root: str | Path | None = None, image_root: str | Path | None = None, *,
                         shapes: ShapesSpec | None = None, split_seed: int = 0,
                         val_fraction: float = 0.1, test_fraction: float = 0.1) -> CaptionDataset:
    """Any registered format in the common in-memory form (``clipse.data.formats``)."""
    return read_dataset(kind, DataRequest(Path(root) if root else None, Path(image_root) if image_root else None,
                                          split_seed, val_fraction, test_fraction, shapes))


@dataclass
class SplitTensors:
    """A split ready for training or evaluation: decoded images and tokenised captions."""

    images: torch.Tensor         # (N, 3, R, R) uint8
    tokens: torch.Tensor         # (C, L) int64
    caption_image: torch.Tensor  # (C,) int64
    captions: list[str]
    truth: CaptionTruth | None = None  # which captions truly describe which images, where known

    def with_shuffled_captions(self, share: float, seed: int) -> "SplitTensors":
        """This split with the captions of a seeded ``share`` of its pairs shuffled among those
        pairs (tokens, texts and their ground truth alike): a planted harm of known sign."""
        count = round(share * len(self.tokens))
        if count < 2:
            return self
        rng = np.random.default_rng([seed, 7919])
        chosen = np.sort(rng.choice(len(self.tokens), count, replace=False))
        order = np.arange(len(self.tokens))
        order[chosen] = rng.permutation(chosen)
        index = torch.from_numpy(order)
        truth = None if self.truth is None else CaptionTruth(self.truth.image_facts, self.truth.caption_facts[index])
        return SplitTensors(self.images, self.tokens[index], self.caption_image, [self.captions[k] for k in order], truth)

    @functools.cached_property
    def caption_content(self) -> np.ndarray:
        """(C,) ids, equal for captions with identical tokens: they tie under any model."""
        return torch.unique(self.tokens, dim=0, return_inverse=True)[1].numpy()

    @functools.cached_property
    def image_content(self) -> np.ndarray:
        """(N,) ids, equal for pixel-identical images."""
        ids: dict[bytes, int] = {}
        return np.array([ids.setdefault(hashlib.blake2b(image.numpy().tobytes(), digest_size=16).digest(), len(ids))
                         for image in self.images], dtype=np.int64)


def load_split_tensors(split: CaptionSplit, split_name: str, resolution: int,
                       tokenize: Callable[[list[str]], torch.Tensor], tokenizer_id: str,
                       truth: CaptionTruth | None = None) -> SplitTensors:
    return SplitTensors(
        images=cached_images(split.image_paths, resolution, split_name),
        tokens=cached_tokens(split.captions, tokenize, tokenizer_id),
        caption_image=torch.as_tensor(split.caption_image),
        captions=split.captions,
        truth=truth,
    )


__all__ = ["SPLITS", "CaptionDataset", "CaptionSplit", "CaptionTruth", "ShapesSpec", "SplitTensors",
           "format_names", "load_caption_dataset", "load_split_tensors"]
