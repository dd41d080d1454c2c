"""The Flickr8k original layout: an image folder, ``Flickr8k.token.txt`` (``name.jpg#k<TAB>caption``)
and the three split files. The real token file's quirks (a line for a file that does not exist,
CRLF line ends, trailing spaces) are skipped with one warning that counts them."""

from __future__ import annotations

import logging
from pathlib import Path

from clipse.data.formats.base import DataRequest, DatasetFormat, register_format
from clipse.data.formats.common import assemble, find_image_folder, read_text_lines
from clipse.data.records import CaptionDataset
from clipse.util.errors import UserError

log = logging.getLogger(__name__)

FLICKR8K_TOKEN_FILE = "Flickr8k.token.txt"
FLICKR8K_SPLIT_FILES = {
    "train": "Flickr_8k.trainImages.txt",
    "val": "Flickr_8k.devImages.txt",
    "test": "Flickr_8k.testImages.txt",
}


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
    image_dir = find_image_folder([text_dir, text_dir.parent], list(split_of_image), image_root, token_file)
    # token lines for files that exist nowhere (the real file's "...jpg.1#k") are counted too
    orphans = [image for image in captions if image not in split_of_image and not (image_dir / image).is_file()]
    if orphans:
        lines = sum(len(captions[o]) for o in orphans)
        log.warning("%s: skipped %d caption lines whose image file does not exist (e.g. %s)",
                    token_file, lines, orphans[0])
    return assemble(token_file, "flickr8k", split_of_image, captions,
                     {image: image_dir / image for image in split_of_image})


@register_format
class Flickr8k(DatasetFormat):
    name = "flickr8k"
    help = "Flickr8k original layout (Flickr8k_text/Flickr8k.token.txt, split files, images)"

    @classmethod
    def read(cls, request: DataRequest) -> CaptionDataset:
        return read_flickr8k(request.root, request.image_root)
