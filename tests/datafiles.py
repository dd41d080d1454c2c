"""Tiny datasets in the real on-disk formats, written by tests."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from PIL import Image


def write_jpeg(path: Path, colour=(200, 30, 30), size=(40, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, format="JPEG")


def image_names(n: int, prefix: str = "img") -> list[str]:
    return [f"{prefix}{i:04d}.jpg" for i in range(n)]


def captions_for(name: str, k: int = 5) -> list[str]:
    return [f"caption {j} of {name}, with a comma" for j in range(k)]


def write_flickr8k(root: Path, n_train=6, n_val=2, n_test=2, quirks=True, crlf=True) -> dict[str, list[str]]:
    """Original layout: Flicker8k_Dataset/ + Flickr8k_text/ (token file and split lists)."""
    names = image_names(n_train + n_val + n_test)
    splits = {"train": names[:n_train], "val": names[n_train:n_train + n_val], "test": names[n_train + n_val:]}
    for i, name in enumerate(names):
        write_jpeg(root / "Flicker8k_Dataset" / name, colour=(i * 20 % 255, 100, 50))
    lines = [f"{name}#{j}\t{caption}  " for name in names for j, caption in enumerate(captions_for(name))]
    if quirks:  # the real file lists a non-existent "...jpg.1" with five captions
        lines += [f"{names[0]}.1#{j}\tghost caption {j}" for j in range(5)]
    end = "\r\n" if crlf else "\n"
    text = root / "Flickr8k_text"
    text.mkdir(parents=True, exist_ok=True)
    (text / "Flickr8k.token.txt").write_bytes((end.join(lines) + end).encode())
    for split, file_name in (("train", "Flickr_8k.trainImages.txt"), ("val", "Flickr_8k.devImages.txt"),
                             ("test", "Flickr_8k.testImages.txt")):
        (text / file_name).write_bytes((end.join(splits[split]) + end).encode())
    return splits


def write_karpathy(root: Path, coco=False) -> dict[str, list[str]]:
    splits = {"train": image_names(3, "tr"), "restval": image_names(2, "rv"), "val": image_names(2, "va"),
              "test": image_names(2, "te")}
    images = []
    for split, names in splits.items():
        for name in names:
            folder = ("train2014" if split in ("train", "restval") else "val2014") if coco else ""
            write_jpeg(root / "images" / folder / name)
            entry = {"filename": name, "split": split,
                     "sentences": [{"raw": c, "tokens": c.split()} for c in captions_for(name, 5 if not coco else 6)]}
            if coco:
                entry["filepath"] = folder
            images.append(entry)
    file_name = "dataset_coco.json" if coco else "dataset_flickr8k.json"
    (root / file_name).write_text(json.dumps({"images": images, "dataset": "x"}))
    return splits


def write_kaggle_captions(root: Path, n_images=20, with_split_files=False) -> list[str]:
    names = image_names(n_images)
    for name in names:
        write_jpeg(root / "Images" / name)
    with open(root / "captions.txt", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "caption"])
        for name in names:
            for caption in captions_for(name):
                writer.writerow([name, caption])
    if with_split_files:
        (root / "Flickr_8k.trainImages.txt").write_text("\n".join(names[:14]) + "\n")
        (root / "Flickr_8k.devImages.txt").write_text("\n".join(names[14:17]) + "\n")
        (root / "Flickr_8k.testImages.txt").write_text("\n".join(names[17:]) + "\n")
    return names


def write_openclip_csv(root: Path, separator="\t") -> dict[str, list[str]]:
    splits = {"train": image_names(4, "a"), "val": image_names(2, "b"), "test": image_names(2, "c")}
    suffix = "tsv" if separator == "\t" else "csv"
    with open(root / f"pairs.{suffix}", "w", newline="") as handle:
        writer = csv.writer(handle, delimiter=separator)
        writer.writerow(["filepath", "title", "split"])
        for split, names in splits.items():
            for name in names:
                write_jpeg(root / "imgs" / name)
                for caption in captions_for(name, 2):
                    writer.writerow([f"imgs/{name}", caption, split])
    return splits
