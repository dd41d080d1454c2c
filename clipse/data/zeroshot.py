"""Labelled image sets for zero-shot classification (docs/reference/metrics.md#zero-shot):
a folder per class (``class_name/*.jpg``, torchvision's ImageFolder layout) or a CSV of
``filepath,label`` (paths relative to the CSV's folder), with prompt templates (a default set,
or a text file of one template per line, ``{}`` standing for the class name).

The synthetic data's set (``shapes``) is generated on first use from the pretraining domain of
the embedded model's corpus (single-shape scenes, classes "red circle" ... "yellow cross") and
written as a folder per class, so the ImageFolder reader runs by default: it measures how much
of what the pretrained model knew fine-tuning keeps.
"""

from __future__ import annotations

import csv
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from clipse.data.formats.common import read_text_lines
from clipse.data.synthetic import GENERATOR_VERSION, labelled_image
from clipse.util.errors import UserError
from clipse.util.paths import cache_dir

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif")
# Prompt templates after CLIP's, and the prefixes the synthetic captions use.
DEFAULT_TEMPLATES = ("a photo of a {}.", "a picture of a {}", "an image with a {}", "there is a {}", "a {}")
SHAPES_IMAGES = 400  # 20 classes of the pretraining domain, about 20 images each


@dataclass
class ZeroShotSet:
    name: str
    image_paths: list[Path]
    labels: list[int]          # class index of each image
    classes: list[str]         # class names, as the prompts say them
    templates: tuple[str, ...]

    def prompts(self) -> list[str]:
        """Every class's prompts, class by class: class c's are ``[c * T, (c + 1) * T)``."""
        return [template.format(name) for name in self.classes for template in self.templates]


def read_templates(path: str | Path | None) -> tuple[str, ...]:
    if path is None:
        return DEFAULT_TEMPLATES
    lines = tuple(line for line in read_text_lines(Path(path)) if line)
    bad = [line for line in lines if "{}" not in line]
    if not lines or bad:
        raise UserError(f"{path}: expected one prompt template per line, each with {{}} for the class name"
                        + (f" (not: {bad[0]!r})" if bad else ""))
    return lines


def read_image_folder(root: Path, templates: tuple[str, ...]) -> ZeroShotSet:
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise UserError(f"{root}: no class folders (expected class_name/*.jpg)")
    names = [f.name.replace("_", " ") for f in folders]
    if len(set(names)) < len(names):
        twice = next(name for name in names if names.count(name) > 1)
        raise UserError(f"{root}: two class folders are both the class '{twice}' ('_' reads as a space)")
    paths, labels = [], []
    for index, folder in enumerate(folders):
        images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise UserError(f"{folder}: class folder has no images")
        paths += images
        labels += [index] * len(images)
    return ZeroShotSet(str(root), paths, labels, names, templates)


def read_label_csv(path: Path, templates: tuple[str, ...]) -> ZeroShotSet:
    rows = read_text_lines(path)
    reader = csv.reader(rows)
    header = [h.strip().lower() for h in next(reader, [])]
    if header[:2] != ["filepath", "label"]:
        raise UserError(f"{path}: expected the header 'filepath,label', found {','.join(header) or 'nothing'}")
    by_label: dict[str, list[Path]] = {}
    for number, row in enumerate(reader, start=2):
        if not row or not any(cell.strip() for cell in row):
            continue
        if len(row) != 2 or not row[1].strip():
            raise UserError(f"{path}:{number}: expected 'filepath,label'")
        image, label = row[0].strip(), row[1].strip()
        if not image:
            raise UserError(f"{path}:{number}: label '{label}' with no image")
        file = path.parent / image
        if not file.is_file():
            raise UserError(f"{path}:{number}: {file}: image file not found")
        by_label.setdefault(label, []).append(file)
    if not by_label:
        raise UserError(f"{path}: no labelled images")
    classes = sorted(by_label)
    paths = [file for label in classes for file in by_label[label]]
    labels = [index for index, label in enumerate(classes) for _ in by_label[label]]
    return ZeroShotSet(str(path), paths, labels, classes, templates)


def ensure_shapes_set(seed: int = 5, images: int = SHAPES_IMAGES) -> Path:
    """The synthetic zero-shot set as a folder per class, generated on first use (safe when
    several processes race, as the shapes dataset)."""
    folder = cache_dir() / "datasets" / f"shapes-zeroshot-v{GENERATOR_VERSION}-s{seed}-{images}"
    if (folder / ".complete").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        for index in range(images):
            image, label = labelled_image(index, seed)
            (staging / label.replace(" ", "_")).mkdir(exist_ok=True)
            image.save(staging / label.replace(" ", "_") / f"{index:05d}.jpg", quality=95)
        (staging / ".complete").touch()
        try:
            os.rename(staging, folder)
        except OSError:
            if not (folder / ".complete").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def load_zeroshot_set(source: str, templates: str | None = None) -> ZeroShotSet:
    """``shapes`` (the generated set), a class-folder root, or a ``filepath,label`` CSV."""
    chosen = read_templates(templates)
    if source == "shapes":
        dataset = read_image_folder(ensure_shapes_set(), chosen)
        dataset.name = "shapes-zeroshot"
        return dataset
    path = Path(source)
    if path.is_dir():
        return read_image_folder(path, chosen)
    if path.is_file():
        return read_label_csv(path, chosen)
    raise UserError(f"{source}: zero-shot set not found (a folder per class, a filepath,label CSV, or shapes)")
