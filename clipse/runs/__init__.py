"""A run on disk: its folder and files, written safely (``folder``), the registry of finished
runs (``registry``) and the plots drawn from a run folder's CSVs (``plots``)."""

from clipse.runs.folder import RunFolder, TrainResult

__all__ = ["RunFolder", "TrainResult"]
