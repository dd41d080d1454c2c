"""The one in-memory form every dataset reader produces."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from clipse.data.truth import CaptionTruth

SPLITS = ("train", "val", "test")


@dataclass
class CaptionSplit:
    """One split: unique images, and one entry per caption pointing at its image's row."""

    image_paths: list[Path]
    captions: list[str]
    caption_image: np.ndarray  # (C,) int64 row in image_paths of each caption

    @property
    def n_pairs(self) -> int:
        return len(self.captions)


@dataclass
class CaptionDataset:
    name: str                       # e.g. "flickr8k", "karpathy:dataset_coco.json"
    splits: dict[str, CaptionSplit] = field(default_factory=dict)
    # which captions truly describe which images of a split, where the data knows (generated data)
    truth_of: Callable[[CaptionSplit], CaptionTruth] | None = None

    def split(self, name: str) -> CaptionSplit:
        return self.splits[name]

    def truth(self, name: str) -> CaptionTruth | None:
        return self.truth_of(self.splits[name]) if self.truth_of is not None else None

    def describe(self) -> str:
        return ", ".join(
            f"{name} {len(s.image_paths)} images / {s.n_pairs} pairs" for name, s in self.splits.items())


def build_split(captions_by_image: dict[Path, list[str]]) -> CaptionSplit:
    """Images in the given order; captions grouped by image in their own order."""
    image_paths, captions, owner = [], [], []
    for row, (path, texts) in enumerate(captions_by_image.items()):
        image_paths.append(path)
        captions.extend(texts)
        owner.extend([row] * len(texts))
    return CaptionSplit(image_paths, captions, np.asarray(owner, dtype=np.int64))
