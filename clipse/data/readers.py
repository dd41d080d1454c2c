"""Dataset readers (docs/data.md). Every reader returns a ``CaptionDataset`` with train/val/test.

Quirks of the real files are skipped with one warning that counts them; anything that makes a
file unusable is a ``UserError`` naming the file (and line) and what is wrong.
"""

from __future__ import annotations

import csv
import json
import logging
from collections import Counter
from pathlib import Path
from typing import Iterable

import numpy as np

from clipse.data.records import SPLITS, CaptionDataset, build_split
from clipse.util.errors import UserError

log = logging.getLogger(__name__)

FLICKR8K_TOKEN_FILE = "Flickr8k.token.txt"
FLICKR8K_SPLIT_FILES = {
    "train": "Flickr_8k.trainImages.txt",
    "val": "Flickr_8k.devImages.txt",
    "test": "Flickr_8k.testImages.txt",
}
# Where the images of the common distributions live, relative to the text files' folder(s).
IMAGE_FOLDER_NAMES = ("Flicker8k_Dataset", "Flickr8k_Dataset", "Images", "images",
                      "flickr30k-images", "flickr30k_images", ".")
SPLIT_ALIASES = {"train": "train", "restval": "train", "val": "val", "valid": "val", "dev": "val",
                 "validation": "val", "test": "test"}
DATA_KINDS = ("shapes", "flickr8k", "karpathy", "csv")


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


def _find_image_folder(bases: Iterable[Path], probe_names: list[str], explicit: Path | None, source: Path) -> Path:
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


def _split_or_fail(dataset: CaptionDataset, source: Path) -> CaptionDataset:
    for split in SPLITS:
        if split not in dataset.splits or dataset.splits[split].n_pairs == 0:
            raise UserError(f"{source}: split '{split}' has no usable image-caption pairs")
    return dataset


def _warn_skipped(source: Path, counts: Counter, examples: dict[str, str]) -> None:
    for reason, count in counts.items():
        log.warning("%s: skipped %d %s (e.g. %s)", source, count, reason, examples[reason])


