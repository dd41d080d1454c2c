"""How many training images share a caption of the synthetic default data: the coarse captions
(the first of each image's five, "a red circle") and the complete ones (the last), counted from
the generated token file.

    python benchmarks/shapes_captions.py [--caption "red circle"]
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from clipse.config import TrainConfig  # noqa: E402
from clipse.data.formats.flickr8k import FLICKR8K_SPLIT_FILES, FLICKR8K_TOKEN_FILE  # noqa: E402
from clipse.data.formats.shapes import ensure_shapes_dataset  # noqa: E402
from clipse.data.synthetic import SHAPE_COLOURS, SHAPES, ShapesSpec, strip_prefix  # noqa: E402

SHAPE_PATTERN = re.compile(rf"\b({'|'.join(SHAPE_COLOURS)}) ({'|'.join(SHAPES)})\b")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--caption", default="red circle", help="colour and shape to look up")
    args = parser.parse_args()
    config = TrainConfig()
    spec = ShapesSpec(config.shapes_train_images, config.shapes_val_images, config.shapes_test_images, config.data_seed)
    with tempfile.TemporaryDirectory(prefix="clipse-shapes-") as tmp:
        folder = ensure_shapes_dataset(spec, Path(tmp) / "shapes")
        train = set((folder / "Flickr8k_text" / FLICKR8K_SPLIT_FILES["train"]).read_text().split())
        captions: dict[str, list[str]] = {}
        for line in (folder / "Flickr8k_text" / FLICKR8K_TOKEN_FILE).read_text().splitlines():
            name, text = line.split("\t", 1)
            if name.split("#")[0] in train:
                captions.setdefault(name.split("#")[0], []).append(text)
    coarse = Counter(strip_prefix(texts[0]).split(" ", 1)[1] for texts in captions.values())
    complete = Counter(texts[-1] for texts in captions.values())
    holds = Counter(pair for texts in captions.values() for pair in set(SHAPE_PATTERN.findall(texts[-1])))
    wanted = tuple(args.caption.split())
    print(f"{len(captions)} training images, 5 captions each")
    print(f"coarse captions: {len(coarse)} distinct; images per coarse caption: mean "
          f"{len(captions) / len(coarse):.1f}, min {min(coarse.values())}, max {max(coarse.values())}")
    print(f"complete captions: {len(complete)} distinct; images per complete caption: mean "
          f"{len(captions) / len(complete):.2f}")
    print(f"'a {args.caption}': the coarse caption of {coarse[args.caption]} images; a {args.caption} is in "
          f"{holds[wanted]} images")


if __name__ == "__main__":
    main()
