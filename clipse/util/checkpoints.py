"""Reading checkpoint files without running code they might carry.

``torch.load`` unpickles; a crafted file can run any command when it is unpickled. clipse reads
every checkpoint with ``weights_only=True`` (tensors, numbers, strings, lists, dicts only) and
refuses anything else with one line.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from clipse.util.errors import UserError

# Lines of torch's weights-only refusal that explain nothing about the file itself.
_BOILERPLATE = ("Weights only load failed", "Please file an issue", "Check the documentation")


def checkpoint_error(path: Path, exc: BaseException) -> UserError:
    """One line for a checkpoint that cannot be used; a pickle that names code says so."""
    lines = [line.strip() for line in str(exc).splitlines()
             if line.strip() and not line.strip().startswith(_BOILERPLATE)]
    if isinstance(exc, pickle.UnpicklingError) and any("GLOBAL" in line for line in lines):
        return UserError(f"{path}: refused: it holds objects other than tensors and plain data, and loading it "
                         "could run code (clipse loads checkpoints with weights_only=True)")
    return UserError(f"{path}: cannot read checkpoint ({type(exc).__name__}: {lines[0] if lines else 'unreadable'})")


def read_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> Any:
    """A checkpoint's contents, loaded without running any code it might carry."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{path}: checkpoint file not found") from None
    except Exception as exc:  # torch raises many kinds for a damaged, foreign or unsafe file
        raise checkpoint_error(path, exc) from None