def _assemble(source: Path, name: str, split_of_image: dict[str, str], captions: dict[str, list[str]],
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
    _warn_skipped(source, skipped, examples)
    return _split_or_fail(CaptionDataset(name, {s: build_split(per_split[s]) for s in SPLITS}), source)


# ---------------------------------------------------------------------------------------------
# Flickr8k original layout


def _parse_token_file(token_file: Path) -> dict[str, list[str]]:
    captions: dict[str, list[tuple[int, str]]] = {}
    for number, line in enumerate(read_text_lines(token_file), start=1):
        if not line:
            continue
        key, tab, caption = line.partition("\t")
        image, hash_sign, index = key.strip().rpartition("#")
        if not tab or not hash_sign or not index.isdigit() or not image:
            raise UserError(f"{token_file}:{number}: malformed line, expected 'IMAGE.jpg#N<TAB>caption'")
        if caption.strip():
            captions.setdefault(image, []).append((int(index), caption.strip()))
    return {image: [c for _, c in sorted(items)] for image, items in captions.items()}


def read_flickr8k(root: Path, image_root: Path | None = None) -> CaptionDataset:
    root = Path(root)
    if root.is_file():
        token_file = root
    elif root.is_dir():
        found = [p for p in (root / FLICKR8K_TOKEN_FILE, root / "Flickr8k_text" / FLICKR8K_TOKEN_FILE) if p.is_file()]
        if not found:
            raise UserError(f"{root}: no {FLICKR8K_TOKEN_FILE} here or in Flickr8k_text/")
        token_file = found[0]
    else:
        raise UserError(f"{root}: data folder not found")
    text_dir = token_file.parent
    captions = _parse_token_file(token_file)
    split_of_image: dict[str, str] = {}
    for split, file_name in FLICKR8K_SPLIT_FILES.items():
        for name in read_text_lines(text_dir / file_name):
            if name:
                split_of_image.setdefault(name, split)
    image_dir = _find_image_folder([text_dir, text_dir.parent], list(split_of_image), image_root, token_file)
    # token lines for files that exist nowhere (the real file's "...jpg.1#k") are counted too
    orphans = [image for image in captions if image not in split_of_image and not (image_dir / image).is_file()]
    if orphans:
        lines = sum(len(captions[o]) for o in orphans)
        log.warning("%s: skipped %d caption lines whose image file does not exist (e.g. %s)",
                    token_file, lines, orphans[0])
    return _assemble(token_file, "flickr8k", split_of_image, captions,
                     {image: image_dir / image for image in split_of_image})


# ---------------------------------------------------------------------------------------------
# Karpathy JSON (dataset_flickr8k.json, dataset_flickr30k.json, dataset_coco.json)


def _single_file(folder: Path, patterns: tuple[str, ...], what: str) -> Path:
    matches = sorted({p for pattern in patterns for p in folder.glob(pattern) if p.is_file()})
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise UserError(f"{folder}: no {what} found ({', '.join(patterns)})")
    raise UserError(f"{folder}: several {what} found ({', '.join(p.name for p in matches)}); name one with --data-root")


def read_karpathy(root: Path, image_root: Path | None = None) -> CaptionDataset:
    root = Path(root)
    if not root.exists():
        raise UserError(f"{root}: data path not found")
    json_file = root if root.is_file() else _single_file(root, ("dataset_*.json",), "Karpathy JSON file")
    try:
        data = json.loads(json_file.read_text(encoding="utf-8"))
        entries = data["images"]
    except json.JSONDecodeError as exc:
        raise UserError(f"{json_file}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    except (KeyError, TypeError):
        raise UserError(f"{json_file}: expected an object with an 'images' list") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"{json_file}: not UTF-8 text ({exc.reason})") from None
    split_of_image, captions = {}, {}
    for position, entry in enumerate(entries):
        try:
            key = str(Path(entry.get("filepath", "")) / entry["filename"])
            split = SPLIT_ALIASES[entry["split"]]
            texts = [s["raw"].strip() for s in entry["sentences"] if s["raw"].strip()]
        except (KeyError, TypeError, AttributeError):
            raise UserError(f"{json_file}: images[{position}] lacks filename, split or sentences[].raw") from None
        split_of_image[key] = split
        if texts:
            captions[key] = texts
    image_dir = _find_image_folder([json_file.parent], list(split_of_image), image_root, json_file)
    return _assemble(json_file, f"karpathy:{json_file.name}", split_of_image, captions,
                     {key: image_dir / key for key in split_of_image})


# ---------------------------------------------------------------------------------------------
# Captions CSV: Kaggle Flickr8k captions.txt (image,caption) and open_clip CSV/TSV (filepath,title)

CSV_COLUMNS = (("image", "caption"), ("filepath", "title"))


def _seeded_split(images: list[str], seed: int, val_fraction: float, test_fraction: float) -> dict[str, str]:
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


def read_captions_csv(root: Path, image_root: Path | None = None, *, split_seed: int = 0,
                      val_fraction: float = 0.1, test_fraction: float = 0.1) -> CaptionDataset:
    root = Path(root)
    if not root.exists():
        raise UserError(f"{root}: data path not found")
    csv_file = root if root.is_file() else _single_file(root, ("captions.txt", "*.csv", "*.tsv"), "captions CSV/TSV file")
    lines = read_text_lines(csv_file)
    if not lines or not lines[0]:
        raise UserError(f"{csv_file}: empty file, expected a header line")
    delimiter = "\t" if "\t" in lines[0] else ","
    reader = csv.reader(lines, delimiter=delimiter)
    header = [h.strip().lower() for h in next(reader)]
    columns = next((pair for pair in CSV_COLUMNS if set(pair) <= set(header)), None)
    if columns is None:
        raise UserError(f"{csv_file}: expected columns 'image,caption' or 'filepath,title', found {','.join(header)}")
    image_col, caption_col = header.index(columns[0]), header.index(columns[1])
    split_col = header.index("split") if "split" in header else None

    captions: dict[str, list[str]] = {}
    split_column: dict[str, str] = {}
    for number, row in enumerate(reader, start=2):
        if not row:
            continue
        if len(row) != len(header):
            raise UserError(f"{csv_file}:{number}: {len(row)} fields, expected {len(header)} (quote captions with commas)")
        image, caption = row[image_col].strip(), row[caption_col].strip()
        if not image:
            raise UserError(f"{csv_file}:{number}: empty {columns[0]}")
        if caption:
            captions.setdefault(image, []).append(caption)
        if split_col is not None:
            value = row[split_col].strip().lower()
            if value not in SPLIT_ALIASES:
                raise UserError(f"{csv_file}:{number}: unknown split '{value}' (use train, val or test)")
            split_column[image] = SPLIT_ALIASES[value]

    text_dirs = [csv_file.parent, csv_file.parent / "Flickr8k_text"]
    split_files = [d for d in text_dirs if all((d / f).is_file() for f in FLICKR8K_SPLIT_FILES.values())]
    if split_column:
        split_of_image = split_column
    elif split_files:
        split_of_image = {}
        for split, file_name in FLICKR8K_SPLIT_FILES.items():
            for name in read_text_lines(split_files[0] / file_name):
                if name:
                    split_of_image.setdefault(name, split)
    else:
        split_of_image = _seeded_split(sorted(captions), split_seed, val_fraction, test_fraction)
        sizes = Counter(split_of_image.values())
        log.info("%s: no split given; seeded split (seed %d) by image: train %d, val %d, test %d images",
                 csv_file, split_seed, sizes["train"], sizes["val"], sizes["test"])

    if columns[0] == "filepath":  # open_clip: paths relative to the CSV's folder (or absolute)
        base = image_root or csv_file.parent
        paths = {image: base / image for image in split_of_image}
    else:
        folder = _find_image_folder([csv_file.parent], list(split_of_image), image_root, csv_file)
        paths = {image: folder / image for image in split_of_image}
    return _assemble(csv_file, f"csv:{csv_file.name}", split_of_image, captions, paths)


def read_dataset(kind: str, root: Path, image_root: Path | None = None, *, split_seed: int = 0,
                 val_fraction: float = 0.1, test_fraction: float = 0.1) -> CaptionDataset:
    """Read a dataset on disk of the given kind (the synthetic one is generated elsewhere)."""
    if kind == "flickr8k":
        return read_flickr8k(root, image_root)
    if kind == "karpathy":
        return read_karpathy(root, image_root)
    if kind == "csv":
        return read_captions_csv(root, image_root, split_seed=split_seed,
                                 val_fraction=val_fraction, test_fraction=test_fraction)
    raise UserError(f"unknown data kind '{kind}' (choose from {', '.join(DATA_KINDS)})")
