"""What the dataset formats share: reading text files, finding the image folder, splitting by image
and assembling a ``CaptionDataset`` with train/val/test (docs/reference/data.md).

Quirks of the real files are skipped with one warning that counts them; anything that makes a
file unusable is a ``UserError`` naming the file (and line) and what is wrong.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Iterable

import numpy as np

from clipse.data.records import SPLITS, CaptionDataset, build_split
from clipse.util.errors import UserError

log = logging.getLogger(__name__)

# Where the images of the common distributions live, relative to the text files' folder(s).
IMAGE_FOLDER_NAMES = ("Flicker8k_Dataset", "Flickr8k_Dataset", "Images", "images",
                      "flickr30k-images", "flickr30k_images", ".")
SPLIT_ALIASES = {"train": "train", "restval": "train", "val": "val", "valid": "val", "dev": "val",
                 "validation": "val", "test": "test"}


def read_text_lines(path: Path) -> list[str]:
    """Lines without line ends (LF or CRLF) or surrounding spaces; a clear error if unreadable."""
    try:
        with open(path, encoding="utf-8") as handle:
            return [line.strip() for line in handle]
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror})") from None


def find_image_folder(bases: Iterable[Path], probe_names: list[str], explicit: Path | None, source: Path) -> Path:
    """The first candidate folder that holds one of the probe images (or the explicit one)."""
    if explicit is not None:
        if not explicit.is_dir():
            raise UserError(f"{explicit}: image folder not found")
        return explicit
    candidates = [base / name for base in bases for name in IMAGE_FOLDER_NAMES]
    probes = probe_names[:50]
    for folder in candidates:
        if folder.is_dir() and any((folder / name).is_file() for name in probes):
            return folder
    looked = ", ".join(sorted({str(c) for c in candidates}))
    raise UserError(f"{source}: no image folder holds its images (looked in {looked}); pass --image-root")


def split_or_fail(dataset: CaptionDataset, source: Path) -> CaptionDataset:
    for split in SPLITS:
        if split not in dataset.splits or dataset.splits[split].n_pairs == 0:
            raise UserError(f"{source}: split '{split}' has no usable image-caption pairs")
    return dataset


def warn_skipped(source: Path, counts: Counter, examples: dict[str, str]) -> None:
    for reason, count in counts.items():
        log.warning("%s: skipped %d %s (e.g. %s)", source, count, reason, examples[reason])


def assemble(source: Path, name: str, split_of_image: dict[str, str], captions: dict[str, list[str]],
              image_path_of: dict[str, Path]) -> CaptionDataset:
    """Group captions by image per split, skipping images without file or captions (counted)."""
    skipped, examples = Counter(), {}
    per_split: dict[str, dict[Path, list[str]]] = {s: {} for s in SPLITS}
    for image, split in split_of_image.items():
        reason = None
        if image not in captions:
            reason = "split entries without captions"
        elif not image_path_of[image].is_file():
            reason = "images whose file does not exist"
        if reason:
            skipped[reason] += 1
            examples.setdefault(reason, image)
            continue
        per_split[split][image_path_of[image]] = captions[image]
    warn_skipped(source, skipped, examples)
    return split_or_fail(CaptionDataset(name, {s: build_split(per_split[s]) for s in SPLITS}), source)


def single_file(folder: Path, patterns: tuple[str, ...], what: str) -> Path:
    matches = sorted({p for pattern in patterns for p in folder.glob(pattern) if p.is_file()})
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise UserError(f"{folder}: no {what} found ({', '.join(patterns)})")
    raise UserError(f"{folder}: several {what} found ({', '.join(p.name for p in matches)}); name one with --data-root")


def seeded_split(images: list[str], seed: int, val_fraction: float, test_fraction: float) -> dict[str, str]:
    """Deterministic split by image: one image's captions never straddle two splits."""
    order = np.random.default_rng(seed).permutation(len(images))
    n_test = max(1, round(len(images) * test_fraction))
    n_val = max(1, round(len(images) * val_fraction))
    if n_test + n_val >= len(images):
        raise UserError(f"{len(images)} images are too few for a train/val/test split")
    split_of_image = {}
    for rank, index in enumerate(order):
        split_of_image[images[index]] = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
    return split_of_image
