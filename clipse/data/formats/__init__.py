"""Dataset formats, one module each (``--data NAME``): ``shapes`` (the generated default),
``flickr8k``, ``karpathy``, ``csv``. Every module of this package is imported here, so a new
format is one module with a ``@register_format`` class (``clipse.data.formats.base``)."""

from __future__ import annotations

import importlib
import pkgutil

from clipse.data.formats.base import (
    FORMATS,
    DataRequest,
    DatasetFormat,
    format_names,
    register_format,
)
from clipse.data.records import CaptionDataset
from clipse.util.errors import UserError

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")


def read_dataset(kind: str, request: DataRequest) -> CaptionDataset:
    """The dataset of the format named ``kind``."""
    if kind not in FORMATS:
        raise UserError(f"unknown data format '{kind}' (choose from {', '.join(format_names())})")
    if FORMATS[kind].needs_root and request.root is None:
        raise UserError(f"--data {kind} needs --data-root (the dataset's folder or file)")
    return FORMATS[kind].read(request)


__all__ = ["FORMATS", "DataRequest", "DatasetFormat", "format_names", "read_dataset", "register_format"]
