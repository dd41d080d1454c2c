"""Captions in a CSV or TSV file: Kaggle's Flickr8k ``captions.txt`` (``image,caption``, images in
``Images/``) or open_clip's CSV/TSV (``filepath,title``). The split comes from a ``split`` column,
else the Flickr8k split files next to it, else a seeded split by image (sizes printed)."""

from __future__ import annotations

import csv
import logging
from collections import Counter
from pathlib import Path

from clipse.data.formats.base import DataRequest, DatasetFormat, register_format
from clipse.data.formats.common import (
    SPLIT_ALIASES,
    assemble,
    find_image_folder,
    read_text_lines,
    seeded_split,
    single_file,
)
from clipse.data.formats.flickr8k import FLICKR8K_SPLIT_FILES
from clipse.data.records import CaptionDataset
from clipse.util.errors import UserError

log = logging.getLogger(__name__)
CSV_COLUMNS = (("image", "caption"), ("filepath", "title"))


def read_captions_csv(root: Path, image_root: Path | None = None, *, split_seed: int = 0,
                      val_fraction: float = 0.1, test_fraction: float = 0.1) -> CaptionDataset:
    root = Path(root)
    if not root.exists():
        raise UserError(f"{root}: data path not found")
    csv_file = root if root.is_file() else single_file(root, ("captions.txt", "*.csv", "*.tsv"), "captions CSV/TSV file")
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
        split_of_image = seeded_split(sorted(captions), split_seed, val_fraction, test_fraction)
        sizes = Counter(split_of_image.values())
        log.info("%s: no split given; seeded split (seed %d) by image: train %d, val %d, test %d images",
                 csv_file, split_seed, sizes["train"], sizes["val"], sizes["test"])

    if columns[0] == "filepath":  # open_clip: paths relative to the CSV's folder (or absolute)
        base = image_root or csv_file.parent
        paths = {image: base / image for image in split_of_image}
    else:
        folder = find_image_folder([csv_file.parent], list(split_of_image), image_root, csv_file)
        paths = {image: folder / image for image in split_of_image}
    return assemble(csv_file, f"csv:{csv_file.name}", split_of_image, captions, paths)


@register_format
class CaptionsCsv(DatasetFormat):
    name = "csv"
    help = "captions CSV/TSV (Kaggle captions.txt: image,caption; open_clip: filepath,title)"

    @classmethod
    def read(cls, request: DataRequest) -> CaptionDataset:
        return read_captions_csv(request.root, request.image_root, split_seed=request.split_seed,
                                 val_fraction=request.val_fraction, test_fraction=request.test_fraction)
