"""Karpathy's split files: ``dataset_flickr8k.json``, ``dataset_flickr30k.json``, ``dataset_coco.json``
(``images[].filename``, COCO's ``filepath``, ``split`` with restval counted as train,
``sentences[].raw``)."""

from __future__ import annotations

import json
from pathlib import Path

from clipse.data.formats.base import DataRequest, DatasetFormat, register_format
from clipse.data.formats.common import (
    SPLIT_ALIASES,
    assemble,
    find_image_folder,
    single_file,
)
from clipse.data.records import CaptionDataset
from clipse.util.errors import UserError


def read_karpathy(root: Path, image_root: Path | None = None) -> CaptionDataset:
    root = Path(root)
    if not root.exists():
        raise UserError(f"{root}: data path not found")
    json_file = root if root.is_file() else single_file(root, ("dataset_*.json",), "Karpathy JSON file")
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
    image_dir = find_image_folder([json_file.parent], list(split_of_image), image_root, json_file)
    return assemble(json_file, f"karpathy:{json_file.name}", split_of_image, captions,
                     {key: image_dir / key for key in split_of_image})


@register_format
class Karpathy(DatasetFormat):
    name = "karpathy"
    help = "Karpathy JSON (dataset_flickr8k.json, dataset_flickr30k.json, dataset_coco.json)"

    @classmethod
    def read(cls, request: DataRequest) -> CaptionDataset:
        return read_karpathy(request.root, request.image_root)
