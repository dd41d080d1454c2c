"""The embedded default: the synthetic shapes (``clipse.data.synthetic``), generated on first use
into ``$CLIPSE_CACHE/datasets/`` (or ``--data-root``) in the Flickr8k original layout and read
back by the Flickr8k reader, with the generator's ground truth attached."""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
from pathlib import Path

from clipse.data.formats.base import DataRequest, DatasetFormat, register_format
from clipse.data.formats.flickr8k import (
    FLICKR8K_SPLIT_FILES,
    FLICKR8K_TOKEN_FILE,
    read_flickr8k,
)
from clipse.data.records import CaptionDataset
from clipse.data.synthetic import ShapesSpec, scene_image, shapes_truth
from clipse.util.paths import cache_dir


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
            image, captions = scene_image(index, spec.seed, spec.fn_level, spec.domain)
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


@register_format
class Shapes(DatasetFormat):
    name = "shapes"
    help = "the synthetic shapes, generated on first use (the default; no files needed)"
    needs_root = False
    has_ground_truth = True

    @classmethod
    def read(cls, request: DataRequest) -> CaptionDataset:
        if request.shapes is None:
            raise ValueError("the shapes format needs a ShapesSpec")
        folder = ensure_shapes_dataset(request.shapes, request.root)
        dataset = read_flickr8k(folder, request.image_root)
        dataset.name = f"shapes:{request.shapes.folder_name}"
        spec = request.shapes
        dataset.truth_of = functools.partial(shapes_truth, seed=spec.seed, fn_level=spec.fn_level, domain=spec.domain)
        return dataset
