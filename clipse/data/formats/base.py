"""What a dataset format is, and the registry that finds formats by their ``--data`` name.

A format is a subclass of ``DatasetFormat`` in one module of this package, decorated with
``@register_format``: ``--data NAME`` then accepts it and ``--help`` lists it. It turns a
``DataRequest`` (where the files are, and how to split them when the files do not say) into a
``CaptionDataset`` with train, val and test splits.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from clipse.data.records import CaptionDataset
from clipse.data.synthetic import ShapesSpec


@dataclass(frozen=True)
class DataRequest:
    """What reading a dataset needs, whatever its format (a format uses the parts it knows)."""

    root: Path | None = None             # the dataset's folder or file (--data-root)
    image_root: Path | None = None       # the image folder when it is not found beside the captions
    split_seed: int = 0                  # an automatic split by image (formats without splits)
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    shapes: ShapesSpec | None = None     # the generated data's sizes, seed and false-negative level


class DatasetFormat(ABC):
    name: ClassVar[str]
    help: ClassVar[str]                  # one line for --help
    needs_root: ClassVar[bool] = True    # False: the format can do without --data-root
    has_ground_truth: ClassVar[bool] = False  # it knows which captions truly describe which images

    @classmethod
    @abstractmethod
    def read(cls, request: DataRequest) -> CaptionDataset:
        """The dataset, or a ``UserError`` naming the file (and line) and what is wrong."""


FORMATS: dict[str, type[DatasetFormat]] = {}


def register_format(cls: type[DatasetFormat]) -> type[DatasetFormat]:
    """Class decorator: make a format known under ``cls.name``."""
    if cls.name in FORMATS and FORMATS[cls.name] is not cls:
        raise ValueError(f"a dataset format named '{cls.name}' is already registered")
    FORMATS[cls.name] = cls
    return cls


def format_names() -> tuple[str, ...]:
    return tuple(FORMATS)
