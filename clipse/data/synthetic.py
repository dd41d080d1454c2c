"""The embedded default dataset: coloured shapes, generated deterministically from a seed.

Written to disk in the Flickr8k original layout, so the real Flickr8k reader is what runs by
default. Each image gets five captions at different levels of detail ("a red circle" ...
"a small red circle in the top left and a large blue square in the bottom right, on a gray
background"): coarse captions fit many images, which makes real false negatives.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from clipse.data.readers import FLICKR8K_SPLIT_FILES, FLICKR8K_TOKEN_FILE
from clipse.paths import cache_dir

GENERATOR_VERSION = 1
CANVAS = 64
SHAPE_COLOURS = {
    "red": (215, 40, 40), "green": (40, 165, 60), "blue": (45, 85, 220),
    "yellow": (235, 205, 40), "purple": (140, 55, 175), "orange": (240, 135, 30),
}
BACKGROUNDS = {"white": (240, 240, 240), "black": (25, 25, 25), "gray": (125, 125, 125)}
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
SIZES = {"small": 0.2, "large": 0.36}  # shape extent as a fraction of the canvas
ROWS = ("top", "", "bottom")
COLUMNS = ("left", "", "right")
PREFIXES = ("", "a picture of ", "an image with ", "there is ")


@dataclass(frozen=True)
class ShapesSpec:
    """Sizes (in images) of the generated splits; five captions per image."""

    train_images: int
    val_images: int
    test_images: int
    seed: int = 0

    @property
    def folder_name(self) -> str:
        return f"shapes-v{GENERATOR_VERSION}-s{self.seed}-{self.train_images}-{self.val_images}-{self.test_images}"


@dataclass(frozen=True)
class _Shape:
    kind: str
    colour: str
    size: str
    row: int
    column: int

    @property
    def position(self) -> str:
        words = [w for w in (ROWS[self.row], COLUMNS[self.column]) if w]
        return " ".join(words) if words else "center"


def _draw(draw: ImageDraw.ImageDraw, shape: _Shape, rng: np.random.Generator) -> None:
    cell = CANVAS / 3
    cx = cell * (shape.column + 0.5) + rng.uniform(-3, 3)
    cy = cell * (shape.row + 0.5) + rng.uniform(-3, 3)
    r = CANVAS * SIZES[shape.size] / 2 * rng.uniform(0.85, 1.15)
    fill = tuple(int(np.clip(c + rng.integers(-20, 21), 0, 255)) for c in SHAPE_COLOURS[shape.colour])
    if shape.kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape.kind == "square":
        draw.rectangle([cx - r * 0.85, cy - r * 0.85, cx + r * 0.85, cy + r * 0.85], fill=fill)
    elif shape.kind == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=fill)
    elif shape.kind == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    else:  # cross
        arm = r * 0.35
        draw.rectangle([cx - r, cy - arm, cx + r, cy + arm], fill=fill)
        draw.rectangle([cx - arm, cy - r, cx + arm, cy + r], fill=fill)


def _captions(shapes: list[_Shape], background: str, rng: np.random.Generator) -> list[str]:
    """Five captions, from coarse (fits many images) to complete (fits about one)."""
    def pick() -> _Shape:
        return shapes[rng.integers(len(shapes))]

    def prefix(first_word: str) -> str:
        article = "an" if first_word[0] in "aeiou" else "a"
        return f"{PREFIXES[rng.integers(len(PREFIXES))]}{article} "

    s = pick()
    coarse = f"{prefix(s.colour)}{s.colour} {s.kind}"
    s = pick()
    sized = f"{prefix(s.size)}{s.size} {s.colour} {s.kind}"
    s = pick()
    on_background = f"{prefix(s.colour)}{s.colour} {s.kind} on a {background} background"
    s = pick()
    placed = f"{prefix(s.size)}{s.size} {s.colour} {s.kind} at the {s.position} on a {background} background"
    parts = [f"{x.size} {x.colour} {x.kind} at the {x.position}" for x in shapes]
    if len(parts) == 1:
        complete = f"a single {parts[0]} of a {background} picture"
    else:
        complete = f"a {parts[0]} and a {parts[1]}, on a {background} background"
    return [coarse, sized, on_background, placed, complete]


def _image(index: int, seed: int) -> tuple[Image.Image, list[str]]:
    rng = np.random.default_rng([seed, index])
    background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    cells = rng.permutation(9)[: 1 if rng.random() < 0.6 else 2]
    shapes = [
        _Shape(kind=SHAPES[rng.integers(len(SHAPES))],
               colour=list(SHAPE_COLOURS)[rng.integers(len(SHAPE_COLOURS))],
               size=list(SIZES)[rng.integers(len(SIZES))],
               row=int(cell) // 3, column=int(cell) % 3)
        for cell in cells
    ]
    image = Image.new("RGB", (CANVAS, CANVAS), BACKGROUNDS[background])
    draw = ImageDraw.Draw(image)
    for shape in shapes:
        _draw(draw, shape, rng)
    return image, _captions(shapes, background, rng)


def write_shapes_dataset(folder: Path, spec: ShapesSpec) -> None:
    """Write images, ``Flickr8k.token.txt`` and the three split files into ``folder``."""
    image_dir = folder / "Flicker8k_Dataset"
    text_dir = folder / "Flickr8k_text"
    image_dir.mkdir(parents=True)
    text_dir.mkdir()
    counts = {"train": spec.train_images, "val": spec.val_images, "test": spec.test_images}
    token_lines, index = [], 0
    for split, count in counts.items():
        names = []
        for _ in range(count):
            name = f"shapes_{index:06d}.jpg"
            image, captions = _image(index, spec.seed)
            image.save(image_dir / name, quality=95)
            token_lines += [f"{name}#{k}\t{caption}" for k, caption in enumerate(captions)]
            names.append(name)
            index += 1
        (text_dir / FLICKR8K_SPLIT_FILES[split]).write_text("\n".join(names) + "\n")
    (text_dir / FLICKR8K_TOKEN_FILE).write_text("\n".join(token_lines) + "\n")


def ensure_shapes_dataset(spec: ShapesSpec, root: Path | None = None) -> Path:
    """The dataset folder, generated on first use. Safe when several processes race: each
    writes into its own temporary folder and the first rename wins."""
    folder = Path(root) if root is not None else cache_dir() / "datasets" / spec.folder_name
    if (folder / "Flickr8k_text" / FLICKR8K_TOKEN_FILE).is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        write_shapes_dataset(staging / "data", spec)
        try:
            os.rename(staging / "data", folder)
        except OSError:
            if not (folder / "Flickr8k_text" / FLICKR8K_TOKEN_FILE).is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder
