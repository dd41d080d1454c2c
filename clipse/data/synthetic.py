"""The embedded default dataset: coloured shapes, generated deterministically from a seed.

The ``shapes`` format (``clipse.data.formats.shapes``) writes it to disk in the Flickr8k original
layout, so the real Flickr8k reader is what runs by default. Each image gets five captions at different levels of detail ("a red circle" ...
"a small red circle in the top left and a large blue square in the bottom right, on a gray
background"): coarse captions fit many images, which makes real false negatives.

The generator knows which captions truly describe which images (``shapes_truth``): an image
holds facts ("a red circle", "a small red circle at the top left", "a gray background", its
complete description) and a caption requires one or two of them. ``--shapes-fn-level`` sets
the mix of caption levels, and so how often an in-batch negative truly matches its caption:
``low`` uses only placed and complete captions, ``default`` one caption of each level, ``high``
coarse ones and a background-only caption ("a picture of a gray background"). The images are
the same at every level.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from clipse.data.cache import cached_truth
from clipse.data.records import CaptionSplit
from clipse.data.truth import CaptionTruth
from clipse.util.errors import UserError

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
# The five caption levels of each image, per --shapes-fn-level (see the module docstring).
FN_LEVELS = {
    "low": ("placed", "complete", "placed", "complete", "placed"),
    "default": ("coarse", "sized", "on_background", "placed", "complete"),
    "high": ("coarse", "background", "coarse", "sized", "complete"),
}
SHAPES_FN_LEVELS = tuple(FN_LEVELS)


@dataclass(frozen=True)
class Domain:
    """What scenes and captions are drawn from."""

    colours: tuple[str, ...]
    backgrounds: tuple[str, ...]
    levels: tuple[str, ...] | None = None  # the five caption levels; None: --shapes-fn-level's


# ``pretraining``: the corpus of the embedded pretrained model, shifted from the default so that
# fine-tuning has something to learn: no purple or orange shapes, no black background, and no
# caption that says where a shape is (coarse, sized and background captions only).
DOMAINS = {
    "default": Domain(tuple(SHAPE_COLOURS), tuple(BACKGROUNDS)),
    "pretraining": Domain(("red", "green", "blue", "yellow"), ("white", "gray"),
                          ("coarse", "sized", "on_background", "sized", "coarse")),
}
SHAPES_DOMAINS = tuple(DOMAINS)
IMAGE_NAME = re.compile(r"shapes_(\d{6})\.jpg$")


def strip_prefix(caption: str) -> str:
    """A caption without the filler it may start with ("a picture of ", ...)."""
    for prefix in sorted(PREFIXES, key=len, reverse=True):
        if prefix and caption.startswith(prefix):
            return caption[len(prefix):]
    return caption


@dataclass(frozen=True)
class ShapesSpec:
    """Sizes (in images) of the generated splits; five captions per image."""

    train_images: int
    val_images: int
    test_images: int
    seed: int = 0
    fn_level: str = "default"
    domain: str = "default"

    @property
    def folder_name(self) -> str:
        level = "" if self.fn_level == "default" else f"-fn{self.fn_level}"
        domain = "" if self.domain == "default" else f"-{self.domain}"
        return (f"shapes-v{GENERATOR_VERSION}-s{self.seed}-{self.train_images}-{self.val_images}-{self.test_images}"
                f"{level}{domain}")


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

    @property
    def facts(self) -> tuple[str, str, str]:
        """What captions can say of this shape: colour and kind; with its size; with its place."""
        sized = f"{self.size} {self.colour} {self.kind}"
        return f"{self.colour} {self.kind}", sized, f"{sized} at {self.row},{self.column}"


@dataclass(frozen=True)
class _Placement:
    cx: float
    cy: float
    r: float
    fill: tuple[int, ...]


def _place(shape: _Shape, rng: np.random.Generator) -> _Placement:
    cell = CANVAS / 3
    cx = cell * (shape.column + 0.5) + rng.uniform(-3, 3)
    cy = cell * (shape.row + 0.5) + rng.uniform(-3, 3)
    r = CANVAS * SIZES[shape.size] / 2 * rng.uniform(0.85, 1.15)
    fill = tuple(int(np.clip(c + rng.integers(-20, 21), 0, 255)) for c in SHAPE_COLOURS[shape.colour])
    return _Placement(cx, cy, r, fill)


def _paint(draw: ImageDraw.ImageDraw, kind: str, p: _Placement) -> None:
    cx, cy, r, fill = p.cx, p.cy, p.r, p.fill
    if kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif kind == "square":
        draw.rectangle([cx - r * 0.85, cy - r * 0.85, cx + r * 0.85, cy + r * 0.85], fill=fill)
    elif kind == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=fill)
    elif kind == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    else:  # cross
        arm = r * 0.35
        draw.rectangle([cx - r, cy - arm, cx + r, cy + arm], fill=fill)
        draw.rectangle([cx - arm, cy - r, cx + arm, cy + r], fill=fill)


def _complete_fact(shapes: list[_Shape], background: str) -> str:
    return "all:" + background + ";" + ";".join(sorted(s.facts[2] for s in shapes))


def _captions(shapes: list[_Shape], background: str, rng: np.random.Generator,
              levels: tuple[str, ...]) -> list[tuple[str, tuple[str, ...]]]:
    """Five (caption, facts it requires), one per level, from coarse (fits many images) to
    complete (fits about one)."""
    def pick() -> _Shape:
        return shapes[rng.integers(len(shapes))]

    def prefix(first_word: str) -> str:
        article = "an" if first_word[0] in "aeiou" else "a"
        return f"{PREFIXES[rng.integers(len(PREFIXES))]}{article} "

    def caption(level: str) -> tuple[str, tuple[str, ...]]:
        if level == "complete":
            parts = [f"{x.size} {x.colour} {x.kind} at the {x.position}" for x in shapes]
            text = (f"a single {parts[0]} of a {background} picture" if len(parts) == 1
                    else f"a {parts[0]} and a {parts[1]}, on a {background} background")
            return text, (_complete_fact(shapes, background),)
        if level == "background":
            return f"{PREFIXES[rng.integers(len(PREFIXES))]}a {background} background", (f"bg:{background}",)
        s = pick()
        coloured, sized, placed = s.facts
        if level == "coarse":
            return f"{prefix(s.colour)}{s.colour} {s.kind}", (coloured,)
        if level == "sized":
            return f"{prefix(s.size)}{s.size} {s.colour} {s.kind}", (sized,)
        if level == "on_background":
            return f"{prefix(s.colour)}{s.colour} {s.kind} on a {background} background", (coloured, f"bg:{background}")
        return (f"{prefix(s.size)}{s.size} {s.colour} {s.kind} at the {s.position} on a {background} background",
                (placed, f"bg:{background}"))

    return [caption(level) for level in levels]


@dataclass(frozen=True)
class _Scene:
    background: str
    shapes: list[_Shape]
    placements: list[_Placement]
    captions: list[tuple[str, tuple[str, ...]]]

    @property
    def facts(self) -> set[str]:
        """Everything true of the image that a caption can require."""
        return {f"bg:{self.background}", _complete_fact(self.shapes, self.background),
                *(fact for shape in self.shapes for fact in shape.facts)}


def _scene(index: int, seed: int, fn_level: str = "default", domain: str = "default") -> _Scene:
    rng = np.random.default_rng([seed, index])
    drawn = DOMAINS[domain]
    background = drawn.backgrounds[rng.integers(len(drawn.backgrounds))]
    cells = rng.permutation(9)[: 1 if rng.random() < 0.6 else 2]
    shapes = [
        _Shape(kind=SHAPES[rng.integers(len(SHAPES))],
               colour=drawn.colours[rng.integers(len(drawn.colours))],
               size=list(SIZES)[rng.integers(len(SIZES))],
               row=int(cell) // 3, column=int(cell) % 3)
        for cell in cells
    ]
    placements = [_place(shape, rng) for shape in shapes]
    return _Scene(background, shapes, placements, _captions(shapes, background, rng, drawn.levels or FN_LEVELS[fn_level]))


def scene_image(index: int, seed: int, fn_level: str = "default", domain: str = "default") -> tuple[Image.Image, list[str]]:
    scene = _scene(index, seed, fn_level, domain)
    image = Image.new("RGB", (CANVAS, CANVAS), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    for shape, placement in zip(scene.shapes, scene.placements):
        _paint(draw, shape.kind, placement)
    return image, [text for text, _ in scene.captions]


def shapes_truth(split: CaptionSplit, seed: int, fn_level: str = "default", domain: str = "default") -> CaptionTruth:
    """Which captions of a split of a generated shapes dataset truly describe which of its images
    (every caption describes its own image, and often others). Regenerating the scenes takes
    about a second per 5,000 images, so the answer is cached, keyed by all it depends on."""
    parts = [f"shapes{GENERATOR_VERSION}", str(seed), fn_level, domain, *(Path(p).name for p in split.image_paths),
             *split.captions, *map(str, split.caption_image)]
    return cached_truth(parts, lambda: _shapes_truth(split, seed, fn_level, domain))


def _shapes_truth(split: CaptionSplit, seed: int, fn_level: str, domain: str) -> CaptionTruth:
    scenes = []
    for path in split.image_paths:
        match = IMAGE_NAME.search(str(path))
        if match is None:
            raise UserError(f"{path}: not an image of a generated shapes dataset")
        scenes.append(_scene(int(match.group(1)), seed, fn_level, domain))
    required = []
    for text, row in zip(split.captions, split.caption_image):
        facts = dict(scenes[row].captions).get(text)
        if facts is None:
            raise UserError(f"{split.image_paths[row]}: its captions are not those of a shapes dataset with seed {seed} "
                            f"and fn level {fn_level}; this folder was generated with other settings (use another "
                            "--data-root)")
        required.append(facts)
    return CaptionTruth.from_facts([scene.facts for scene in scenes], required)


def labelled_image(index: int, seed: int, domain: str = "pretraining") -> tuple[Image.Image, str]:
    """One single-shape scene of ``domain`` and its class, the shape's colour and kind ("red
    circle"): the zero-shot classification set of the synthetic data."""
    rng = np.random.default_rng([seed, index, 31])
    drawn = DOMAINS[domain]
    background = drawn.backgrounds[rng.integers(len(drawn.backgrounds))]
    cell = int(rng.integers(9))
    shape = _Shape(kind=SHAPES[rng.integers(len(SHAPES))], colour=drawn.colours[rng.integers(len(drawn.colours))],
                   size=list(SIZES)[rng.integers(len(SIZES))], row=cell // 3, column=cell % 3)
    image = Image.new("RGB", (CANVAS, CANVAS), BACKGROUNDS[background])
    _paint(ImageDraw.Draw(image), shape.kind, _place(shape, rng))
    return image, f"{shape.colour} {shape.kind}"
